#!/usr/bin/env bash
# Starts `awq-run serve` on a free loopback port, runs `awq-run bench-serve` against it, stops it.
#   scripts/bench-serve.sh [serve flags...] -- [bench-serve flags...]
# e.g. scripts/bench-serve.sh --model models/smollm2-135m-instruct-awq --max-batch 8 -- --clients 1,4,8 --gen 64
# AWQ_RUN (default target/release/awq-run) names the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${AWQ_RUN:-target/release/awq-run}
SERVE=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SERVE+=("$1"); shift; done
[ $# -gt 0 ] && shift
log=$(mktemp)
"$BIN" serve --host 127.0.0.1 --port 0 "${SERVE[@]}" >"$log" 2>&1 &
pid=$!
# On the way out: the server's warnings (a failed graph capture, say), then its log removed.
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; grep -i "warning" "$log" >&2 || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  url=$(grep -o 'http://[0-9.:]*' "$log" | head -1 || true)
  [ -n "$url" ] && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.5
done
[ -n "$url" ] || { echo "the server did not start:"; cat "$log"; exit 1; }
grep -v '^serving' "$log" >&2 || true
"$BIN" bench-serve --url "$url" "$@"
