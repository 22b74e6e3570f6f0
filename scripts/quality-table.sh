#!/usr/bin/env bash
# The README's quality table: WikiText perplexity of SmolLM2-135M-Instruct at seqlen 512 and 2048,
# full precision (the imported model) and every method at w4g64 and w3g64 (group 64: SmolLM2's
# 576-wide rows do not divide by 128), plus w4g32 and w4 per-channel; each row with its change
# against FP, the share of RTN's loss it removes at the same width and group, and the time of its
# calibration pass. Markdown on stdout, one row as soon as it is measured.
#
#   scripts/quality-table.sh [--device cuda] [--max-windows N] [--n-samples 128] [--calib-seqlen 512] [--rows LIST] [--jobs N]
#
# --jobs N measures N rows at once (each row is its own process; on a GPU a 135M model leaves
# most of the card idle, so the whole table fits one device call with --jobs 8); rows are still
# printed in order, each as soon as it and the rows above it are done.
# Defaults follow the paper: the whole wiki text, 128 calibration blocks of 512 tokens from the
# c4 text (it holds 34 such blocks; all of them are used). On a 2-core CPU that takes hours;
# --max-windows and --n-samples shorten it. --rows takes a comma-separated subset of the row
# names below (e.g. --rows rtn4,awq4).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${AWQ_RUN:-target/release/awq-run}
MODEL=models/smollm2-135m-instruct
WIKI=models/data/wiki.utf8
CALIB=models/data/c4.utf8
DEVICE=cpu WINDOWS="" NSAMPLES=128 CSEQ=512 ONLY="" JOBS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --max-windows) WINDOWS="--max-windows $2"; shift 2 ;;
    --n-samples) NSAMPLES=$2; shift 2 ;;
    --calib-seqlen) CSEQ=$2; shift 2 ;;
    --rows) ONLY=",$2,"; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || cargo build --release --quiet
[ -d "$MODEL" ] || scripts/fetch-models.sh "$BIN"

# name | label | --fake-quant | extra eval flags. The RTN row of a width and group comes first:
# the others' share of its loss is measured against it.
ROWS=(
  "rtn4|RTN w4g64|rtn:4:64|"
  "awq4|AWQ w4g64|awq:4:64|"
  "rtn3|RTN w3g64|rtn:3:64|"
  "awq3|AWQ w3g64|awq:3:64|"
  "awq4-default|AWQ w4g64, quantize's defaults (grid on 8 blocks)|awq:4:64|--search-samples 8"
  "awq4-sym|AWQ w4g64, AutoAWQ's clip ([-m, m], 512 strided tokens)|awq:4:64|--clip sym --clip-tokens 512"
  "awq3-sym|AWQ w3g64, AutoAWQ's clip|awq:3:64|--clip sym --clip-tokens 512"
  "gptq4-act|GPTQ w4g64 act-order|gptq:4:64|--act-order --static-groups false"
  "awqgptq4|AWQ+GPTQ w4g64 act-order|awq+gptq:4:64|--act-order"
  "gptq3-act|GPTQ w3g64 act-order|gptq:3:64|--act-order --static-groups false"
  "awqgptq3|AWQ+GPTQ w3g64 act-order|awq+gptq:3:64|--act-order"
  "gptq4-prop|GPTQ w4g64 act-order, error propagation 0.5|gptq:4:64|--act-order --static-groups false --propagate 0.5"
  "awqgptq4-prop|AWQ+GPTQ w4g64 act-order, error propagation 0.5|awq+gptq:4:64|--act-order --propagate 0.5"
  "awqgptq4-propd|AWQ+GPTQ w4g64 act-order, error propagation 0.5 (down_proj too)|awq+gptq:4:64|--act-order --propagate 0.5 --propagate-down-proj true"
  "gptq3-prop|GPTQ w3g64 act-order, error propagation 0.5|gptq:3:64|--act-order --static-groups false --propagate 0.5"
  "awqgptq3-prop|AWQ+GPTQ w3g64 act-order, error propagation 0.5|awq+gptq:3:64|--act-order --propagate 0.5"
  "awqgptq3-propd|AWQ+GPTQ w3g64 act-order, error propagation 0.5 (down_proj too)|awq+gptq:3:64|--act-order --propagate 0.5 --propagate-down-proj true"
  "gptq4|GPTQ w4g64|gptq:4:64|"
  "rtn4g32|RTN w4g32|rtn:4:32|"
  "awq4g32|AWQ w4g32|awq:4:32|"
  "rtn4pc|RTN w4 per-channel|rtn:4:0|"
  "awq4pc|AWQ w4 per-channel|awq:4:0|"
)

# eval prints one JSON line per seqlen: {"perplexity":..,"seqlen":..,...}; the calibration time
# goes to stderr ("fake-quantized with ... in 12.3s").
ppl() { # $@ = extra eval args; prints "ppl512 ppl2048 calib_seconds"
  local err; err=$(mktemp)
  local out
  out=$("$BIN" eval --model "$MODEL" --text "$WIKI" --seqlen 512,2048 --device "$DEVICE" --dtype f32 $WINDOWS --json \
    --calib "$CALIB" --n-samples "$NSAMPLES" --calib-seqlen "$CSEQ" "$@" 2>"$err") || { cat "$err" >&2; rm -f "$err"; return 1; }
  local secs; secs=$(grep -o 'fake-quantized with [^ ]* in [0-9.]*s' "$err" | grep -o '[0-9.]*s$' | tr -d s || true)
  rm -f "$err"
  echo "$out" | python3 -c 'import sys, json; print(" ".join("%.4f" % json.loads(l)["perplexity"] for l in sys.stdin if l.strip()))' | tr -d '\n'
  echo " ${secs:-0}"
}
start=$(date +%s)
TMPD=$(mktemp -d)
# On exit (also a failed row): the launcher and the evaluations it started go too.
trap 'for j in $(jobs -p); do pkill -P "$j" 2>/dev/null; kill "$j" 2>/dev/null; done; rm -rf "$TMPD"' EXIT
# measure NAME ARGS...: the row's "ppl512 ppl2048 secs" into $TMPD/NAME (FAILED if it failed).
measure() {
  local name=$1; shift
  if ppl "$@" > "$TMPD/$name.part"; then mv "$TMPD/$name.part" "$TMPD/$name"; else echo FAILED > "$TMPD/$name"; fi
}
selected() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
(
  measure fp &
  # The slowest methods start first, so that with --jobs the last rows to finish are short ones.
  for method in awq+gptq gptq awq rtn; do
    for row in "${ROWS[@]}"; do
      IFS='|' read -r name label fq extra <<< "$row"
      [ "${fq%%:*}" = "$method" ] && selected "$name" || continue
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
      # shellcheck disable=SC2086
      measure "$name" --fake-quant "$fq" $extra &
    done
  done
  wait
) &
# result NAME: waits for the row's numbers and prints them (fails the script if the row failed).
result() {
  while [ ! -f "$TMPD/$1" ]; do sleep 1; done
  if [ "$(cat "$TMPD/$1")" = FAILED ]; then echo "row $1 failed" >&2; exit 1; fi
  cat "$TMPD/$1"
}
line=$(result fp) || exit 1
read -r FP512 FP2048 _ <<< "$line"
echo "| model | ppl @512 | Δ vs FP | RTN loss removed | ppl @2048 | Δ vs FP | RTN loss removed | calibration |"
echo "|---|---|---|---|---|---|---|---|"
printf '| FP (imported Q4_1 GGUF, f32) | %.3f | | | %.3f | | | |\n' "$FP512" "$FP2048"
declare -A RTN512 RTN2048
for row in "${ROWS[@]}"; do
  IFS='|' read -r name label fq extra <<< "$row"
  selected "$name" || continue
  line=$(result "$name") || exit 1
  read -r P512 P2048 SECS <<< "$line"
  key=${fq#*:}
  if [[ "$fq" == rtn:* ]]; then RTN512[$key]=$P512; RTN2048[$key]=$P2048; fi
  LABEL=$label FQ=$fq python3 -c "
import os
fp512, fp2048, p512, p2048, secs = $FP512, $FP2048, $P512, $P2048, $SECS
r512, r2048 = ${RTN512[$key]:-None}, ${RTN2048[$key]:-None}
rtn = os.environ['FQ'].startswith('rtn')
share = lambda r, p, fp: '' if r is None or rtn else f'{(r - p) / (r - fp) * 100:.1f} %'
print(f\"| {os.environ['LABEL']} | {p512:.3f} | {p512 - fp512:+.3f} | {share(r512, p512, fp512)} | {p2048:.3f} | {p2048 - fp2048:+.3f} | {share(r2048, p2048, fp2048)} | {secs:.0f} s |\")"
done
echo
echo "device: $DEVICE; calibration: $NSAMPLES blocks x $CSEQ tokens of c4.utf8; windows: ${WINDOWS:-all}; $JOBS at once; $(( $(date +%s) - start ))s"
