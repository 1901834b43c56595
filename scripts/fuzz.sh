#!/usr/bin/env bash
# Fuzzes bytes -> decode -> preprocess for a bounded time; fails on any finding.
#
#   scripts/fuzz.sh                 fuzz for FUZZ_SECONDS (default 60)
#   scripts/fuzz.sh FILE...         replay inputs (e.g. fuzz/artifacts/decode/crash-*)
#
# Settings (environment):
#   FUZZ_SECONDS    total fuzzing time (60)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (10)
#   FUZZ_RSS_MB     memory limit; above it the input counts as a finding (2048)
#   FUZZ_MAX_LEN    largest input the fuzzer makes, bytes (65536)
#   FUZZ_JOBS       fuzzing processes (1); more use libFuzzer's fork mode
#   FUZZ_SANITIZER  address (default) or none
#
# Stable Rust only: the build uses the coverage flags `cargo fuzz` would pass, and
# RUSTC_BOOTSTRAP=1 for -Zsanitizer=address (see fuzz/README.md). Exit status: 0 when
# nothing was found, 1 on a crash, hang, leak or out-of-memory input (kept under
# fuzz/artifacts/decode/), 2 on a build or usage error.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_TOTAL=${FUZZ_SECONDS:-60}
TIMEOUT=${FUZZ_TIMEOUT:-10}
RSS_MB=${FUZZ_RSS_MB:-2048}
MAX_LEN=${FUZZ_MAX_LEN:-65536}
JOBS=${FUZZ_JOBS:-1}
SANITIZER=${FUZZ_SANITIZER:-address}
TARGET=decode
CARGO=${CARGO:-cargo}

log() { echo "[fuzz] $*" >&2; }

HOST=$(rustc -vV | sed -n 's/^host: //p')
FLAGS=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cdebug-assertions
  -Coverflow-checks
  -Cforce-frame-pointers
)
case $SANITIZER in
  address) FLAGS+=(-Zsanitizer=address) ;;
  none) ;;
  *) log "FUZZ_SANITIZER must be address or none"; exit 2 ;;
esac

# An explicit --target keeps these flags off build scripts and proc macros, as
# `cargo fuzz` does; the sanitizer build gets its own target directory.
log "building the $TARGET target (sanitizer: $SANITIZER)"
RUSTFLAGS="${FLAGS[*]}" RUSTC_BOOTSTRAP=1 \
  "$CARGO" build --release --bin "$TARGET" --target "$HOST" \
  --target-dir "target/$SANITIZER" \
  || { log "build failed"; exit 2; }
BIN=target/$SANITIZER/$HOST/release/$TARGET

ARTIFACTS=artifacts/$TARGET
CORPUS=corpus/$TARGET
mkdir -p "$ARTIFACTS" "$CORPUS" logs
COMMON=(
  -timeout="$TIMEOUT"
  -rss_limit_mb="$RSS_MB"
  -max_len="$MAX_LEN"
  -dict=decode.dict
  -artifact_prefix="$ARTIFACTS/"
)

if [ $# -gt 0 ]; then
  log "replaying $#: $*"
  files=()
  for f in "$@"; do files+=("$(cd "$OLDPWD" 2>/dev/null; realpath "$f")"); done
  exec "$BIN" "${COMMON[@]}" "${files[@]}"
fi

before=$(find "$ARTIFACTS" -type f | sort)
LOG=logs/$TARGET-$(date +%Y%m%d-%H%M%S).log
log "fuzzing for ${SECONDS_TOTAL}s with $JOBS job(s); log: fuzz/$LOG"
RUN=("$BIN" "${COMMON[@]}" -max_total_time="$SECONDS_TOTAL" -print_final_stats=1)
if [ "$JOBS" -gt 1 ]; then
  RUN+=(-fork="$JOBS")
fi
# The first corpus directory receives new inputs; the committed seeds stay as they are.
status=0
"${RUN[@]}" "$CORPUS" seeds/$TARGET >"$LOG" 2>&1 || status=$?

# (grep finding nothing is not an error here.)
execs=$({ grep -o 'stat::number_of_executed_units: *[0-9]*' "$LOG" || true; } |
  awk '{s+=$2} END {print s+0}')
if [ "$execs" = 0 ]; then
  # Fork mode prints "#N: cov: ..." progress lines instead of final stats; N counts
  # the jobs, so report the total from the last line's time and exec/s instead.
  execs=$({ grep -E '^#[0-9]+: cov:' "$LOG" || true; } | awk '
    { for (i = 1; i <= NF; i++) { if ($i == "exec/s:") r = $(i + 1); if ($i == "time:") t = $(i + 1) } }
    END { if (t) printf "about %d (fork mode)", r * t; else print "?" }')
fi
cov=$({ grep -o 'cov: [0-9]*' "$LOG" || true; } | tail -1 | awk '{print $2}')
new=$(comm -13 <(echo "$before") <(find "$ARTIFACTS" -type f | sort) | sed '/^$/d')
log "executions: ${execs:-?}, coverage: ${cov:-?} edges, corpus: $(ls "$CORPUS" | wc -l) inputs"

if [ "$status" -ne 0 ] || [ -n "$new" ]; then
  log "FINDING (libFuzzer exit status $status); new artifacts:"
  echo "$new" | sed '/^$/d; s/^/  fuzz\//' >&2
  grep -E 'ERROR|panicked|SUMMARY|Test unit written|timeout|out-of-memory' "$LOG" | head -20 >&2 || true
  log "replay with: scripts/fuzz.sh fuzz/$ARTIFACTS/<file>"
  exit 1
fi
log "no findings"
