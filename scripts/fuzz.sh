#!/usr/bin/env bash
# Fuzzes every parser that reads a user's file or a server request (fuzz/src/lib.rs has one
# target each: gguf, model_dir, awq_linear, tokenizer, chat_template, configs, request,
# tool_calls) with cargo fuzz (libFuzzer), SECONDS
# per target, and prints executions and crashes per target.
#
#   scripts/fuzz.sh 60                 # 60 s per target, one target after another
#   FUZZ_JOBS=2 scripts/fuzz.sh 600    # two targets at a time (one per core)
#   scripts/fuzz.sh 60 gguf tokenizer  # only these targets
#
# Needs the nightly toolchain (`rustup toolchain install nightly`, as rustup runs it; cargo fuzz
# is installed from crates.io when missing). The seeds are written by tests/fuzz_corpus.rs from
# the tiny test model and, after scripts/fetch-models.sh, from the real SmolLM2 files; the
# growing corpus stays in fuzz/corpus/ (git-ignored) between runs. A crash leaves its input in
# fuzz/artifacts/TARGET/: fix the bug, then copy the input to fuzz/regressions/TARGET/ (committed),
# where `cargo test --test fuzz_corpus` runs it on every CI run.
#
# Built without a sanitizer (`-s none`, the code under test is safe Rust over candle's kernels)
# and with debug assertions, so integer overflow panics too; libFuzzer reports panics, inputs that
# need more than 2 GB (-rss_limit_mb) and inputs slower than 10 s (-timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(gguf model_dir awq_linear tokenizer chat_template configs request tool_calls)
JOBS=${FUZZ_JOBS:-1}

if ! rustup run nightly cargo --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

echo "writing seeds (tests/fuzz_corpus.rs)"
rm -rf fuzz/seeds
FUZZ_SEED_DIR="$PWD/fuzz/seeds" cargo test --release --quiet --test fuzz_corpus -- --ignored write_seeds >/dev/null
echo "building the fuzz targets (cargo +nightly fuzz build; the first build takes several minutes)"
cargo +nightly fuzz build -s none --debug-assertions >/dev/null

LOGS=fuzz/target/logs
mkdir -p "$LOGS"
run_one() {
  local t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "fuzz/regressions/$t"
  local before; before=$(ls "fuzz/artifacts/$t" | wc -l)
  local start; start=$(date +%s)
  # Scratch files of the model_dir target go to memory where /dev/shm exists.
  TMPDIR=$([ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}") \
  cargo +nightly fuzz run -s none --debug-assertions "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/regressions/$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -max_len=4194304 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$LOGS/$t.log" 2>&1 || true
  local execs; execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$LOGS/$t.log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  local after; after=$(ls "fuzz/artifacts/$t" | wc -l)
  local corpus; corpus=$(ls "fuzz/corpus/$t" | wc -l)
  local secs=$(( $(date +%s) - start ))
  # Every run is added to a history, so the totals per target span runs (libFuzzer stops a
  # run at its first crash).
  printf '%s\t%s\t%s\t%s\n' "$t" "$secs" "${execs:-0}" "$((after - before))" >>"$LOGS/history.tsv"
  printf '%-14s %6ss %12s executions %6s corpus files %3s new crashes\n' "$t" "$secs" "${execs:-0}" "$corpus" "$((after - before))"
}
export -f run_one
export SECS LOGS
printf '%s\n' "${TARGETS[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'
echo "totals over every run in $LOGS/history.tsv:"
awk -F'\t' '{s[$1]+=$2; e[$1]+=$3; c[$1]+=$4} END {for (t in s) printf "  %-14s %7d s %12d executions %3d crashes\n", t, s[t], e[t], c[t]}' "$LOGS/history.tsv" | sort
open=$(find fuzz/artifacts -type f 2>/dev/null | wc -l)
echo "open crash inputs in fuzz/artifacts: $open (logs in $LOGS)"
[ "$open" -eq 0 ]
