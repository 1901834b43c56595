# search-img: `make run` serves, `make test` tests. Both install what they need first.
.PHONY: setup run test lint bench bench-encoder monitor fuzz clean-models

CARGO ?= cargo

setup:
	scripts/setup.sh

run: setup
	scripts/run.sh

test: setup
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

bench-encoder: setup
	scripts/bench-encoder.sh

bench: setup
	scripts/bench.sh

monitor:
	$(CARGO) run --release -- monitor

# Fuzzes bytes -> decode -> preprocess for FUZZ_SECONDS (60); fails on any finding.
fuzz:
	scripts/fuzz.sh

clean-models:
	rm -rf models/out
