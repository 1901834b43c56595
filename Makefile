# search-img: `make run` serves, `make test` tests. Both install what they need first.
.PHONY: setup run test lint bench bench-render-free bench-wake bench-encoder bench-decode monitor fuzz clean-models

CARGO ?= cargo

setup:
	scripts/setup.sh

run: setup
	scripts/run.sh

test: setup
	CARGO=$(CARGO) scripts/test.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

bench-encoder: setup
	scripts/bench-encoder.sh

# Peak memory of 1 and 4 concurrent uploads of large photos (bench/results/decode-memory.md).
bench-decode: setup
	$(CARGO) build --release --bin search-img
	.tools/venv/bin/python bench/decode_memory.py --out bench/results/decode-memory.md

bench: setup
	scripts/bench.sh

# The service in cgroups of Render's free instance (0.1 CPU, 512 MB): bench/render_free.py.
bench-render-free: setup
	$(CARGO) build --release --quiet --bin search-img --bin bench-load
	.tools/venv/bin/python bench/render_free.py

# Wakes on Render's free instance, the builds in BENCH_BINS alternated: bench/wake.py.
bench-wake: setup
	$(CARGO) build --release --quiet --bin search-img --bin bench-load
	.tools/venv/bin/python bench/wake.py

monitor:
	$(CARGO) run --release -- monitor

# Fuzzes bytes -> decode -> preprocess for FUZZ_SECONDS (60); fails on any finding.
fuzz:
	scripts/fuzz.sh

clean-models:
	rm -rf models/out
