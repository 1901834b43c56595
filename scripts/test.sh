#!/usr/bin/env bash
# The README's test command (`make test`): builds the tests, then runs the whole suite in
# a network namespace of its own where only loopback exists (tests/common/netns.rs says
# why), so no test can send traffic off this machine whatever URL it makes up. Without
# `unshare` (not root), the suite runs as is, and the tests whose URLs the service fetches
# each try to isolate themselves and fail if they cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
"$CARGO" test --all-targets --no-run "$@"
if unshare -n true 2>/dev/null && command -v ip >/dev/null; then
  echo "[test] running the suite in a loopback-only network namespace" >&2
  exec unshare -n -- sh -c 'ip link set lo up && exec "$0" test --all-targets --offline "$@"' "$CARGO" "$@"
fi
echo "[test] cannot create a network namespace (needs root and iproute2): running without one" >&2
exec "$CARGO" test --all-targets "$@"
