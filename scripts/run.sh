#!/usr/bin/env bash
# What `make run` runs: the service on http://127.0.0.1:${PORT:-8001}.
#
# With MONGO_URI set (in the environment or in .env): just the service, against that
# database. Without it, a self-contained demo:
#   1. a local SecantusDB (scripts/start-mongo.sh; storage .tools/run/mongo, port MONGO_PORT
#      or 27017; an already running one is reused and left running),
#   2. an HTTP server for the demo photos on 127.0.0.1:IMG_PORT (default 8002),
#   3. the demo catalogue (scripts/seed_demo.py, idempotent),
#   4. the service, allowed to fetch images from 127.0.0.1.
# On exit (service ends, Ctrl-C, SIGTERM) it stops what it started.
#
# RUN_DRY=1 does everything except running the service (prints its command), then cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.tools/venv
CARGO=${CARGO:-cargo}
export MODEL_PATH=${MODEL_PATH:-models/out/efficientnet-lite0-int8/model.onnx}

log() { echo "[run] $*" >&2; }

serve() {
  if [ -n "${RUN_DRY:-}" ]; then
    log "dry run; would run: MONGO_URI=$MONGO_URI MODEL_PATH=$MODEL_PATH" \
      "ALLOW_PRIVATE_IMAGE_HOSTS=${ALLOW_PRIVATE_IMAGE_HOSTS:-} $CARGO run --release -- serve"
    return 0
  fi
  # In the background + `wait`: a trapped signal interrupts `wait` at once, whereas bash
  # runs traps only after a foreground command ends. `cargo run` execs the binary, so
  # $! is the service itself.
  "$CARGO" run --release -- serve &
  svc=$!
  wait "$svc"
}

# The service reads .env itself (dotenvy); honour a MONGO_URI set there too.
if [ -z "${MONGO_URI:-}" ] && [ -f .env ] && grep -qE '^[[:space:]]*(export[[:space:]]+)?MONGO_URI=.' .env; then
  log "using MONGO_URI from .env"
  exec_with_own_db=1
fi
if [ -n "${MONGO_URI:-}" ] || [ -n "${exec_with_own_db:-}" ]; then
  if [ -n "${RUN_DRY:-}" ]; then
    log "dry run; would run: MODEL_PATH=$MODEL_PATH $CARGO run --release -- serve"
    exit 0
  fi
  exec "$CARGO" run --release -- serve
fi

MONGO_PORT=${MONGO_PORT:-27017}
IMG_PORT=${IMG_PORT:-8002}
IMAGES=$ROOT/.tools/run/images
svc= img= mongo_started=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$svc" ] && kill -0 "$svc" 2>/dev/null; then
    log "stopping the service"
    kill -TERM "$svc" 2>/dev/null || true
    wait "$svc" 2>/dev/null || true
  fi
  if [ -n "$img" ]; then
    kill -TERM "$img" 2>/dev/null || true
    wait "$img" 2>/dev/null || true
  fi
  if [ -n "$mongo_started" ]; then
    scripts/start-mongo.sh stop "$MONGO_PORT" || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Build first: compile errors show before anything starts, and nothing waits on the build.
[ -n "${RUN_DRY:-}" ] || "$CARGO" build --release

# Only stop on exit a server this script started, not one that was already running.
scripts/start-mongo.sh status "$MONGO_PORT" || mongo_started=1
MONGO_URI=$(scripts/start-mongo.sh "$MONGO_PORT")
export MONGO_URI

mkdir -p "$IMAGES"
if (exec 3<>"/dev/tcp/127.0.0.1/$IMG_PORT") 2>/dev/null; then
  log "port $IMG_PORT is in use; set IMG_PORT to a free port"
  exit 1
fi
"$VENV/bin/python" -m http.server --bind 127.0.0.1 "$IMG_PORT" --directory "$IMAGES" \
  </dev/null >"$ROOT/.tools/run/images.log" 2>&1 &
img=$!
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$IMG_PORT") 2>/dev/null && break
  kill -0 "$img" 2>/dev/null || { log "image server failed: $(tail -n 5 .tools/run/images.log)"; exit 1; }
  sleep 0.1
done
log "demo photos on http://127.0.0.1:$IMG_PORT/"

"$VENV/bin/python" scripts/seed_demo.py --uri "$MONGO_URI" \
  --db "${MONGO_DB_NAME:-test}" --collection "${MONGO_COLLECTION:-products}" \
  --images-dir "$IMAGES" --image-base-url "http://127.0.0.1:$IMG_PORT"

# The demo photos are on 127.0.0.1, which the service refuses by default (SSRF guard).
export ALLOW_PRIVATE_IMAGE_HOSTS=${ALLOW_PRIVATE_IMAGE_HOSTS:-true}
log "service on http://127.0.0.1:${PORT:-8001} (MongoDB $MONGO_URI, model $MODEL_PATH)"
serve
