#!/usr/bin/env bash
# `make bench-encoder`: the image encoder beside the bare ONNX Runtime, per model and per
# session settings, in the same run.
#
# For each model and each settings variant, two fresh processes (so each peak RSS belongs
# to one model and one setting alone):
#   ours  target/release/bench-encoder  (the library: search_img::encoder)
#   bare  bench/bare_ort.py             (Python onnxruntime, same file, threads, options)
# both on the same input: real photos from the scikit-image wheel, preprocessed by the
# library (bench-encoder --dump-input writes the .npy the bare side reads).
# Prints one markdown table with ours/bare ratios and writes the raw measurements to
# bench/results/encoder-<date>.json.
#
# Settings (environment):
#   MODELS          model folders under models/out   (efficientnet-lite0 clip-vit-b32 clip-vit-b32-int8)
#   THREADS         intra-op threads                  (2)
#   MAX_BATCH_SIZE  batch of the batched measurement  (4)
#   RUNS / WARMUP   timed / untimed runs per latency  (10 / 2)
#   VARIANTS        arena:prepacking:optimization[:mmap], each run for ours and bare;
#                   prepacking on, off or auto (by model file size, as the service)
#                   (off:off:all on:off:all off:on:all on:on:all off:off:all:mmap
#                   on:off:all:mmap). The first is the service's default, on:on:all is
#                   ONNX Runtime's own default; `:mmap` runs the process with
#                   MALLOC_MMAP_THRESHOLD_=$MMAP_THRESHOLD (glibc then returns large
#                   freed blocks to the kernel instead of keeping them in its heap).
#   SPINNING        intra-op thread spinning, true or false (true, ONNX Runtime's default)
#   MMAP_THRESHOLD  bytes, for the :mmap variants     (131072, glibc's initial value)
#   ROUNDS          repeats of the whole sweep        (1); the table shows, per row, the
#                   least-contended time (min over rounds) and the highest peak RSS
#   TIMEOUT         seconds per process               (180)
#   BUDGET          seconds for the whole sweep; measurements not started by then are
#                   skipped and listed as such     (900; about 2 min on an idle 2-core
#                   machine, 9 min at load average 8)
#   OUT             results file                      (bench/results/encoder-<date>.json)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.tools/venv/bin/python
CARGO=${CARGO:-cargo}
MODELS=${MODELS:-efficientnet-lite0 clip-vit-b32 clip-vit-b32-int8}
THREADS=${THREADS:-2}
BATCH=${MAX_BATCH_SIZE:-4}
RUNS=${RUNS:-10}
WARMUP=${WARMUP:-2}
VARIANTS=${VARIANTS:-off:off:all on:off:all off:on:all on:on:all off:off:all:mmap on:off:all:mmap}
MMAP_THRESHOLD=${MMAP_THRESHOLD:-131072}
SPINNING=${SPINNING:-true}
ROUNDS=${ROUNDS:-1}
TIMEOUT=${TIMEOUT:-180}
BUDGET=${BUDGET:-900}
OUT=${OUT:-$ROOT/bench/results/encoder-$(date -u +%Y-%m-%d).json}
WORK=$ROOT/bench/work/encoder
IMAGES=(chelsea.png coffee.png astronaut.png motorcycle_left.png)

log() { echo "[bench-encoder] $*" >&2; }
start=$(date +%s)

[ -x "$PY" ] || { log "no venv: run make setup"; exit 1; }
log "building target/release/bench-encoder"
"$CARGO" build --release --quiet --bin bench-encoder
BIN=$ROOT/target/release/bench-encoder
sweep_start=$(date +%s)

imgs=()
for i in "${IMAGES[@]}"; do imgs+=("$ROOT/.tools/data/skimage/$i"); done
rm -rf "$WORK"
mkdir -p "$WORK" "$(dirname "$OUT")"
lines=$WORK/results.jsonl
: >"$lines"

onoff() { case $1 in on | true | 1) echo true ;; auto) echo auto ;; *) echo false ;; esac; }

# run LABEL CMD...: one measurement process; its JSON line (or an error record) to $lines.
run() {
  local what=$1; shift
  local out
  if out=$(timeout "$TIMEOUT" "$@" 2>"$WORK/stderr"); then
    echo "$out" | tail -n1 >>"$lines"
  else
    log "FAILED: $what: $(tail -n3 "$WORK/stderr" | tr '\n' ' ')"
    printf '{"error": %s}\n' "$("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$what")" >>"$lines"
  fi
}

for model in $MODELS; do
  path=$ROOT/models/out/$model/model.onnx
  [ -f "$path" ] || { log "missing $path: run make setup"; exit 1; }
  "$BIN" --model "$path" --images "${imgs[@]}" --batch "$BATCH" --dump-input "$WORK/$model.npy"
done

# measure MODEL VARIANT: ours then bare, back to back (same machine load for the ratio).
measure() {
  local model=$1 v=$2 arena prepack opt malloc label
  local path=$ROOT/models/out/$model/model.onnx input=$WORK/$model.npy
  IFS=: read -r arena prepack opt malloc <<<"$v"
  label="arena $arena, prepack $prepack, opt $opt"
  [ "$(onoff "$SPINNING")" = true ] || label="$label, no spinning"
  local envs=()
  if [ "${malloc:-}" = mmap ]; then
    envs=(MALLOC_MMAP_THRESHOLD_="$MMAP_THRESHOLD")
    label="$label, malloc mmap"
  fi
  if [ $(($(date +%s) - sweep_start)) -ge "$BUDGET" ]; then
    log "skipped (BUDGET=${BUDGET}s spent): $model $label"
    printf '{"error": "skipped (time budget): %s %s"}\n' "$model" "$label" >>"$lines"
    return 0
  fi
  log "round $round/$ROUNDS  $model  $label"
  local common=(--model "$path" --threads "$THREADS" --arena "$(onoff "$arena")"
    --prepacking "$(onoff "$prepack")" --optimization "$opt" --runs "$RUNS"
    --spinning "$(onoff "$SPINNING")"
    --warmup "$WARMUP" --label "$label")
  run "ours $model $v" env "${envs[@]}" "$BIN" "${common[@]}" --images "${imgs[@]}" --batch "$BATCH"
  run "bare $model $v" env "${envs[@]}" "$PY" "$ROOT/bench/bare_ort.py" "${common[@]}" --input "$input"
}

for round in $(seq "$ROUNDS"); do
  for model in $MODELS; do
    for v in $VARIANTS; do measure "$model" "$v"; done
  done
done

elapsed=$(($(date +%s) - start))
"$PY" "$ROOT/bench/encoder_table.py" "$lines" "$OUT" \
  --threads "$THREADS" --batch "$BATCH" --runs "$RUNS" --rounds "$ROUNDS" --elapsed "$elapsed"
log "raw results: ${OUT#"$ROOT"/}; total ${elapsed}s"
