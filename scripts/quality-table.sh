#!/usr/bin/env bash
# The README's quality table: WikiText perplexity of SmolLM2-135M-Instruct at seqlen 512 and 2048,
# full precision (the imported model) and RTN / AWQ at w4g64 and w3g64 (group 64: SmolLM2's
# 576-wide rows do not divide by 128), each with its change against FP. Markdown on stdout.
#
#   scripts/quality-table.sh [--device cuda] [--max-windows N] [--n-samples 128] [--calib-seqlen 512]
#
# Defaults follow the paper: the whole wiki text, 128 calibration blocks of 512 tokens from the
# c4 text. On a 2-core CPU that takes hours; --max-windows and --n-samples shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${AWQ_RUN:-target/release/awq-run}
MODEL=models/smollm2-135m-instruct
WIKI=models/data/wiki.utf8
CALIB=models/data/c4.utf8
DEVICE=cpu WINDOWS="" NSAMPLES=128 CSEQ=512
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --max-windows) WINDOWS="--max-windows $2"; shift 2 ;;
    --n-samples) NSAMPLES=$2; shift 2 ;;
    --calib-seqlen) CSEQ=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || cargo build --release --quiet
[ -d "$MODEL" ] || scripts/fetch-models.sh "$BIN"

# eval prints one JSON line per seqlen: {"perplexity":..,"seqlen":..,...}
ppl() { # $@ = extra eval args; prints "ppl512 ppl2048"
  "$BIN" eval --model "$MODEL" --text "$WIKI" --seqlen 512,2048 --device "$DEVICE" --dtype f32 $WINDOWS --json \
    --calib "$CALIB" --n-samples "$NSAMPLES" --calib-seqlen "$CSEQ" "$@" \
    | python3 -c 'import sys, json; print(" ".join("%.4f" % json.loads(l)["perplexity"] for l in sys.stdin if l.strip()))'
}
start=$(date +%s)
read -r FP512 FP2048 < <(ppl)
rows=""
for cfg in rtn:4:64 awq:4:64 rtn:3:64 awq:3:64; do
  read -r P512 P2048 < <(ppl --fake-quant "$cfg")
  IFS=: read -r m b g <<< "$cfg"
  name="$(echo "$m" | tr a-z A-Z) w${b}g${g}"
  rows+=$(python3 -c "
fp512, fp2048, p512, p2048 = $FP512, $FP2048, $P512, $P2048
print(f'| $name | {p512:.3f} | {p512 - fp512:+.3f} | {p2048:.3f} | {p2048 - fp2048:+.3f} |')")$'\n'
done
echo "| model | ppl @512 | Δ vs FP | ppl @2048 | Δ vs FP |"
echo "|---|---|---|---|---|"
printf '| FP (imported Q4_1 GGUF, f32) | %.3f | | %.3f | |\n' "$FP512" "$FP2048"
printf '%s' "$rows"
echo
echo "device: $DEVICE; calibration: $NSAMPLES blocks x $CSEQ tokens of c4.utf8; windows: ${WINDOWS:-all}; $(( $(date +%s) - start ))s"
