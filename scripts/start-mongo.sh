#!/usr/bin/env bash
# Starts a local MongoDB-compatible server (SecantusDB, installed by `make setup`) in the
# background for `make run` and benchmarks, waits until it answers `ping`, and prints the
# connection string to use (the only line on stdout; messages go to stderr).
#
#   scripts/start-mongo.sh [PORT] [STORAGE_DIR]   start (no-op if already running)
#   scripts/start-mongo.sh status [PORT]          exit 0 if a server answers on PORT
#   scripts/start-mongo.sh stop [PORT]            stop the server this script started
#
# PORT defaults to $MONGO_PORT or 27017 (not $PORT: that is the service's own port),
# STORAGE_DIR to $MONGO_STORAGE or .tools/run/mongo. The pid file and log are
# .tools/run/mongo-PORT.{pid,log}. Data persists across restarts.
#
# SecantusDB is GPL: it only ever runs as this separate process.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.tools/venv
RUN_DIR=$ROOT/.tools/run

cmd=start
case "${1:-}" in start | status | stop) cmd=$1; shift ;; esac
PORT=${1:-${MONGO_PORT:-27017}}
STORAGE=${2:-${MONGO_STORAGE:-$RUN_DIR/mongo}}
PID_FILE=$RUN_DIR/mongo-$PORT.pid
LOG=$RUN_DIR/mongo-$PORT.log
# directConnection: talk to this one server. It advertises itself as the primary of a
# one-node replica set, which discovery would also handle, but direct is simpler.
URI="mongodb://127.0.0.1:$PORT/?directConnection=true"

log() { echo "[start-mongo] $*" >&2; }

if [ ! -x "$VENV/bin/secantusd-py" ]; then
  log "$VENV/bin/secantusd-py missing: run \`make setup\`"
  exit 1
fi

# wait_ready PID SECONDS: 0 once the server answers `ping`, 1 if PID exits or time is up.
wait_ready() {
  "$VENV/bin/python" - "$URI" "$1" "$2" <<'PYEOF' 2>/dev/null
import os, sys, time, pymongo
uri, pid, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:  # gone, or a zombie (state Z) not yet reaped
        if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            sys.exit(1)
    except FileNotFoundError:
        sys.exit(1)
    try:
        pymongo.MongoClient(uri, serverSelectionTimeoutMS=250).admin.command("ping")
        sys.exit(0)
    except pymongo.errors.PyMongoError:
        time.sleep(0.05)
sys.exit(1)
PYEOF
}

# ping [timeout_ms]: 0 if a MongoDB server answers on PORT.
ping() {
  "$VENV/bin/python" - "$URI" "$PORT" "${1:-500}" <<'PYEOF' 2>/dev/null
import socket, sys
uri, port, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# A closed port fails at once here; pymongo would retry until its timeout.
socket.create_connection(("127.0.0.1", port), timeout / 1000).close()
import pymongo
client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout, connectTimeoutMS=timeout)
client.admin.command("ping")
PYEOF
}

# alive PID: the process exists and is not a zombie waiting to be reaped by init.
alive() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

# Our pid from the pid file, if that process is alive and still secantusd (pids get reused).
our_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid=$(cat "$PID_FILE")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "secantusd-py.*--port $PORT" || return 1
  echo "$pid"
}

case $cmd in
status)
  ping 1000
  exit
  ;;
stop)
  if pid=$(our_pid); then
    log "stopping pid $pid"
    kill -TERM "$pid"
    # A clean stop flushes the journal and takes ~0.3 s; SIGKILL after 10 s.
    for _ in $(seq 100); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "still running, killing"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    log "no server started by this script on port $PORT"
  fi
  rm -f "$PID_FILE"
  exit 0
  ;;
esac

mkdir -p "$RUN_DIR" "$STORAGE"
if ping 1000; then
  if pid=$(our_pid); then
    log "already running on port $PORT (pid $pid)"
  else
    log "a MongoDB server not started by this script already answers on port $PORT; using it"
  fi
  echo "$URI"
  exit 0
fi
rm -f "$PID_FILE"
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  log "port $PORT is in use by something that does not answer as MongoDB; pick another (MONGO_PORT)"
  exit 1
fi

log "starting SecantusDB on 127.0.0.1:$PORT, storage $STORAGE, log $LOG"
# An explicit empty config: no auto-discovery of ./secantusd.toml or ~/.secantus.
: >"$RUN_DIR/secantusd-empty.toml"
# nohup + stdin from /dev/null: keeps running after this script and its terminal are gone;
# `run.sh` stops it by pid when it exits.
nohup "$VENV/bin/secantusd-py" --config "$RUN_DIR/secantusd-empty.toml" \
  --host 127.0.0.1 --port "$PORT" --storage-path "$STORAGE" \
  --cache-size "${MONGO_CACHE_SIZE:-256M}" --log-level WARNING \
  </dev/null >>"$LOG" 2>&1 &
pid=$!
echo "$pid" >"$PID_FILE"

# Ready in about 1 s; bounded at 30 s. One python process polls: pymongo takes ~0.2 s
# to import, too slow to start per attempt.
if wait_ready "$pid" 30; then
  log "ready (pid $pid)"
  echo "$URI"
  exit 0
fi
if alive "$pid"; then
  log "not ready after 30 s; stopping it. End of $LOG:"
  kill -KILL "$pid" 2>/dev/null || true
else
  log "SecantusDB exited during start-up (port $PORT taken?). End of $LOG:"
fi
tail -n 20 "$LOG" >&2
rm -f "$PID_FILE"
exit 1
