#!/usr/bin/env bash
# Side-by-side CPU speed: llama.cpp (llama-bench) against awq-run on SmolLM2-135M-Instruct, measured
# in the same run on the same machine; then the same on a TinyLlama-1.1B-shaped model with random
# weights (too big for the caches: the memory-bound comparison point), written as an F16 GGUF by
# scripts/tinyllama_gguf.py (Python package `gguf`) and quantized by llama.cpp's llama-quantize,
# against awq-run's `--dummy-weights --config tinyllama-1.1b --weights w4`.
#
#   scripts/bench-llama-cpp.sh [THREADS]      (default 2)
#
# llama.cpp is the peer, never a dependency: it is built from the llama.cpp sources vendored in
# PyPI's llama-cpp-python sdist, under .dev/llama.cpp (git-ignored), with cmake from PyPI.
# llama.cpp's models are made with its own llama-quantize from the packaged Q4_1 GGUF
# (--allow-requantize: the weights' quality is irrelevant here, only their format).
# Prints a markdown table; run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
DEV=.dev/llama.cpp
B=target/release/awq-run
GGUF=models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$DEV"

if [ ! -x "$DEV/build/bin/llama-bench" ]; then
  [ -x "$DEV/pytools/bin/cmake" ] || python3 -m pip install -q --disable-pip-version-check --target "$DEV/pytools" cmake ninja
  export PATH="$PWD/$DEV/pytools/bin:$PATH" PYTHONPATH="$PWD/$DEV/pytools"
  if [ ! -d "$DEV/src" ]; then
    tmp=$(mktemp -d)
    # The sdist straight from the package index (pip download would build its metadata, which
    # for this package means configuring llama.cpp): the simple index page gives the URL and hash.
    python3 - "$LLAMA_CPP_PYTHON" "$tmp/sdist.tar.gz" <<'PY'
import hashlib, re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=120).read().decode()
m = re.search(r'href="([^"#]+llama_cpp_python-%s\.tar\.gz)#sha256=([0-9a-f]+)"' % re.escape(version), page)
if not m:
    sys.exit(f"llama-cpp-python {version}: no sdist on the index")
data = urllib.request.urlopen(m.group(1), timeout=600).read()
if hashlib.sha256(data).hexdigest() != m.group(2):
    sys.exit("sdist hash mismatch")
open(dest, "wb").write(data)
PY
    tar -xzf "$tmp/sdist.tar.gz" -C "$tmp"
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEV/src"
    rm -rf "$tmp"
  fi
  # -march=native, less AMX: on VMs that list amx_int8 without granting the tile state,
  # llama.cpp's AMX matmul segfaults (seen on this project's Xeon VM).
  nox="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$DEV/src" -B "$DEV/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$nox" -DCMAKE_CXX_FLAGS="$nox" -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
  cmake --build "$DEV/build" --target llama-bench llama-quantize -j "$(nproc)" >/dev/null
fi
[ -x "$B" ] || cargo build --release --quiet
# The fetch script's AWQ checkpoint (speed does not depend on its calibration).
AWQ=models/smollm2-135m-instruct-awq
[ -d "$AWQ" ] || scripts/fetch-models.sh "$B"
# llama.cpp's libraries sit beside its binaries.
export LD_LIBRARY_PATH="$PWD/$DEV/build/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for q in Q4_0 Q4_K_M; do
  [ -f "$DEV/smollm2-$q.gguf" ] || "$DEV/build/bin/llama-quantize" --allow-requantize "$GGUF" "$DEV/smollm2-$q.gguf" "$q" >/dev/null 2>&1
done

# llama_row GGUF LABEL REPEATS: llama.cpp's row, from llama-bench's pp512 (a 512-token prompt)
# and tg128 (128 tokens generated from an empty context).
llama_row() {
  "$DEV/build/bin/llama-bench" -m "$1" -t "$T" -p 512 -n 128 -r "$3" -o json 2>/dev/null \
    | python3 -c '
import json, sys
rows = json.load(sys.stdin)
pp = [r["avg_ts"] for r in rows if r["n_prompt"] > 0]
tg = [r["avg_ts"] for r in rows if r["n_gen"] > 0]
print(f"| llama.cpp | {sys.argv[1]} | {pp[0]:.1f} | {tg[0]:.1f} |")' "$2"
}
# awq_row REPEATS BENCH_ARGS...: awq-run's row, its bench asked the same two things (a 1-token
# prompt for the second).
awq_row() {
  local r=$1; shift
  local pp tg
  pp=$("$B" bench "$@" --threads "$T" --prompt-len 512 --gen 1 --repeats "$r" --json 2>/dev/null)
  tg=$("$B" bench "$@" --threads "$T" --prompt-len 1 --gen 128 --repeats "$r" --json 2>/dev/null)
  python3 -c '
import json, sys
pp, tg = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("| awq-run | %s (%s) | %.1f | %.1f |" % (pp["weights"], pp["cpu_kernel"], pp["prefill_tok_s"], tg["decode_tok_s"]))' "$pp" "$tg"
}

echo "| engine | weights | pp512 tok/s | tg128 tok/s |"
echo "|---|---|---|---|"
for q in Q4_0 Q4_K_M; do
  llama_row "$DEV/smollm2-$q.gguf" "$q" 5
done
for args in "--model models/smollm2-135m-instruct" "--model models/smollm2-135m-instruct --requant q4_0" \
  "--model $AWQ --cpu-kernel exact --cpu-head f16" "--model $AWQ --cpu-kernel w4a8 --cpu-head int8"; do
  # shellcheck disable=SC2086
  awq_row 5 $args
done

TL=$DEV/tinyllama-Q4_0.gguf
if [ ! -f "$TL" ]; then
  python3 -c 'import gguf' 2>/dev/null || python3 -m pip install --quiet gguf
  python3 scripts/tinyllama_gguf.py "$DEV/tinyllama-f16.gguf"
  "$DEV/build/bin/llama-quantize" "$DEV/tinyllama-f16.gguf" "$TL" Q4_0 >/dev/null 2>&1
  rm -f "$DEV/tinyllama-f16.gguf"
fi
echo
echo "| engine (TinyLlama-1.1B shape, random weights) | weights | pp512 tok/s | tg128 tok/s |"
echo "|---|---|---|---|"
llama_row "$TL" Q4_0 3
for g in 128 64; do
  awq_row 3 --dummy-weights --config tinyllama-1.1b --weights w4 --group-size "$g"
done
echo
echo "threads: $T; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON"
