#!/usr/bin/env python3
"""An independent AWQ pass in PyTorch with AutoAWQ's semantics, for checking awq-run layer by layer.

It reads an imported model directory (config.json + model.safetensors, as `awq-run import` writes)
and the token files of `cargo run --example awq_tokens`, runs the AWQ search block by block (duo
scaling, the 20-point ratio grid, the clip search on every linear but q/k, every block calibrated on
the full-precision output of the block before), evaluates the fake-quantized model's perplexity on
the same windows as `awq-run eval`, and writes a report in the layout of awq-run's awq_report.json
(`groups[].ratio`, `groups[].losses`, `layers[].clip_shrink`) so that scripts/awq_compare.py can set the two side by
side. `--dtype float16` runs the search in half precision as AutoAWQ does on a GPU.

  python3 scripts/awq_reference.py --model models/smollm2-135m-instruct --tokens DIR \
      --bits 3 --group-size 64 --seqlen 512 --max-windows 16 --report ref_w3.json
"""
import argparse
import json
import math
import struct
import time

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_safetensors(path):
    """The tensors of a .safetensors file (read by hand: the format is a JSON header and raw data)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        t = torch.frombuffer(data[a:b], dtype=DTYPES[info["dtype"]]) if b > a else torch.empty(0)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def read_u32(path):
    with open(path, "rb") as f:
        raw = f.read()
    return torch.tensor(struct.unpack(f"<{len(raw) // 4}I", raw), dtype=torch.long)


class Rope:
    def __init__(self, cfg, seqlen, device):
        d = cfg["hidden_size"] // cfg["num_attention_heads"]
        inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        f = torch.outer(torch.arange(seqlen, dtype=torch.float64), inv)
        emb = torch.cat([f, f], dim=-1)
        self.cos, self.sin = emb.cos().float().to(device), emb.sin().float().to(device)

    def apply(self, x):  # [b, h, t, d]
        t = x.shape[2]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[:t].to(x.dtype) + rot * self.sin[:t].to(x.dtype)


def rms_norm(x, w, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.float()).to(x.dtype)


class Block:
    """One LLaMA decoder block on plain tensors: `w` maps HF names (q_proj, …) to weights."""

    def __init__(self, w, cfg, rope):
        self.w, self.cfg, self.rope = w, cfg, rope
        self.h = cfg["num_attention_heads"]
        self.kvh = cfg.get("num_key_value_heads") or self.h
        self.d = cfg["hidden_size"] // self.h
        self.eps = cfg["rms_norm_eps"]

    def attention_core(self, x, w):
        """Attention up to o_proj's input; `w` may override q/k/v."""
        b, t, _ = x.shape
        q = F.linear(x, w["q_proj"]).view(b, t, self.h, self.d).transpose(1, 2)
        k = F.linear(x, w["k_proj"]).view(b, t, self.kvh, self.d).transpose(1, 2)
        v = F.linear(x, w["v_proj"]).view(b, t, self.kvh, self.d).transpose(1, 2)
        q, k = self.rope.apply(q), self.rope.apply(k)
        rep = self.h // self.kvh
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(x.dtype)
        return o.transpose(1, 2).reshape(b, t, self.h * self.d)

    def attention(self, x, w):
        return F.linear(self.attention_core(x, w), w["o_proj"])

    def mlp_core(self, x, w):
        return F.silu(F.linear(x, w["gate_proj"])) * F.linear(x, w["up_proj"])

    def mlp(self, x, w):
        return F.linear(self.mlp_core(x, w), w["down_proj"])

    def forward(self, x, capture=None):
        w = self.w
        xa = rms_norm(x, w["input_layernorm"], self.eps)
        core = self.attention_core(xa, w)
        h = x + F.linear(core, w["o_proj"])
        xm = rms_norm(h, w["post_attention_layernorm"], self.eps)
        mc = self.mlp_core(xm, w)
        if capture is not None:
            for k, v in (("q_proj", xa), ("o_proj", core), ("gate_proj", xm), ("down_proj", mc)):
                capture.setdefault(k, []).append(v)
        return h + F.linear(mc, w["down_proj"])


ZERO_TIE = "native"


def fake_quant(w, bits, group):
    """Asymmetric group round-to-nearest: scale = (max-min)/(2^b-1), zero = -round(min/scale).

    ZERO_TIE (--zero-tie) chooses how the zero point is rounded: `native` in the working dtype,
    as AutoAWQ does; `even`/`down` from an exact (f64) -min/scale, ties to even or downwards;
    `best`, per group the one of the two neighbouring integers that reconstructs the group better. A
    symmetric clip [-m, m] puts -min/scale exactly on a tie (the code range 2^b-1 is odd)."""
    shape = w.shape
    g = group if group > 0 else shape[-1]
    x = w.reshape(-1, g)
    mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    qmax = 2**bits - 1
    scale = (mx - mn).clamp(min=1e-5) / qmax
    if ZERO_TIE == "native":
        zero = (-torch.round(mn / scale)).clamp(0, qmax)
    elif ZERO_TIE == "best":
        # Both integer zero points around -min/scale; per group the one that reconstructs better.
        z = -mn.double() / ((mx.double() - mn.double()).clamp(min=1e-5) / qmax)
        outs = []
        for zi in (torch.floor(z), torch.ceil(z)):
            zi = zi.clamp(0, qmax).to(x.dtype)
            dq = ((torch.round(x / scale) + zi).clamp(0, qmax) - zi) * scale
            outs.append((dq, (dq - x).float().pow(2).sum(dim=1, keepdim=True)))
        return torch.where(outs[0][1] <= outs[1][1], outs[0][0], outs[1][0]).reshape(shape)
    else:
        z = -mn.double() / ((mx.double() - mn.double()).clamp(min=1e-5) / qmax)
        z = torch.round(z) if ZERO_TIE == "even" else torch.ceil(z - 0.5)
        zero = z.clamp(0, qmax).to(x.dtype)
    q = (torch.round(x / scale) + zero).clamp(0, qmax)
    return ((q - zero) * scale).reshape(shape)


def chunked(f, x, batch):
    return torch.cat([f(x[i : i + batch]) for i in range(0, x.shape[0], batch)], dim=0)


def search_scale(block, names, x, measure, args):
    """The ratio grid for one group of layers sharing input `x`: returns (scales, ratio, losses)."""
    w = block.w
    g = args.group_size
    cat = torch.cat([w[n] for n in names], dim=0)
    ga = cat.abs().reshape(-1, g if g > 0 else cat.shape[1])
    w_mean = (ga / (ga.amax(dim=1, keepdim=True) + 1e-6)).reshape(cat.shape).mean(0)
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0).to(x.dtype)
    fp = measure(dict(w))
    losses, best = [], (math.inf, None, None)
    for i in range(args.n_grid):
        r = i / args.n_grid
        s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[torch.isinf(s) | torch.isnan(s)] = 1
        trial = dict(w)
        for n in names:
            trial[n] = fake_quant(w[n] * s.view(1, -1), args.bits, g) / s.view(1, -1)
        out = measure(trial)
        loss = (fp - out).float().pow(2).sum().item() / fp.numel()
        losses.append(loss)
        if loss < best[0]:
            best = (loss, r, s.clone())
    return best[2], best[1], losses


def search_clip(w, x, args, n_grid=20, max_shrink=0.5, n_tokens=512):
    """Per (row, group) the shrink of the range that minimizes the group's partial-output error."""
    out_f, in_f = w.shape
    g = args.group_size if args.group_size > 0 else in_f
    x = x.reshape(-1, in_f)
    x = x[:: max(1, x.shape[0] // n_tokens)].reshape(1, -1, in_f // g, g)
    wg = w.reshape(out_f, 1, in_f // g, g)
    best_all = []
    for o0 in range(0, out_f, 64):
        wc = wg[o0 : o0 + 64]
        org_max = wc.abs().amax(dim=-1, keepdim=True)
        best = org_max.clone()
        min_err = torch.full_like(org_max, math.inf)
        org_out = (x * wc).sum(dim=-1)
        for i in range(int(max_shrink * n_grid)):
            mv = org_max * (1 - i / n_grid)
            q = fake_quant(torch.clamp(wc, -mv, mv), args.bits, g)
            err = ((x * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_err.shape)
            better = err < min_err
            min_err[better] = err[better]
            best[better] = mv[better]
        best_all.append(best)
    return torch.cat(best_all, dim=0).squeeze(1)  # [out, 1, groups, 1] -> [out, groups, 1]


def search_clip_asym(w, x, args, n_grid=20, max_shrink=0.5, n_tokens=512):
    """Per (row, group) the lower and upper bounds, each shrunk toward zero on its own (from the
    group's min and max, by i/n_grid for i < max_shrink·n_grid), that minimize the group's
    partial-output error; returns (lo, hi), each [out, groups, 1]."""
    out_f, in_f = w.shape
    g = args.group_size if args.group_size > 0 else in_f
    x = x.reshape(-1, in_f)
    x = x[:: max(1, x.shape[0] // n_tokens)].reshape(1, -1, in_f // g, g)
    wg = w.reshape(out_f, 1, in_f // g, g)
    los, his = [], []
    steps = int(max_shrink * n_grid)
    for o0 in range(0, out_f, 64):
        wc = wg[o0 : o0 + 64]
        org_hi = wc.amax(dim=-1, keepdim=True)
        org_lo = wc.amin(dim=-1, keepdim=True)
        best_lo, best_hi = org_lo.clone(), org_hi.clone()
        min_err = torch.full_like(org_hi, math.inf)
        org_out = (x * wc).sum(dim=-1)
        for i in range(steps):
            hi = org_hi * (1 - i / n_grid) if args.clip == "asym" else org_hi.abs().maximum(org_lo.abs()) * (1 - i / n_grid)
            for j in range(steps if args.clip == "asym" else 1):
                lo = org_lo * (1 - j / n_grid) if args.clip == "asym" else -hi
                q = fake_quant(torch.clamp(wc, lo, hi), args.bits, g)
                err = ((x * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_err.shape)
                better = err < min_err
                min_err[better] = err[better]
                best_lo[better] = lo.expand_as(best_lo)[better]
                best_hi[better] = hi.expand_as(best_hi)[better]
        los.append(best_lo)
        his.append(best_hi)
    return torch.cat(los, dim=0).squeeze(1), torch.cat(his, dim=0).squeeze(1)


def search_clip_all_tokens(w, x, args, n_grid=20, max_shrink=0.5):
    """The clip search over every calibration token: per group the error of a candidate d = Q(c) - w
    is d^T G d with G = X_g^T X_g / T, the group's Gram matrix. Symmetric or asymmetric candidates
    as --clip says; returns (lo, hi), each [out, groups, 1]."""
    out_f, in_f = w.shape
    g = args.group_size if args.group_size > 0 else in_f
    xg = x.reshape(-1, in_f // g, g).float()
    gram = torch.einsum("tgi,tgj->gij", xg, xg) / xg.shape[0]
    steps = int(max_shrink * n_grid)
    los, his = [], []
    for o0 in range(0, out_f, 256):
        wc = w[o0 : o0 + 256].reshape(-1, in_f // g, g)
        mx, mn = wc.amax(dim=-1, keepdim=True), wc.amin(dim=-1, keepdim=True)
        amax = mx.abs().maximum(mn.abs())
        best = torch.full(mx.shape, math.inf, device=w.device)
        best_lo, best_hi = mn.clone(), mx.clone()
        for i in range(steps):
            for j in range(steps if args.clip == "asym" else 1):
                if args.clip == "asym":
                    lo, hi = mn * (1 - j / n_grid), mx * (1 - i / n_grid)
                else:
                    hi = amax * (1 - i / n_grid)
                    lo = -hi
                d = fake_quant(torch.clamp(wc, lo, hi), args.bits, g) - wc
                err = torch.einsum("rgi,gij,rgj->rg", d, gram, d).unsqueeze(-1)
                better = err < best
                best = torch.where(better, err, best)
                best_lo = torch.where(better, lo.expand_as(best_lo), best_lo)
                best_hi = torch.where(better, hi.expand_as(best_hi), best_hi)
        los.append(best_lo)
        his.append(best_hi)
    return torch.cat(los, dim=0), torch.cat(his, dim=0)


def awq_block(block, idx, x, args, report):
    cap = {}
    y = chunked(lambda c: block.forward(c, cap), x, args.batch)
    feats = {k: torch.cat(v, dim=0) for k, v in cap.items()}
    w = block.w
    groups = [("input_layernorm", ["q_proj", "k_proj", "v_proj"], "q_proj", lambda t: chunked(lambda c: block.attention(c, t), feats["q_proj"], args.batch))]
    if w["v_proj"].shape == w["o_proj"].shape:
        groups.append(("v_proj", ["o_proj"], "o_proj", lambda t: F.linear(feats["o_proj"], t["o_proj"])))
    groups.append(("post_attention_layernorm", ["gate_proj", "up_proj"], "gate_proj", lambda t: block.mlp(feats["gate_proj"], t)))
    groups.append(("up_proj", ["down_proj"], "down_proj", lambda t: F.linear(feats["down_proj"], t["down_proj"])))
    chosen = []
    for prev, names, feat, measure in groups:
        s, r, losses = search_scale(block, names, feats[feat], measure, args)
        chosen.append((prev, names, feat, s))
        report["groups"].append({"block": idx, "prev_op": prev, "layers": names, "ratio": r, "losses": losses})
    for prev, names, feat, s in chosen:
        if prev.endswith("layernorm"):
            w[prev] = w[prev] / s
        else:
            w[prev] = w[prev] / s.view(-1, 1)
        for n in names:
            w[n] = w[n] * s.view(1, -1)
        feats[feat] = feats[feat] / s.view(1, -1)
    feat_of = {"v_proj": "q_proj", "o_proj": "o_proj", "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}
    if not args.no_clip:
        for n, f in feat_of.items():
            if args.clip_tokens == "all":
                lo, hi = search_clip_all_tokens(w[n], feats[f], args)
            elif args.clip == "asym":
                lo, hi = search_clip_asym(w[n], feats[f], args)
            else:
                hi = search_clip(w[n], feats[f], args)
                lo = -hi
            shape = w[n].shape
            wr = w[n].reshape(shape[0], lo.shape[1], -1)
            # As awq-run reports it: the clipped range's width over the group's own range.
            mx, mn = wr.amax(dim=-1, keepdim=True), wr.amin(dim=-1, keepdim=True)
            width = (mx - mn).clamp(min=1e-30)
            report["layers"].append({"block": idx, "layer": n, "clip_shrink": ((mx.minimum(hi) - mn.maximum(lo)) / width).mean().item()})
            w[n] = torch.clamp(wr, lo, hi).reshape(shape)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        w[n] = fake_quant(w[n], args.bits, args.group_size)
    return y


def perplexity(embed, blocks, norm, eps, tokens, seqlen, max_windows, device, also_at=()):
    """Perplexity over the first `max_windows` windows; with `also_at`, also a dict of the
    perplexity over the first N windows for each N listed there."""
    windows = min(tokens.numel() // seqlen, max_windows)
    nll, partial = 0.0, {}
    with torch.no_grad():
        for i in range(windows):
            ids = tokens[i * seqlen : (i + 1) * seqlen].to(device)
            x = embed[ids].unsqueeze(0).float()
            for b in blocks:
                x = b.forward(x)
            logits = F.linear(rms_norm(x, norm, eps), embed.float())[0]
            nll += F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()
            if i + 1 in also_at:
                partial[i + 1] = math.exp(nll / ((i + 1) * (seqlen - 1)))
    ppl = math.exp(nll / (windows * (seqlen - 1)))
    return (ppl, partial) if also_at else ppl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="directory with calib.u32 and eval.u32")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--method", default="awq", choices=["awq", "rtn", "fp"])
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--clip", default="sym", choices=["sym", "asym"], help="sym: AutoAWQ's [-m, m] bounds; asym: min and max shrunk separately")
    ap.add_argument("--clip-tokens", default="subsample", choices=["subsample", "all"], help="the clip error over AutoAWQ's 512-token stride subsample, or over every token (awq-run's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--report")
    ap.add_argument("--zero-tie", default="native", choices=["native", "even", "down", "best"])
    ap.add_argument("--layers", type=int, help="use only the first N blocks (a smoke test of this script)")
    ap.add_argument("--calib-offset", type=int, default=0, help="skip the first N calibration blocks (another cut of the same text)")
    ap.add_argument("--calib-blocks", type=int, help="use only the first N calibration blocks")
    args = ap.parse_args()
    global ZERO_TIE
    ZERO_TIE = args.zero_tie
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dt = getattr(torch, args.dtype)
    cfg = json.load(open(f"{args.model}/config.json"))
    sd = load_safetensors(f"{args.model}/model.safetensors")
    dev = args.device
    rope = Rope(cfg, max(args.calib_seqlen, args.seqlen), dev)
    embed = sd["model.embed_tokens.weight"].to(dev)
    blocks = []
    for i in range(args.layers or cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w = {k[len(p):].split(".")[-2]: v.to(dev) for k, v in sd.items() if k.startswith(p) and k.endswith(".weight")}
        blocks.append(Block(w, cfg, rope))
    report = {"method": args.method, "bits": args.bits, "group_size": args.group_size, "dtype": args.dtype, "groups": [], "layers": []}
    t0 = time.time()
    with torch.no_grad():
        if args.method == "awq":
            calib = read_u32(f"{args.tokens}/calib.u32").reshape(-1, args.calib_seqlen)[args.calib_offset :][: args.calib_blocks].to(dev)
            x = embed[calib].to(dt)
            for i, b in enumerate(blocks):
                b.w = {k: v.to(dt) for k, v in b.w.items()}
                x = awq_block(b, i, x, args, report)
                print(f"block {i} done, {time.time() - t0:.1f}s", flush=True)
                b.w = {k: v.float() for k, v in b.w.items()}
        elif args.method == "rtn":
            for b in blocks:
                for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                    b.w[n] = fake_quant(b.w[n], args.bits, args.group_size)
    report["seconds"] = time.time() - t0
    ppl, at = perplexity(embed, blocks, sd["model.norm.weight"].to(dev), cfg["rms_norm_eps"], read_u32(f"{args.tokens}/eval.u32"), args.seqlen, args.max_windows, dev, also_at=(16,))
    report["perplexity"] = ppl
    print(f"{args.method} w{args.bits}g{args.group_size} {args.dtype} clip {'none' if args.no_clip else args.clip}: perplexity {ppl:.4f} over {args.max_windows} windows, {at.get(16, float('nan')):.4f} over 16 ({report['seconds']:.1f}s search)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
