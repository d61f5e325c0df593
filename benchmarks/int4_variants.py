"""Int4 selection kernel variants (H100 exploration): the score part of kernels.predict's int4
launch on Llama-3.1-8B MLP shapes (x [1, 4096], codes [2 x 14336, 2048] uint8, scales per 64),
each variant's time (CUDA graph), registers / spills, and its scores against float64.

    python benchmarks/int4_variants.py --out benchmarks/results/contextual/int4_variants.json
    python benchmarks/int4_variants.py --md OUT.md RUN1.json [RUN2.json ...]   # the table of runs

Modes: 0 one scale gathered per byte (the first library kernel's way), 1 one scale per step of
one group, 2 no scales, 3 codes only (no x: the load floor), 4 whole groups per step as 3-D tiles
(bytes = inputs 2t, 2t + 1), 5 as 4 with bytes = inputs t, t + 32 of a group (x slices contiguous:
the library's layout since), 6 as 5 in offset binary with the offset folded into per-group x sums,
7 as 5 with nibbles turned into floats by a magic number (OR into 2^23's mantissa, one subtract:
no int -> float conversion instructions), 8 as 7 reading the codes as int32 words (8 nibbles).
(--modes picks them: runs 1 / 2 / 3 timed 0-3 / 1, 3-6 / 5, 7, 8.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.contextual import timed  # noqa: E402
from sparseinfer.contextual.dejavu import quantized  # noqa: E402


@triton.jit
def scores_kernel(X, Q, S, G, U, I, HD, stride_q, stride_s, NB: tl.constexpr, BLOCK_B: tl.constexpr,
                  GROUP: tl.constexpr, MODE: tl.constexpr, SPLIT: tl.constexpr):
    """G / U [SPLIT, I] fp32 partial sums g~, u~ of NB neurons over HD / SPLIT inputs.
    MODE 0: scale gathered per element; 1: one scale per step (BLOCK_B == GROUP // 2);
    2: no scales (timing only); 3: codes only, no x (timing only)."""
    j = tl.program_id(0)
    sp = tl.program_id(1)
    offs_n = j * NB + tl.arange(0, NB)
    nok = offs_n < I
    offs_b = tl.arange(0, BLOCK_B)
    hb = HD // 2
    per = hb // SPLIT
    q_g = Q + offs_n[:, None].to(tl.int64) * stride_q
    q_u = Q + (offs_n[:, None] + I).to(tl.int64) * stride_q
    s_g = S + offs_n.to(tl.int64) * stride_s
    s_u = S + (offs_n + I).to(tl.int64) * stride_s
    acc_g = tl.full([NB, BLOCK_B], 0.0, dtype=tl.float32)
    acc_u = tl.full([NB, BLOCK_B], 0.0, dtype=tl.float32)
    for b0 in range(sp * per, sp * per + per, BLOCK_B):
        bb = b0 + offs_b
        cg = tl.load(q_g + bb[None, :], mask=nok[:, None], other=0).to(tl.int32)
        cu = tl.load(q_u + bb[None, :], mask=nok[:, None], other=0).to(tl.int32)
        lg = (((cg & 15) ^ 8) - 8).to(tl.float32)
        hg = ((((cg >> 4) & 15) ^ 8) - 8).to(tl.float32)
        lu = (((cu & 15) ^ 8) - 8).to(tl.float32)
        hu = ((((cu >> 4) & 15) ^ 8) - 8).to(tl.float32)
        if MODE == 3:
            acc_g += lg + hg
            acc_u += lu + hu
        else:
            xe = tl.load(X + 2 * bb).to(tl.float32)[None, :]
            xo = tl.load(X + 2 * bb + 1).to(tl.float32)[None, :]
            if MODE == 0:
                gi = (2 * bb) // GROUP
                sg = tl.load(s_g[:, None] + gi[None, :], mask=nok[:, None], other=0.0).to(tl.float32)
                su = tl.load(s_u[:, None] + gi[None, :], mask=nok[:, None], other=0.0).to(tl.float32)
                acc_g += (lg * xe + hg * xo) * sg
                acc_u += (lu * xe + hu * xo) * su
            elif MODE == 1:
                gi = (2 * b0) // GROUP
                sg = tl.load(s_g + gi, mask=nok, other=0.0).to(tl.float32)[:, None]
                su = tl.load(s_u + gi, mask=nok, other=0.0).to(tl.float32)[:, None]
                acc_g += (lg * xe + hg * xo) * sg
                acc_u += (lu * xe + hu * xo) * su
            else:
                acc_g += lg * xe + hg * xo
                acc_u += lu * xe + hu * xo
    tl.store(G + sp * I + offs_n, tl.sum(acc_g, 1), mask=nok)
    tl.store(U + sp * I + offs_n, tl.sum(acc_u, 1), mask=nok)


@triton.jit
def scores3_kernel(X, Q, S, G, U, I, HD, stride_q, stride_s, NB: tl.constexpr, NG: tl.constexpr,
                   GROUP: tl.constexpr, MODE: tl.constexpr, SPLIT: tl.constexpr):
    """NG whole groups per step as a [NB, NG, GROUP / 2] tile (no gathers), one scale per (neuron, group).
    MODE 4: bytes = (channel 2t, 2t + 1), two's complement; 5: bytes = (channel t, t + GROUP / 2) of
    each group, two's complement (x halves contiguous); 6: as 5 with codes stored + 8 (offset
    binary): n - 8 folded into one per-group sum of x."""
    GB: tl.constexpr = GROUP // 2
    j = tl.program_id(0)
    sp = tl.program_id(1)
    offs_n = j * NB + tl.arange(0, NB)
    nok = offs_n < I
    offs_g = tl.arange(0, NG)
    offs_t = tl.arange(0, GB)
    ngroups = HD // GROUP
    per = ngroups if SPLIT == 1 else ngroups // SPLIT
    q_g = (Q + offs_n.to(tl.int64) * stride_q)[:, None, None]
    q_u = (Q + (offs_n + I).to(tl.int64) * stride_q)[:, None, None]
    s_g = (S + offs_n.to(tl.int64) * stride_s)[:, None]
    s_u = (S + (offs_n + I).to(tl.int64) * stride_s)[:, None]
    m3 = nok[:, None, None]
    acc_g = tl.full([NB, NG, GB], 0.0, dtype=tl.float32)
    acc_u = tl.full([NB, NG, GB], 0.0, dtype=tl.float32)
    off_g = tl.full([NB, NG], 0.0, dtype=tl.float32)
    off_u = tl.full([NB, NG], 0.0, dtype=tl.float32)
    accw_g = tl.full([NB, NG, GB // 4], 0.0, dtype=tl.float32)
    accw_u = tl.full([NB, NG, GB // 4], 0.0, dtype=tl.float32)
    for g0 in range(0, per, NG):
        grp = sp * per + g0 + offs_g
        boff = grp[:, None] * GB + offs_t[None, :]  # [NG, GB] byte offsets
        sg = tl.load(s_g + grp[None, :], mask=nok[:, None], other=0.0).to(tl.float32)
        su = tl.load(s_u + grp[None, :], mask=nok[:, None], other=0.0).to(tl.float32)
        if MODE == 8:  # int32 words: 4 bytes (inputs 4w + b, 4w + b + 32 of a group), magic-number floats
            woff = (grp[:, None] * (GB // 4) + tl.arange(0, GB // 4)[None, :])[None, :, :]  # [1, NG, GB / 4]
            wg = tl.load(q_g.to(tl.pointer_type(tl.int32)) + woff, mask=m3, other=0)
            wu = tl.load(q_u.to(tl.pointer_type(tl.int32)) + woff, mask=m3, other=0)
            ch4 = grp[:, None] * GROUP + 4 * tl.arange(0, GB // 4)[None, :]
            for b in tl.static_range(4):
                xa = tl.load(X + ch4 + b).to(tl.float32)[None, :, :]
                xb = tl.load(X + ch4 + b + GB).to(tl.float32)[None, :, :]
                lg = ((((wg >> (8 * b)) & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                hg = ((((wg >> (8 * b + 4)) & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                lu = ((((wu >> (8 * b)) & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                hu = ((((wu >> (8 * b + 4)) & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                accw_g += (lg * xa + hg * xb) * sg[:, :, None]
                accw_u += (lu * xa + hu * xb) * su[:, :, None]
        else:
            cg = tl.load(q_g + boff[None, :, :], mask=m3, other=0).to(tl.int32)
            cu = tl.load(q_u + boff[None, :, :], mask=m3, other=0).to(tl.int32)
        if MODE == 8:
            pass
        elif MODE == 4:
            xa = tl.load(X + 2 * boff).to(tl.float32)[None, :, :]
            xb = tl.load(X + 2 * boff + 1).to(tl.float32)[None, :, :]
        else:
            ch = grp[:, None] * GROUP + offs_t[None, :]
            xa = tl.load(X + ch).to(tl.float32)[None, :, :]
            xb = tl.load(X + ch + GB).to(tl.float32)[None, :, :]
        if MODE == 8:
            pass
        elif MODE == 7:  # magic-number int -> float (no I2F): (n ^ 8) | 0x4B000000 as fp32 = 2^23 + n + 8
            lg = (((cg & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            hg = ((((cg >> 4) & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            lu = (((cu & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            hu = ((((cu >> 4) & 15) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            acc_g += (lg * xa + hg * xb) * sg[:, :, None]
            acc_u += (lu * xa + hu * xb) * su[:, :, None]
        elif MODE == 6:
            acc_g += ((cg & 15).to(tl.float32) * xa + (cg >> 4).to(tl.float32) * xb) * sg[:, :, None]
            acc_u += ((cu & 15).to(tl.float32) * xa + (cu >> 4).to(tl.float32) * xb) * su[:, :, None]
            xs = tl.sum(tl.sum(xa + xb, 2), 0)  # [NG]
            off_g += sg * xs[None, :]
            off_u += su * xs[None, :]
        else:
            acc_g += ((((cg & 15) ^ 8) - 8).to(tl.float32) * xa + ((((cg >> 4) & 15) ^ 8) - 8).to(tl.float32) * xb) * sg[:, :, None]
            acc_u += ((((cu & 15) ^ 8) - 8).to(tl.float32) * xa + ((((cu >> 4) & 15) ^ 8) - 8).to(tl.float32) * xb) * su[:, :, None]
    rg = tl.sum(tl.sum(acc_g, 2), 1) + tl.sum(tl.sum(accw_g, 2), 1)
    ru = tl.sum(tl.sum(acc_u, 2), 1) + tl.sum(tl.sum(accw_u, 2), 1)
    if MODE == 6:
        rg -= 8.0 * tl.sum(off_g, 1)
        ru -= 8.0 * tl.sum(off_u, 1)
    tl.store(G + sp * I + offs_n, rg, mask=nok)
    tl.store(U + sp * I + offs_n, ru, mask=nok)


def repack(codes: torch.Tensor, mode: int, group: int = 64) -> torch.Tensor:
    """int8 codes [O, H] -> the byte layout of scores3_kernel's MODE."""
    if mode == 4:
        lo, hi = codes[:, 0::2], codes[:, 1::2]
    else:
        c = codes.reshape(codes.shape[0], -1, 2, group // 2)
        lo, hi = c[:, :, 0].reshape(codes.shape[0], -1), c[:, :, 1].reshape(codes.shape[0], -1)
    lo, hi = lo.to(torch.int16), hi.to(torch.int16)
    if mode == 6:
        return ((lo + 8) | ((hi + 8) << 4)).to(torch.uint8).contiguous()
    # modes 5, 7, 8: the library's layout
    return ((lo & 15) | ((hi & 15) << 4)).to(torch.uint8).contiguous()


def write_md(out: str, runs: list) -> None:
    """The best three configs of each mode over the given runs' JSON files."""
    lines = ["# Int4 selection kernel variants (scores of 2 x 14336 neurons over 4096 inputs, batch 1)", "",
             "\"library kernel\" rows: kernels.predict's int4 launch as it was at that run (runs 1 and 2: the first "
             "version, a scale gathered per byte, i.e. mode 0 plus the selection; run 3: mode 5's layout plus the "
             "selection). Modes: see the script's docstring.", ""]
    for path in runs:
        with open(path) as f:
            r = json.load(f)
        lines += [f"`{os.path.basename(path)}`: {r['device']}, torch {r['torch']}, triton {r['triton']}.", "",
                  "| variant | config | us | GB/s | regs | rel. err vs float64 |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if "variant" in row:
                lines.append(f"| {row['variant']} (scores + selection) | | {row['ms'] * 1e3:.1f} | | | |")
        for m in sorted({row["mode"] for row in r["rows"] if "mode" in row}):
            best = sorted((row for row in r["rows"] if row.get("mode") == m), key=lambda row: row["ms"])[:3]
            for row in best:
                cfg = ", ".join(f"{k} {row[k]}" for k in ("NB", "BLOCK_B", "NG", "split", "warps") if k in row)
                err = f"{row['rel_err']:.1e}" if row.get("rel_err") is not None else "(timing only)"
                lines.append(f"| mode {m} | {cfg} | {row['ms'] * 1e3:.1f} | {row['GBs']} | {row['regs']} | {err} |")
        lines.append("")
    with open(out, "w") as f:
        f.write("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--md", nargs="+", metavar=("OUT.md", "RUN.json"))
    p.add_argument("--modes", default="5,7,8", help="comma list of the modes to time (default: %(default)s)")
    args = p.parse_args()
    if args.md:
        write_md(args.md[0], args.md[1:])
        return 0
    if not args.out:
        p.error("--out or --md is needed")
    dev = torch.device("cuda")
    h, n = 4096, 14336
    g = torch.Generator(device=dev).manual_seed(0)
    wg, wu = (torch.randn(n, h, device=dev, dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(2))
    q = quantized([(wg, wu)], bits=4, group=64).layers[0].B
    x = torch.randn(1, h, device=dev, dtype=torch.bfloat16, generator=g)
    ref = (x.double() @ q.dequantize().double().T)[0]
    bw_bytes = q.codes.numel() + 2 * q.scales.numel()
    res = []
    from sparseinfer.kernels import predict
    for frac in (0.5,):
        k = int(n * frac)
        ms = timed(lambda: predict.dejavu_select_int4(x, q.codes, q.scales, k, 32), 200, True)
        res.append({"variant": "library kernel (block 32)", "ms": round(ms, 4)})
        print(res[-1], flush=True)
        for blk in (64, 128):
            ms = timed(lambda: predict._launch_int4(x, q.codes, q.scales, k, blk), 200, True)
            res.append({"variant": f"library kernel (block {blk})", "ms": round(ms, 4)})
            print(res[-1], flush=True)
    from sparseinfer.contextual.dejavu import _unpack
    raw = _unpack(q.codes, 64)
    for mode in (int(m) for m in args.modes.split(",")):
        codes = repack(raw, 4 if mode < 4 else mode)  # modes 0-3: bytes = inputs 2t, 2t + 1
        if mode < 4:
            grid = [dict(NB=nb, BLOCK_B=bb, split=sp, warps=w) for nb in (16, 32)
                    for bb in ((32,) if mode == 1 else (64, 128)) for sp in (1, 4) for w in (4, 8)]
        else:
            grid = [dict(NB=nb, NG=ng, split=1, warps=w) for nb in (16, 32) for ng in (1, 2, 4, 8) for w in (4, 8)]
        for cfg in grid:
            G = torch.empty(cfg["split"], n, device=dev, dtype=torch.float32)
            U = torch.empty_like(G)
            common = (x, codes, q.scales, G, U, n, h, codes.stride(0), q.scales.stride(0))

            def run():
                if mode < 4:
                    return scores_kernel[(triton.cdiv(n, cfg["NB"]), cfg["split"])](
                        *common, NB=cfg["NB"], BLOCK_B=cfg["BLOCK_B"], GROUP=64, MODE=mode, SPLIT=cfg["split"],
                        num_warps=cfg["warps"])
                return scores3_kernel[(triton.cdiv(n, cfg["NB"]), 1)](
                    *common, NB=cfg["NB"], NG=cfg["NG"], GROUP=64, MODE=mode, SPLIT=1, num_warps=cfg["warps"])
            try:
                kern = run()
                ms = timed(run, 200, True)
            except Exception as e:  # noqa: BLE001
                print("fail", mode, cfg, type(e).__name__, str(e)[:300], flush=True)
                continue
            err = None
            if mode not in (2, 3):  # 2, 3 skip work: timing only
                got = torch.cat([G.sum(0), U.sum(0)]).double()
                err = float((got - ref).norm() / ref.norm())
            r = {"mode": mode, **cfg, "ms": round(ms, 4), "GBs": round(bw_bytes / ms / 1e6, 1), "regs": kern.n_regs,
                 "spills": kern.n_spills, "rel_err": err}
            res.append(r)
            print(r, flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": res}, f, indent=1)
    best = sorted([r for r in res if "mode" in r], key=lambda r: (r["mode"], r["ms"]))
    for m in sorted({r["mode"] for r in best}):
        print("best mode", m, [r for r in best if r["mode"] == m][:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
