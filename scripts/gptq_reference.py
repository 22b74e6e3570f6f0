#!/usr/bin/env python3
"""An independent GPTQ pass in PyTorch with the reference implementation's semantics, beside
scripts/awq_reference.py (whose model code, tokens and perplexity it reuses), to tell a difference
in awq-run's pass from a property of the model.

The algorithm as the GPTQ paper and its reference code run it: per linear layer H = 2/n·XᵀX over
the calibration tokens it sees; dead inputs (diag H = 0) zeroed; optional activation order
(columns by decreasing diag H; groups then follow that order unless --static-groups); dampening
--damp × mean(diag H); U = the upper Cholesky factor of H⁻¹; columns in blocks of 128, each
rounded with its group's min/max quantizer, the group's parameters found when its first column is
reached from the weights as the lazy updates have left them (the reference reads the weight matrix,
which within the current block does not yet carry the block's own column updates: --group-params
block; --group-params current uses the fully updated columns, as awq-run does); the error (w − q)/U[j,j]
spread over the block's later columns, the block's errors over the rest at its end. True-sequential:
q/k/v, then o, then gate/up, then down, each on the inputs the already quantized layers produce;
the quantized block's output feeds the next block.

  python3 scripts/gptq_reference.py --model models/smollm2-135m-instruct --tokens DIR --bits 4
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import awq_reference as ref  # noqa: E402

STAGES = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
INPUT_OF = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj", "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}


def group_params(w, bits, sym):
    """Per row of `w` (one group's columns) the scale and zero of the min/max quantizer."""
    qmax = 2**bits - 1
    if sym:
        m = w.abs().amax(dim=1)
        scale = (2 * m / qmax).clamp(min=1e-5)
        zero = torch.full_like(scale, float((qmax + 1) // 2))
    else:
        mx, mn = w.amax(dim=1).clamp(min=0), w.amin(dim=1).clamp(max=0)
        scale = ((mx - mn) / qmax).clamp(min=1e-5)
        zero = torch.round(-mn / scale)
    return scale, zero


def quantize_col(w, scale, zero, bits):
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def gptq_layer(W, H, args):
    """GPTQ of one weight [out, in] against Hessian H [in, in]; returns the fake-quantized weight."""
    W = W.clone().double()
    H = H.clone().double()
    cols = W.shape[1]
    g = args.group_size if args.group_size > 0 else cols
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = None
    if args.act_order and args.static_groups:
        static = [group_params(W[:, i : i + g], args.bits, args.sym) for i in range(0, cols, g)]
    perm = None
    if args.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += args.damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    params = None
    block = 128
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                params = static[(perm[j].item() if perm is not None else j) // g]
            elif j % g == 0:
                src = W[:, j : j + g].clone() if args.group_params == "block" else torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                params = group_params(src, args.bits, args.sym)
            w = W1[:, i]
            q = quantize_col(w, params[0], params[1], args.bits)
            Q[:, j] = q
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.float()


def hessian(x):
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 / x.shape[0] * (x.t() @ x)


def gptq_block(block, x, args):
    w = block.w
    stages = STAGES if args.true_sequential else [sum(STAGES, [])]
    for names in stages:
        cap = {}
        ref.chunked(lambda c: block.forward(c, cap), x, args.batch)
        feats = {k: torch.cat(v, dim=0) for k, v in cap.items()}
        hs = {}
        for n in names:
            f = INPUT_OF[n]
            if f not in hs:
                hs[f] = hessian(feats[f])
            w[n] = gptq_layer(w[n], hs[f], args)
    return ref.chunked(lambda c: block.forward(c), x, args.batch)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="directory with calib.u32 and eval.u32 (examples/awq_tokens)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    ap.add_argument("--group-params", default="block", choices=["block", "current"])
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, help="use only the first N blocks (a smoke test)")
    ap.add_argument("--calib-offset", type=int, default=0, help="skip the first N calibration blocks (another cut of the same text)")
    ap.add_argument("--calib-blocks", type=int)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = json.load(open(f"{args.model}/config.json"))
    sd = ref.load_safetensors(f"{args.model}/model.safetensors")
    dev = args.device
    rope = ref.Rope(cfg, max(args.calib_seqlen, args.seqlen), dev)
    embed = sd["model.embed_tokens.weight"].to(dev)
    blocks = []
    for i in range(args.layers or cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w = {k[len(p):].split(".")[-2]: v.to(dev) for k, v in sd.items() if k.startswith(p) and k.endswith(".weight")}
        blocks.append(ref.Block(w, cfg, rope))
    t0 = time.time()
    with torch.no_grad():
        if args.method == "gptq":
            calib = ref.read_u32(f"{args.tokens}/calib.u32").reshape(-1, args.calib_seqlen)[args.calib_offset :][: args.calib_blocks].to(dev)
            x = embed[calib].float()
            for b in blocks:
                x = gptq_block(b, x, args)
        else:
            for b in blocks:
                for n in INPUT_OF:
                    b.w[n] = ref.fake_quant(b.w[n], args.bits, args.group_size)
    secs = time.time() - t0
    ppl, at = ref.perplexity(embed, blocks, sd["model.norm.weight"].to(dev), cfg["rms_norm_eps"], ref.read_u32(f"{args.tokens}/eval.u32"), args.seqlen, args.max_windows, dev, also_at=(16,))
    flags = " ".join(f for f, on in [("act-order", args.act_order), ("static", args.static_groups), ("sym", args.sym), ("seq", args.true_sequential)] if on)
    print(f"{args.method} w{args.bits}g{args.group_size} damp {args.damp} [{flags}] group-params {args.group_params}: perplexity {ppl:.4f} over {args.max_windows} windows, {at.get(16, float('nan')):.4f} over 16 ({secs:.1f}s)")


if __name__ == "__main__":
    main()
