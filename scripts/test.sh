#!/usr/bin/env bash
# The whole test suite: fetches the real model and texts (quick when present), then runs every
# test in release mode (the AWQ and real-model tests are numeric work).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building awq-run (release; the first build takes several minutes on 2 cores)"
cargo build --release --quiet
scripts/fetch-models.sh target/release/awq-run
cargo test --release
