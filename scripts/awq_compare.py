#!/usr/bin/env python3
"""Sets two AWQ reports side by side, block by block: the ratio each chose per scale group (with
the loss each would have had at the other's choice) and the mean clip shrink per layer.

  python3 scripts/awq_compare.py ours.json reference.json

Reports: a checkpoint's awq_report.json, `awq-run eval --fake-quant awq:… --report FILE`, or
scripts/awq_reference.py --report FILE.
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = (json.load(open(p)) for p in sys.argv[1:])
    print(f"A = {sys.argv[1]}\nB = {sys.argv[2]}")
    print(f"{'block':>5} {'group':<26} {'ratio A':>8} {'ratio B':>8} {'loss A@A':>11} {'loss B@B':>11} {'A@B / A@A':>10}")
    differ = 0
    for ga, gb in zip(a["groups"], b["groups"]):
        label = f"{ga['prev_op']}->{'/'.join(l.replace('_proj', '') for l in ga['layers'])}"
        ra, rb = ga["ratio"], gb["ratio"]
        la, lb = ga["losses"], gb["losses"]
        n = len(la)
        # A's loss curve evaluated at B's choice, over A's best: how much worse B's choice is for A.
        cross = la[round(rb * n)] / min(la) if round(rb * n) < n else float("nan")
        differ += ra != rb
        mark = " *" if ra != rb else ""
        print(f"{ga['block']:>5} {label:<26} {ra:>8.2f} {rb:>8.2f} {min(la):>11.4e} {min(lb):>11.4e} {cross:>10.4f}{mark}")
    print(f"{differ} of {min(len(a['groups']), len(b['groups']))} groups chose a different ratio")
    ca = {(l["block"], l["layer"]): l.get("clip_shrink") for l in a.get("layers", [])}
    cb = {(l["block"], l["layer"]): l.get("clip_shrink") for l in b.get("layers", [])}
    keys = [k for k in ca if ca[k] is not None and cb.get(k) is not None]
    if keys:
        print(f"\n{'block':>5} {'layer':<10} {'shrink A':>9} {'shrink B':>9}")
        for k in keys:
            print(f"{k[0]:>5} {k[1]:<10} {ca[k]:>9.4f} {cb[k]:>9.4f}")
        mean = lambda d: sum(d[k] for k in keys) / len(keys)
        print(f"mean clip shrink: A {mean(ca):.4f}, B {mean(cb):.4f}")


if __name__ == "__main__":
    main()
