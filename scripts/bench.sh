#!/usr/bin/env bash
# `make bench`: the end-to-end benchmark (docs/performance.md, "Benchmarks"). Builds the release
# binaries, then bench/run.py starts SecantusDB, an image server and the service as
# real processes on 127.0.0.1, measures, prints the tables and writes
# bench/results/latest.{json,md}. Unattended; about 15-20 min on 2 cores.
# Knobs (environment): BENCH_MODELS, BENCH_SIZES, BENCH_C1_REQUESTS, BENCH_C10_REQUESTS,
# BENCH_MAX_SECS, BENCH_BARE_RUNS, MAX_BATCH_SIZE, BENCH_SERVICE_ENV (see bench/run.py).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ ! -x .tools/venv/bin/python ]; then
  echo "[bench] .tools/venv missing: run \`make setup\` (make bench does)" >&2
  exit 1
fi
echo "[bench] building release binaries" >&2
cargo build --release --quiet --bin search-img --bin bench-load
.tools/venv/bin/python bench/run.py "$@"
echo "[bench] total $(($(date +%s) - start)) s including the build" >&2
