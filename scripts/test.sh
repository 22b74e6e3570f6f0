#!/usr/bin/env bash
# The whole test suite: fetches the real model and texts (quick when present), then runs every
# test in release mode (the AWQ and real-model tests are numeric work).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building awq-run (release; the first build takes several minutes on 2 cores)"
cargo build --release --quiet
scripts/fetch-models.sh target/release/awq-run
# The chat page test drives Debian's headless chromium through chromedriver.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium and chromedriver for the chat page test (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || echo "note: installing chromium failed; tests/chat_page.rs will say it is skipped"
fi
cargo test --release
