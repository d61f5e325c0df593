"""Contextual sparsity at decode on a Llama-3.1-8B-shaped model (random bf16 weights, batch 1/4):

A. per-layer MLP (4096 -> 14336 -> 4096): dense cuBLAS (3 GEMVs + SiLU*up) vs the TEAL kernel
   (sparseinfer::teal_gemv on all three projections, and the fused sparseinfer::teal_mlp: gate+up
   in one launch, down from their fp32 sums) at 25/40/50/75% sparsity and the Deja Vu
   kernel (sparseinfer::dejavu_gateup + teal_gemv on down) at 50/75% with and without its
   predictor (rank --rank), each captured in a CUDA graph (launch overhead out), vs the bytes
   bound (weight bytes read / measured device-to-device copy bandwidth). Also each projection
   alone. A small config sweep of the kernels runs first (best config used).
T. TEAL on the attention projections (fused q/k/v, o_proj) at 50%: the library's call vs a config sweep.
Q. the same MLP behind the int4 kind's one-launch selection (packed 4-bit gate / up copies).
B. the decode step of the transformers model (--layers decoder layers, 4K context, StaticCache)
   captured in a CUDA graph: dense vs teal MLP 50% vs teal 50% on all projections vs dejavu
   MLP 50% (+ heads 50%), through `sparseinfer.patch`; per-layer time from --layers vs
   --layers/2 and the 32-layer extrapolation (dejavu int4: the int4 kind from the model's weights). --compile adds the same steps through torch.compile
   (then captured): the fastest dense step, and the sparse ones without the elementwise overhead.

    python benchmarks/contextual.py --out benchmarks/results/contextual     # H100: ~2-3 min
    python benchmarks/contextual.py --smoke --out /tmp/ctx-smoke            # CPU, tiny shapes, < 1 min
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import sparseinfer  # noqa: E402
from sparseinfer.contextual.dejavu import LayerPredictor, Predictors, quantized  # noqa: E402
from sparseinfer.kernels.topk import select_top, topk_indices_launch  # noqa: E402
from sparseinfer.kernels import gemv  # noqa: E402

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
)
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=32, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def capture(fn, graph: bool = True, inner: int = 1, warm: bool = True):
    """(warm) fn() three times on a side stream (warm-up: compilation, allocator, cuBLAS workspaces),
    then (graph) `inner` calls captured -> the torch.cuda.CUDAGraph to replay; None without graph."""
    if warm:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
    if not graph:
        return None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return g


def timed(fn, iters: int, cuda: bool, graph: bool = True) -> float:
    """Median ms per call of fn(); on CUDA captured in a CUDA graph (replayed `iters` times, 5 trials)."""
    if not cuda:
        fn()
        t0 = time.perf_counter()
        for _ in range(max(1, iters // 10)):
            fn()
        return (time.perf_counter() - t0) * 1e3 / max(1, iters // 10)
    g = capture(fn, graph)
    if graph:
        run = g.replay
    else:
        run = fn
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / iters)
    return sorted(times)[2]


def copy_bandwidth(dev) -> float:
    """Device-to-device copy bandwidth (bytes/s: read + write counted once each)."""
    if dev.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), 20, True, graph=False)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def part_a(args, dev, dt, shapes, out: dict) -> None:
    cuda = dev.type == "cuda"
    h, inter = shapes["hidden_size"], shapes["intermediate_size"]
    g = torch.Generator(device=dev).manual_seed(0)
    wg = torch.randn(inter, h, device=dev, dtype=dt, generator=g) * 0.02
    wu = torch.randn(inter, h, device=dev, dtype=dt, generator=g) * 0.02
    wd = torch.randn(h, inter, device=dev, dtype=dt, generator=g) * 0.02
    wgT, wuT, wdT = wg.t().contiguous(), wu.t().contiguous(), wd.t().contiguous()  # [in, out]
    bw = copy_bandwidth(dev)
    out["copy_bandwidth_GBs"] = round(bw / 1e9, 1)
    mlp_bytes = 3 * h * inter * wg.element_size()
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s; MLP weights {mlp_bytes / 1e6:.0f} MB")
    iters = args.iters

    # config sweep at 50%, batch 1
    x = torch.randn(1, h, device=dev, dtype=dt, generator=g)
    t50 = torch.quantile(x.float().abs().flatten(), 0.5)
    hid = F.silu(x @ wg.T) * (x @ wu.T)
    th50 = torch.quantile(hid.float().abs().flatten(), 0.5)
    # (BLOCK_K, BLOCK_N, ROWS, warps, stages); benchmarks/teal_sweep.py explored the structure
    teal_cfgs = [(64, 128, 1024, 4, 1), (64, 64, 1024, 4, 2), (64, 64, 1024, 4, 1), (64, 128, 1024, 4, 2),
                 (32, 128, 1024, 4, 3), (64, 64, 2048, 4, 1), (128, 64, 1024, 4, 1), (32, 128, 512, 4, 3)] \
        if cuda else [gemv.TEAL_CONFIG["cpu"]]
    best = {}
    sweep = []

    def pick(kernel: str, shape: str, key: str, cfgs, call) -> None:
        """Time call(config) for every config that compiles; best[key] = the fastest."""
        res = []
        for c in cfgs:
            try:
                ms = timed(lambda: call(c), iters, cuda)
            except Exception as e:  # a config that does not compile / fit
                log(f"  {kernel} config {c} on {shape}: {type(e).__name__}: {str(e)[:120]}")
                continue
            res.append((ms, c))
            sweep.append({"kernel": kernel, "shape": shape, "config": c, "ms": round(ms, 4)})
        best[key] = min(res)[1]
        log(f"{kernel} {shape} 50%: best config {best[key]} {min(res)[0]:.4f} ms")

    for name, xx, w, t in (("gate_up", x, wuT, t50), ("down", hid, wdT, th50)):
        pick("teal_gemv", name, name, teal_cfgs, lambda c, xx=xx, w=w, t=t: gemv.teal_gemv_launch(xx, w, t, c))
    # the fused MLP's gate+up launch (two weights, one x): partials + the SiLU(gate)*up sums
    two_cfgs = [(32, 128, 1024, 4, 1), (32, 64, 1024, 4, 1), (64, 64, 1024, 4, 1), (32, 128, 2048, 4, 1),
                (16, 128, 1024, 4, 1), (32, 64, 1024, 2, 1), (64, 64, 1024, 8, 1), (32, 128, 512, 4, 3)] \
        if cuda else [gemv.TEAL_MLP_CONFIG["cpu"]]
    pick("teal_gemv TWO", "mlp_gate_up", "mlp_gate_up", two_cfgs,
         lambda c: gemv._teal(x, wgT, wuT, t50, c, True))
    # the compacted-rows path (compact=True: kept channels listed first, full tiles of kept rows)
    comp_cfgs = [(64, 128, 1024, 4, 3), (64, 128, 1024, 4, 2), (32, 128, 1024, 4, 3), (64, 64, 1024, 4, 3),
                 (128, 64, 1024, 4, 3), (64, 128, 2048, 4, 3), (32, 128, 512, 4, 3)] if cuda \
        else [gemv.TEAL_CONFIG["cpu"]]
    pick("teal_gemv compact", "gate_up", "compact_up", comp_cfgs,
         lambda c: gemv.teal_gemv_launch(x, wuT, t50, c, compact=True))
    pick("teal_gemv compact", "down", "compact_down", comp_cfgs,
         lambda c: gemv.teal_gemv_launch(hid, wdT, th50, c, compact=True))
    pick("teal_gemv compact TWO", "mlp_gate_up", "compact_mlp_gate_up", comp_cfgs,
         lambda c: gemv._teal(x, wgT, wuT, t50, c, True, True))
    gu_cfgs = [(16, 128, 4), (8, 256, 4), (32, 128, 4), (16, 256, 8), (4, 512, 4), (8, 128, 2)] if cuda \
        else [gemv.GATEUP_CONFIG["cpu"]]
    mask = torch.zeros(1, inter, dtype=torch.bool, device=dev)
    mask[0, torch.randperm(inter, device=dev, generator=g)[: inter // 2]] = True
    pick("dejavu_gateup", "gate_up", "dejavu_gateup", gu_cfgs, lambda c: gemv.dejavu_gateup_launch(x, wg, wu, mask, c))
    # the listed-neurons path (one row): gathered gate/up rows, then the down rows of the list
    sel = torch.randperm(inter, device=dev, generator=g)[: inter // 2]
    d_rows = gemv.DEJAVU_ROWS_CONFIG["cuda" if cuda else "cpu"]
    rg_cfgs = [(16, 256, 4, 3), (8, 512, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3), (8, 256, 4, 4), (16, 128, 4, 4),
               (16, 256, 4, 2), (32, 128, 4, 4), (16, 256, 8, 4), (8, 512, 8, 3), (16, 512, 4, 2), (32, 128, 8, 3)] \
        if cuda else [d_rows[0]]
    pick("dejavu_rows", "gate_up", "dejavu_rows_gate_up", rg_cfgs,
         lambda c: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, sel, (c, d_rows[1])))
    rd_cfgs = [(64, 128, 1024, 4, 3), (64, 128, 512, 4, 3), (32, 128, 512, 4, 3), (64, 64, 512, 4, 3),
               (128, 64, 1024, 4, 3), (64, 128, 256, 4, 3), (32, 256, 512, 8, 3), (64, 128, 512, 4, 4),
               (64, 256, 1024, 8, 3), (128, 128, 1024, 8, 3), (64, 128, 1792, 4, 3), (32, 128, 1024, 4, 4)] if cuda \
        else [d_rows[1]]
    pick("dejavu_rows", "down", "dejavu_rows_down", rd_cfgs,
         lambda c: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, sel, (best["dejavu_rows_gate_up"], c)))
    # the same at 25% kept (a quarter of the rows: fewer programs per launch)
    sel25 = torch.randperm(inter, device=dev, generator=g)[: inter // 4]
    pick("dejavu_rows", "gate_up, 25% kept", "dejavu_rows_gate_up_25", rg_cfgs,
         lambda c: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, sel25, (c, d_rows[1])))
    pick("dejavu_rows", "down, 25% kept", "dejavu_rows_down_25", rd_cfgs,
         lambda c: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, sel25, (best["dejavu_rows_gate_up_25"], c)))
    out["sweep"] = sweep
    out["best_config"] = {k: list(v) for k, v in best.items()}

    rows = []
    for b in args.batch:
        x = torch.randn(b, h, device=dev, dtype=dt, generator=g)
        hid = F.silu(x @ wg.T) * (x @ wu.T)

        def dense():
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

        t_dense = timed(dense, iters, cuda)
        rows.append({"batch": b, "method": "dense (cuBLAS)", "kept": 1.0, "ms": t_dense, "bound_ms": mlp_bytes / bw * 1e3})
        # projections alone
        t_up = timed(lambda: F.linear(x, wu), iters, cuda)
        t_down = timed(lambda: F.linear(hid, wd), iters, cuda)
        rows.append({"batch": b, "method": "dense up_proj alone", "kept": 1.0, "ms": t_up, "bound_ms": mlp_bytes / 3 / bw * 1e3})
        rows.append({"batch": b, "method": "dense down_proj alone", "kept": 1.0, "ms": t_down, "bound_ms": mlp_bytes / 3 / bw * 1e3})
        for s in args.sparsity:
            # a per-row threshold at the s-quantile (rows of a batch share it; kept rows = union)
            tx = torch.quantile(x.float().abs().flatten(), s)
            th = torch.quantile(hid.float().abs().flatten(), s)
            union_x = float((x.abs() > tx).any(0).float().mean())
            union_h = float((hid.abs() > th).any(0).float().mean())
            cg, cd = best["gate_up"], best["down"]

            def teal():
                gg = gemv.teal_gemv_launch(x, wgT, tx, cg)
                uu = gemv.teal_gemv_launch(x, wuT, tx, cg)
                return gemv.teal_gemv_launch(F.silu(gg) * uu, wdT, th, cd)

            kept_bytes = (2 * union_x + union_h) / 3
            rows.append({"batch": b, "method": f"teal {s:.0%}", "kept": round(kept_bytes, 3), "ms": timed(teal, iters, cuda),
                         "bound_ms": kept_bytes * mlp_bytes / bw * 1e3})
            # the fused op (what `patch(..., mlp="teal")` runs): down's threshold applies to the
            # fp32 SiLU(gate)*up, so its kept share is measured from the kernel's own input
            hf = F.silu(x.float() @ wgT.float()) * (x.float() @ wuT.float())
            union_hf = float((hf.abs() > th).any(0).float().mean())
            kept_f = (2 * union_x + union_hf) / 3
            cm = (best["mlp_gate_up"], best["down"])
            got = gemv.teal_mlp_launch(x, wgT, wuT, wdT, tx, th, cm).float()
            # the reference rounds SiLU(gate)*up to bf16 as the kernel does (else threshold flips dominate)
            hr = (F.silu(gemv.teal_gemv_reference(x.float(), wgT.float(), tx))
                  * gemv.teal_gemv_reference(x.float(), wuT.float(), tx)).to(dt).float()
            want = gemv.teal_gemv_reference(hr, wdT.float(), th)
            err = float((got - want).norm() / want.norm())
            out.setdefault("fused_rel_err", {})[f"b{b} {s:.0%}"] = round(err, 5)
            log(f"  teal_mlp batch {b} {s:.0%}: rel. error vs fp32 reference {err:.2e}")
            rows.append({"batch": b, "method": f"teal {s:.0%} fused MLP (teal_mlp)", "kept": round(kept_f, 3),
                         "ms": timed(lambda: gemv.teal_mlp_launch(x, wgT, wuT, wdT, tx, th, cm), iters, cuda),
                         "bound_ms": kept_f * mlp_bytes / bw * 1e3})
            if b == 1:
                # default configs of the compacted path (gemv.TEAL_COMPACT_MLP_CONFIG), given explicitly: with
                # no config, one-row GPU calls take the gathered-rows loop whatever compact says
                ccfg = gemv.TEAL_COMPACT_MLP_CONFIG[gemv._config_key(x)]
                rows.append({"batch": b, "method": f"teal {s:.0%} fused MLP, compact rows", "kept": round(kept_f, 3),
                             "bound_ms": kept_f * mlp_bytes / bw * 1e3,
                             "ms": timed(lambda: gemv.teal_mlp_launch(x, wgT, wuT, wdT, tx, th, ccfg, compact=True), iters, cuda)})
                rows.append({"batch": b, "method": f"teal {s:.0%} compact rows, up_proj alone", "kept": round(union_x, 3),
                             "bound_ms": union_x * mlp_bytes / 3 / bw * 1e3,
                             "ms": timed(lambda: gemv.teal_gemv_launch(x, wuT, tx, best["compact_up"], compact=True), iters, cuda)})
                gotc = gemv.teal_mlp_launch(x, wgT, wuT, wdT, tx, th, ccfg, compact=True).float()
                out.setdefault("compact_rel_err", {})[f"b{b} {s:.0%}"] = round(float((gotc - want).norm() / want.norm()), 5)
            gemv.FUSED_FINISH = False  # the previous path: split sums in a second launch per projection
            try:
                rows.append({"batch": b, "method": f"teal {s:.0%} fused MLP, split sums in extra launches",
                             "kept": round(kept_f, 3), "bound_ms": kept_f * mlp_bytes / bw * 1e3,
                             "ms": timed(lambda: gemv.teal_mlp_launch(x, wgT, wuT, wdT, tx, th, cm), iters, cuda)})
            finally:
                gemv.FUSED_FINISH = True
            rows.append({"batch": b, "method": f"teal {s:.0%} up_proj alone", "kept": round(union_x, 3),
                         "ms": timed(lambda: gemv.teal_gemv_launch(x, wuT, tx, cg), iters, cuda),
                         "bound_ms": union_x * mlp_bytes / 3 / bw * 1e3})
            rows.append({"batch": b, "method": f"teal {s:.0%} down_proj alone", "kept": round(union_h, 3),
                         "ms": timed(lambda: gemv.teal_gemv_launch(hid, wdT, th, cd), iters, cuda),
                         "bound_ms": union_h * mlp_bytes / 3 / bw * 1e3})
        zero = torch.zeros((), device=dev)
        r = args.rank
        A = torch.randn(r, h, device=dev, dtype=dt, generator=g) * 0.02
        B = torch.randn(2 * inter, r, device=dev, dtype=dt, generator=g) * 0.02  # glu predictor [2I, r]
        for s in [s for s in args.sparsity if s >= 0.5]:
            k = round((1 - s) * inter)
            idx = torch.stack([torch.randperm(inter, device=dev, generator=g)[:k] for _ in range(b)])
            m = torch.zeros(b, inter, dtype=torch.bool, device=dev).scatter_(1, idx, True)
            union = float(m.any(0).float().mean())
            cgu, cd = best["dejavu_gateup"], best["down"]

            def dv():
                hh = gemv.dejavu_gateup_launch(x, wg, wu, m, cgu)
                return gemv.teal_gemv_launch(hh, wdT, zero, cd)

            def dv_pred():
                sc = glu_scores(x, A, B)
                ii = sc.topk(k, dim=-1).indices
                mm = torch.zeros(b, inter, dtype=torch.bool, device=dev).scatter_(1, ii, True)
                hh = gemv.dejavu_gateup_launch(x, wg, wu, mm, cgu)
                return gemv.teal_gemv_launch(hh, wdT, zero, cd)

            if b == 1:  # the listed-neurons path (what dejavu_mlp runs for one row)
                crow = (best["dejavu_rows_gate_up"], best["dejavu_rows_down"])
                mk = torch.zeros(1, inter, dtype=torch.bool, device=dev).scatter_(1, idx, True)
                want = (gemv.dejavu_gateup_reference(x.float(), wg.float(), wu.float(), mk) @ wdT.float())
                got = gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, idx[0], crow).float()
                err = float((got - want).norm() / want.norm())
                out.setdefault("dejavu_rows_rel_err", {})[f"{s:.0%}"] = round(err, 5)
                log(f"  dejavu rows {s:.0%}: rel. error vs fp32 reference {err:.2e}")

                def dv_rows():
                    return gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, idx[0], crow)

                def dv_rows_pred():  # the selection as the patching does it (kernels.topk, no sort)
                    ii = select_top(glu_scores(x, A, B), k)
                    return gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, ii[0], crow)

                def pred_only():
                    return select_top(glu_scores(x, A, B), k)

                sc0 = glu_scores(x, A, B)
                sel_t = {"torch.topk unsorted": timed(lambda: sc0.topk(k, dim=-1, sorted=False).indices, iters, cuda),
                         "torch.topk sorted": timed(lambda: sc0.topk(k, dim=-1).indices, iters, cuda),
                         "sort, first k": timed(lambda: sc0.sort(dim=-1, descending=True).indices[:, :k], iters, cuda),
                         "kernels.topk (bisection)": timed(lambda: select_top(sc0, k), iters, cuda),
                         "predictor r alone": timed(lambda: glu_scores(x, A, B), iters, cuda)}
                for nw in (4, 8, 16):
                    sel_t[f"kernels.topk num_warps={nw}"] = timed(lambda: topk_indices_launch(sc0, k, nw), iters, cuda)
                got_i = select_top(sc0, k)
                assert torch.equal(sc0.gather(1, got_i.long()).sort().values,
                                   sc0.topk(k, dim=-1).values.sort().values), "kernels.topk: wrong set"
                out.setdefault("select_ms", {})[f"{s:.0%}"] = {a: round(v, 4) for a, v in sel_t.items()}
                log(f"  top-{k} of {inter}: " + ", ".join(f"{a} {v * 1e3:.1f} us" for a, v in sel_t.items()))

                rows.append({"batch": b, "method": f"dejavu {s:.0%} listed rows (kernel)", "kept": round(union, 3),
                             "ms": timed(dv_rows, iters, cuda), "bound_ms": union * mlp_bytes / bw * 1e3})
                if abs(union - 0.25) < 0.02:
                    c25 = (best["dejavu_rows_gate_up_25"], best["dejavu_rows_down_25"])
                    rows.append({"batch": b, "method": f"dejavu {s:.0%} listed rows, configs swept at 25% kept",
                                 "kept": round(union, 3), "bound_ms": union * mlp_bytes / bw * 1e3,
                                 "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, idx[0], c25), iters, cuda)})
                rows.append({"batch": b, "method": f"dejavu {s:.0%} listed rows, library defaults", "kept": round(union, 3),
                             "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, idx[0]), iters, cuda),
                             "bound_ms": union * mlp_bytes / bw * 1e3})
                rows.append({"batch": b, "method": f"dejavu {s:.0%} listed rows + predictor r={r}", "kept": round(union, 3),
                             "ms": timed(dv_rows_pred, iters, cuda),
                             "bound_ms": (union * mlp_bytes + r * (h + 2 * inter) * A.element_size()) / bw * 1e3})
                rows.append({"batch": b, "method": f"dejavu {s:.0%} predictor r={r} + selection alone", "kept": 0.0,
                             "ms": timed(pred_only, iters, cuda), "bound_ms": r * (h + 2 * inter) * A.element_size() / bw * 1e3})
            pbytes = r * (h + 2 * inter) * A.element_size()
            rows.append({"batch": b, "method": f"dejavu {s:.0%} (kernel)", "kept": round(union, 3), "ms": timed(dv, iters, cuda),
                         "bound_ms": union * mlp_bytes / bw * 1e3})
            rows.append({"batch": b, "method": f"dejavu {s:.0%} + predictor r={r}", "kept": round(union, 3),
                         "ms": timed(dv_pred, iters, cuda), "bound_ms": (union * mlp_bytes + pbytes) / bw * 1e3})
        for row in rows:
            if row["batch"] == b:
                base = t_dense if not row["method"].endswith("alone") else (t_up if "up_proj" in row["method"] else t_down)
                row["speedup"] = round(base / row["ms"], 3)
                row["ms"], row["bound_ms"] = round(row["ms"], 4), round(row["bound_ms"], 4)
                log(f"  batch {b} {row['method']:<32} {row['ms']:.4f} ms  x{row['speedup']:.2f}  bound {row['bound_ms']:.4f} ms")
    out["mlp"] = rows


def _mlp_case(args, dev, dt, shapes, out: dict):
    """One random 8B-shaped MLP and a row: (generator, (W_gate, W_up, W_down^T contiguous, x [1, H]),
    MLP bytes, copy bandwidth (bytes/s, also stored in out), cuBLAS dense MLP ms)."""
    h, inter = shapes["hidden_size"], shapes["intermediate_size"]
    g = torch.Generator(device=dev).manual_seed(1)
    wg = torch.randn(inter, h, device=dev, dtype=dt, generator=g) * 0.02
    wu = torch.randn(inter, h, device=dev, dtype=dt, generator=g) * 0.02
    wdT = (torch.randn(h, inter, device=dev, dtype=dt, generator=g) * 0.02).t().contiguous()
    x = torch.randn(1, h, device=dev, dtype=dt, generator=g)
    bw = (out.get("copy_bandwidth_GBs") or 0) * 1e9 or copy_bandwidth(dev)
    out["copy_bandwidth_GBs"] = round(bw / 1e9, 1)
    t_dense = timed(lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wdT.t()), args.iters, dev.type == "cuda")
    return g, (wg, wu, wdT, x), 3 * h * inter * wg.element_size(), bw, t_dense


def part_p(args, dev, dt, shapes, out: dict) -> None:
    """P. The Deja Vu MLP of one row with its predictor run before it (no look-ahead): the fused
    predictor + blocked selection (kernels.predict, two launches; a config sweep first) against
    the library's earlier path (the predictor's two matmuls + elementwise, then kernels.topk's
    global selection); a check of the fused lists against the float64 rule first."""
    from sparseinfer.contextual.dejavu import SELECT_BLOCK, blocked_top_indices
    from sparseinfer.kernels import predict

    cuda = dev.type == "cuda"
    h, inter = shapes["hidden_size"], shapes["intermediate_size"]
    g, (wg, wu, wdT, x), mlp_bytes, bw, t_dense = _mlp_case(args, dev, dt, shapes, out)
    iters = args.iters
    rows = [{"method": "dense MLP (cuBLAS)", "ms": t_dense, "bound_ms": mlp_bytes / bw * 1e3}]
    checks, sweep = {}, []
    lr_cfgs = [(1, 4096, 4), (1, 4096, 8), (2, 2048, 4)] if cuda else [predict.CONFIG["cpu"][0]]
    sel_cfgs = [(0, 4), (0, 8)] if cuda else [predict.CONFIG["cpu"][1]]
    blocks = (32, 64, 128) if cuda else (32,)
    for r in ([args.rank, 128] if args.rank != 128 else [128]):
        A = torch.randn(r, h, device=dev, dtype=dt, generator=g) * 0.02
        B = torch.randn(2 * inter, r, device=dev, dtype=dt, generator=g) * 0.02
        pbytes = r * (h + 2 * inter) * A.element_size()
        sc64 = glu_scores(x.double(), A.double(), B.double())
        for s in [s for s in args.sparsity if s >= 0.5]:
            k = round((1 - s) * inter)
            kept_bytes = (1 - s) * mlp_bytes
            tag = f"{s:.0%}: "
            for blk in blocks:  # the lists vs the float64 rule (bf16 inputs, fp32 sums: near-ties may differ)
                got = predict.dejavu_select(x, A, B, None, k, blk)
                want = blocked_top_indices(sc64, k, blk)
                diff = int(k - torch.isin(got, want).sum())
                checks[f"r{r} {s:.0%} block {blk}"] = diff
                log(f"  fused selection r={r} {s:.0%} block {blk}: {diff} of {k} neurons differ from the float64 rule")
            best = None
            for blk in blocks:
                for c1 in lr_cfgs:
                    for c2 in sel_cfgs:
                        for pdl in ((1, 0) if cuda else (0,)):
                            cfg = (c1, c2)
                            try:
                                ms = timed(lambda: predict._launch(x, A, B, None, k, blk, config=cfg, pdl=pdl), iters, cuda)
                            except Exception as e:
                                log(f"  config {cfg} block {blk} pdl {pdl}: {type(e).__name__}: {str(e)[:120]}")
                                continue
                            sweep.append({"rank": r, "sparsity": s, "block": blk, "config": [list(c1), list(c2)],
                                          "pdl": pdl, "ms": round(ms, 4)})
                            if best is None or ms < best[0]:
                                best = (ms, blk, cfg, pdl)
            ms, blk, cfg, pdl = best
            log(f"  fused predictor + selection r={r} {s:.0%}: best block {blk} config {cfg} pdl {pdl} {ms * 1e3:.1f} us")

            def fastest(**kw):
                return min(e["ms"] for e in sweep if e["rank"] == r and e["sparsity"] == s
                           and all(e[a] == v for a, v in kw.items()))

            for b2 in blocks:  # each block size at its best config
                rows.append({"method": tag + f"fused predictor r={r} + blocked selection ({b2}) alone",
                             "ms": fastest(block=b2), "bound_ms": pbytes / bw * 1e3})
            for flag in ((1, 0) if cuda else ()):  # PDL on / off at the best config
                rows.append({"method": tag + f"fused predictor r={r} + blocked selection ({blk}), PDL {flag} alone",
                             "ms": fastest(block=blk, config=[list(cfg[0]), list(cfg[1])], pdl=flag),
                             "bound_ms": pbytes / bw * 1e3})
            rows.append({"method": tag + f"predictor r={r} (torch) + kernels.topk global selection alone",
                         "ms": timed(lambda: select_top(glu_scores(x, A, B), k), iters, cuda), "bound_ms": pbytes / bw * 1e3})
            idx = predict._launch(x, A, B, None, k, blk, config=cfg, pdl=pdl)[0]
            rows.append({"method": tag + "listed-neurons MLP alone (library defaults)",
                         "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, idx), iters, cuda),
                         "bound_ms": kept_bytes / bw * 1e3})
            chain = [("best config", pdl, False), ("best config, no PDL", 0, False),
                     ("best config, PDL into the MLP's gate/up launch", 2, True)] if cuda else [("best config", 0, False)]
            for what, p_sel, p_mlp in chain:
                rows.append({"method": tag + f"MLP + fused predictor r={r} + blocked selection ({blk}, {what})",
                             "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(
                                 x, wg, wu, wdT, predict._launch(x, A, B, None, k, blk, config=cfg, pdl=p_sel)[0],
                                 pdl=p_mlp), iters, cuda), "bound_ms": (kept_bytes + pbytes) / bw * 1e3})
            if cuda:  # the library's chain (PDL between the launches) computes the fp32 reference, eager and replayed
                want_idx = blocked_top_indices(glu_scores(x.float(), A.float(), B.float()), k, SELECT_BLOCK)[0]
                mk = torch.zeros(1, inter, dtype=torch.bool, device=dev).scatter_(1, want_idx[None].long(), True)
                ref = gemv.dejavu_gateup_reference(x.float(), wg.float(), wu.float(), mk) @ wdT.float()

                def chain():
                    return gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, predict.dejavu_select(x, A, B, None, k, SELECT_BLOCK)[0])

                eager = chain().float()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    got_g = chain()
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                checks[f"r{r} {s:.0%} library chain rel. err vs fp32 (eager, graph)"] = [
                    round(float((eager - ref).norm() / ref.norm()), 5), round(float((got_g.float() - ref).norm() / ref.norm()), 5)]
                log(f"  library chain vs fp32 reference: {checks[f'r{r} {s:.0%} library chain rel. err vs fp32 (eager, graph)']}")
            rows.append({"method": tag + f"MLP + fused predictor r={r} + blocked selection ({SELECT_BLOCK}, library defaults)",
                         "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(
                             x, wg, wu, wdT, predict.dejavu_select(x, A, B, None, k, SELECT_BLOCK)[0]), iters, cuda),
                         "bound_ms": (kept_bytes + pbytes) / bw * 1e3})
            rows.append({"method": tag + f"MLP + predictor r={r} (torch) + global selection (earlier path)",
                         "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, select_top(glu_scores(x, A, B), k)[0]),
                                     iters, cuda), "bound_ms": (kept_bytes + pbytes) / bw * 1e3})
    for row in rows:
        row["speedup_vs_dense"] = round(t_dense / row["ms"], 3)
        row["ms"], row["bound_ms"] = round(row["ms"], 4), round(row["bound_ms"], 4)
        log(f"  {row['method']:<80} {row['ms']:.4f} ms  x{row['speedup_vs_dense']:.2f}  bound {row['bound_ms']:.4f} ms")
    out["predictor"] = {"rows": rows, "checks_neurons_differing": checks, "sweep": sweep}


def part_t(args, dev, dt, shapes, out: dict) -> None:
    """T. TEAL on the attention projections at 50%, batch 1: the fused q/k/v launch (one [H, Oq +
    Ok + Ov] transposed storage, as the patching runs it) and o_proj, the library's default call
    (config None: K splits raised to >= 2 programs per SM) against a config sweep, cuBLAS and the
    bytes bound; each result checked against the float64 reference."""
    cuda = dev.type == "cuda"
    h, hq, hkv = shapes["hidden_size"], shapes["num_attention_heads"], shapes["num_key_value_heads"]
    d = h // hq
    g = torch.Generator(device=dev).manual_seed(3)
    x = torch.randn(1, h, device=dev, dtype=dt, generator=g)
    t50 = torch.quantile(x.float().abs().flatten(), 0.5)
    bw = (out.get("copy_bandwidth_GBs") or 0) * 1e9 or copy_bandwidth(dev)
    out["copy_bandwidth_GBs"] = round(bw / 1e9, 1)
    cfgs = [(bk, bn, rows, w, 1) for bk in (32, 64) for bn in (64, 128, 256) for rows in (64, 128, 256, 512)
            for w in (2, 4, 8) if rows >= bk] if cuda else [gemv.TEAL_CONFIG["cpu"]]
    rows, sweep = [], []
    for name, n_out in (("q/k/v fused", (hq + 2 * hkv) * d), ("o_proj", h)):
        w = torch.randn(n_out, h, device=dev, dtype=dt, generator=g) * 0.02
        wt = w.t().contiguous()
        ref = (torch.where(x.double().abs() > t50.double(), x.double(), 0) @ w.double().T)
        err = lambda y: float((y.double() - ref).norm() / ref.norm())  # noqa: E731
        parts = [w[:hq * d], w[hq * d:(hq + hkv) * d], w[(hq + hkv) * d:]] if name.startswith("q") else [w]
        t_dense = timed(lambda: [F.linear(x, p) for p in parts], args.iters, cuda)
        bound = n_out * h * w.element_size() / bw * 1e3
        rows.append({"shape": name, "method": f"dense cuBLAS ({len(parts)} GEMV)", "ms": t_dense, "bound_ms": bound})
        t_lib = timed(lambda: gemv.teal_gemv_launch(x, wt, t50), args.iters, cuda)
        rows.append({"shape": name, "method": "teal 50%, library default", "ms": t_lib, "bound_ms": bound / 2,
                     "rel_err": err(gemv.teal_gemv_launch(x, wt, t50))})
        t_cmp = timed(lambda: gemv._teal(x, wt, None, t50, None, False, True), args.iters, cuda)
        rows.append({"shape": name, "method": "teal 50%, compacted rows, default config", "ms": t_cmp,
                     "bound_ms": bound / 2, "rel_err": err(gemv._teal(x, wt, None, t50, None, False, True))})
        best = None
        for c in cfgs:
            try:
                ms = timed(lambda: gemv.teal_gemv_launch(x, wt, t50, c), args.iters, cuda)
            except Exception as e:  # noqa: BLE001
                log(f"  teal {name} config {c}: {type(e).__name__}: {str(e)[:100]}")
                continue
            sweep.append({"shape": name, "config": list(c), "ms": round(ms, 4)})
            if best is None or ms < best[0]:
                best = (ms, c)
        rows.append({"shape": name, "method": f"teal 50%, best config {list(best[1])}", "ms": best[0],
                     "bound_ms": bound / 2, "rel_err": err(gemv.teal_gemv_launch(x, wt, t50, best[1]))})
        for r in rows[-4:]:
            r["speedup_vs_dense"] = round(t_dense / r["ms"], 3)
    for r in rows:
        r["ms"], r["bound_ms"] = round(r["ms"], 4), round(r["bound_ms"], 4)
        log(f"  {r['shape']:<12} {r['method']:<52} {r['ms']:.4f} ms  x{r['speedup_vs_dense']:.2f}  bound "
            f"{r['bound_ms']:.4f} ms  {r.get('rel_err', '')}")
    out["attn_proj"] = {"rows": rows, "sweep": sweep}


def part_q(args, dev, dt, shapes, out: dict) -> None:
    """Q. The Deja Vu MLP of one row behind the int4 kind's selection (kernels.predict.
    dejavu_select_int4: packed 4-bit copies of W_gate / W_up, one launch): its lists against
    the float64 rule on the dequantized weights, a config sweep, the selection alone and the
    MLP behind it at each --sparsity >= 25% vs cuBLAS's dense MLP, and the library chain vs fp32."""
    from sparseinfer.contextual.dejavu import SELECT_BLOCK, blocked_top_indices, quantized
    from sparseinfer.kernels import predict

    cuda = dev.type == "cuda"
    h, inter = shapes["hidden_size"], shapes["intermediate_size"]
    g, (wg, wu, wdT, x), mlp_bytes, bw, t_dense = _mlp_case(args, dev, dt, shapes, out)
    q = quantized([(wg, wu)], bits=4, group=64).layers[0].B
    iters = args.iters
    qbytes = q.codes.numel() + q.scales.numel() * 2
    rows = [{"method": "dense MLP (cuBLAS)", "ms": t_dense, "bound_ms": mlp_bytes / bw * 1e3}]
    gs, us = (x.double() @ q.dequantize().double().T).chunk(2, dim=-1)
    sc64 = (F.silu(gs) * us).abs()
    cfgs = [(ng, w, st) for ng in (1, 2, 4, 8) for w in (4, 8) for st in (1, 2)] if cuda \
        else [predict.INT4_CONFIG["cpu"]]
    blocks = (16, 32, 64) if cuda else (32,)
    checks, sweep = {}, []
    for s in [s for s in args.sparsity if s >= 0.25]:
        k = round((1 - s) * inter)
        kept_bytes = (1 - s) * mlp_bytes
        tag = f"{s:.0%}: "
        for blk in blocks:
            got = predict.dejavu_select_int4(x, q.codes, q.scales, k, blk)
            diff = int(k - torch.isin(got, blocked_top_indices(sc64, k, blk)).sum())
            checks[f"int4 {s:.0%} block {blk}"] = diff
            log(f"  int4 selection {s:.0%} block {blk}: {diff} of {k} neurons differ from the float64 rule")
        x4 = torch.randn(4, h, device=dev, dtype=dt, generator=g)  # a batch of 4 rows (the multi-row path)
        g4, u4 = (x4.double() @ q.dequantize().double().T).chunk(2, dim=-1)
        want4 = blocked_top_indices((F.silu(g4) * u4).abs(), k, SELECT_BLOCK)
        got4 = predict.dejavu_select_int4(x4, q.codes, q.scales, k, SELECT_BLOCK)
        checks[f"int4 {s:.0%} 4 rows"] = [int(k - torch.isin(a, b).sum()) for a, b in zip(got4, want4)]
        best = None
        for blk in blocks:
            for c in cfgs:
                for pdl in ((1, 0) if cuda else (0,)):
                    try:
                        ms = timed(lambda: predict._launch_int4(x, q.codes, q.scales, k, blk, config=c, pdl=pdl),
                                   iters, cuda)
                    except Exception as e:  # noqa: BLE001
                        log(f"  int4 config {c} block {blk}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    sweep.append({"sparsity": s, "block": blk, "config": list(c), "pdl": pdl, "ms": round(ms, 4)})
                    if best is None or ms < best[0]:
                        best = (ms, blk, c, pdl)
        ms, blk, c, pdl = best
        log(f"  int4 selection {s:.0%}: best block {blk} config {c} pdl {pdl} {ms * 1e3:.1f} us")
        rows.append({"method": tag + f"int4 selection ({blk}, best config {list(c)}) alone", "ms": ms,
                     "bound_ms": qbytes / bw * 1e3})
        rows.append({"method": tag + f"int4 selection ({SELECT_BLOCK}, library defaults) alone",
                     "ms": timed(lambda: predict.dejavu_select_int4(x, q.codes, q.scales, k, SELECT_BLOCK), iters, cuda),
                     "bound_ms": qbytes / bw * 1e3})
        idx = predict.dejavu_select_int4(x, q.codes, q.scales, k, SELECT_BLOCK)[0]
        rows.append({"method": tag + "listed-neurons MLP alone (library defaults)",
                     "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT, idx), iters, cuda),
                     "bound_ms": kept_bytes / bw * 1e3})
        for what, p_sel, p_mlp in ([("best config", pdl, False), ("best config, PDL into the MLP", 1, True)]
                                   if cuda else [("best config", 0, False)]):
            rows.append({"method": tag + f"MLP + int4 selection ({blk}, {what})",
                         "ms": timed(lambda: gemv.dejavu_mlp_rows_launch(
                             x, wg, wu, wdT, predict._launch_int4(x, q.codes, q.scales, k, blk, config=c, pdl=p_sel)[0],
                             pdl=p_mlp), iters, cuda), "bound_ms": (kept_bytes + qbytes) / bw * 1e3})

        def chain():
            return gemv.dejavu_mlp_rows_launch(x, wg, wu, wdT,
                                               predict.dejavu_select_int4(x, q.codes, q.scales, k, SELECT_BLOCK)[0])

        rows.append({"method": tag + f"MLP + int4 selection ({SELECT_BLOCK}, library defaults)",
                     "ms": timed(chain, iters, cuda), "bound_ms": (kept_bytes + qbytes) / bw * 1e3})
        want_idx = blocked_top_indices(sc64, k, SELECT_BLOCK)[0]
        mk = torch.zeros(1, inter, dtype=torch.bool, device=dev).scatter_(1, want_idx[None].long(), True)
        ref = gemv.dejavu_gateup_reference(x.float(), wg.float(), wu.float(), mk) @ wdT.float()
        checks[f"int4 {s:.0%} library chain rel. err vs fp32"] = round(float((chain().float() - ref).norm() / ref.norm()), 5)
    for row in rows:
        row["speedup_vs_dense"] = round(t_dense / row["ms"], 3)
        row["ms"], row["bound_ms"] = round(row["ms"], 4), round(row["bound_ms"], 4)
        log(f"  {row['method']:<80} {row['ms']:.4f} ms  x{row['speedup_vs_dense']:.2f}  bound {row['bound_ms']:.4f} ms")
    out["int4"] = {"rows": rows, "checks": checks, "sweep": sweep, "selection_bytes": qbytes, "mlp_bytes": mlp_bytes}


def build_model(shapes: dict, n_layers: int, dev, dt):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(shapes, num_hidden_layers=n_layers))
    torch.manual_seed(n_layers)  # the same weights (and calibration prompt) in every run: logits compare across runs
    torch.set_default_dtype(dt)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    return model.eval()


def glu_scores(x, A, B):
    """The glu predictor's MLP scores |SiLU(g~) * u~| (the library's own)."""
    return LayerPredictor(A, B, None).mlp_scores(x)


def fake_files(model, dev):
    """Thresholds from a calibration forward of the random model; random predictors (rank 256)."""
    from sparseinfer.contextual import activations, teal

    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (512,))
    acts = activations.collect(model, None, ids, 512, 512, progress=False)
    th = teal.thresholds_from(acts, progress=False)
    g = torch.Generator().manual_seed(0)
    h, i, hq = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    # kind "glu" (the default of train-predictors): B [2I, r], scores |SiLU(g~) * u~|
    pred = Predictors([LayerPredictor(torch.randn(256, h, generator=g) * 0.02, torch.randn(2 * i, 256, generator=g) * 0.02,
                                      None, torch.randn(hq, h, generator=g) * 0.02, torch.zeros(hq))
                       for _ in range(cfg.num_hidden_layers)], {"kind": "glu"})
    return th, pred


def kernel_table(step, name: str, calls: int = 10, top: int = 14) -> list:
    """GPU time per step of the `top` most expensive kernels of step() (run uncaptured, so the
    kernels are the graph's; launch gaps are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls, e.count / calls) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    log(f"  kernels of one step ({name}): {total:.1f} us in all")
    for k, us, n in rows[:top]:
        log(f"    {us:8.1f} us  x{n:<4.0f} {k[:110]}")
    return [{"kernel": k[:200], "us_per_step": round(us, 2), "launches_per_step": n} for k, us, n in rows[:top]] + \
        [{"kernel": "(all)", "us_per_step": round(total, 2)}]


COMPILED = ("dense", "dense (sparseinfer attention)", "dense (sparseinfer attention), q/k/v unfused",
            "dense (sparseinfer attention), attention 128/8 V early", "dense (sparseinfer attention), attention 64/4 V early",
            "dense (sparseinfer attention), attention 64/4", "teal mlp 50%", "teal all projections 50%",
            "teal all projections 50%, down rows 2048", "teal all projections 50%, q/k/v + o 128 x 32 steps",
            "teal all projections 50%, q/k/v + o 256 x 32 steps", "dejavu mlp 50%",
            "dejavu int4 mlp 50%",
            "dejavu mlp 50% global top-k", "dejavu mlp 50% no PDL",
            "dejavu mlp 50% + heads 50%", "dejavu mlp 50% look-ahead", "dejavu mlp 50% look-ahead + heads 50%",
            "dejavu mlp 50% look-ahead, q/k/v unfused",
            "check: teal 0% on all projections", "check: dejavu 0% mlp",
            "teal per-layer 40/60% (mean 50%), all projections")


def part_b(args, dev, dt, shapes, out: dict) -> None:
    from transformers import StaticCache

    cuda = dev.type == "cuda"
    ctx = args.context
    # every patched setting runs q/k/v as one product (patch's fuse_qkv default on a GPU, sparseinfer.qkv)
    # unless named "q/k/v unfused"; TEAL on q/k/v ("all projections") has its own one launch
    from sparseinfer.kernels import decode as decode_mod

    def attn_config(cfg):  # the dense decode kernel's config for caches of <= 2 tiles per SM ("cuda short")
        return {"flags": {"decode.DENSE_CONFIG": dict(decode_mod.DENSE_CONFIG, **{"cuda short": cfg})}}

    settings = [("dense", {}), ("dense (sparseinfer attention)", {}), ("dense (sparseinfer attention), q/k/v unfused", {}),
                # the decode attention's config in the step (block_n, warps, stages, splits, V with K, skip)
                ("dense (sparseinfer attention), attention 128/8 V early", attn_config((128, 8, 1, None, True, False))),
                ("dense (sparseinfer attention), attention 64/4 V early", attn_config((64, 4, 2, None, True, False))),
                ("dense (sparseinfer attention), attention 64/4", attn_config((64, 4, 2, None, False, False))),
                ("teal mlp 50%", dict(mlp="teal", mlp_sparsity=0.5)),
                ("teal all projections 50%", dict(mlp="teal", mlp_sparsity=0.5, contextual_options={"attn_sparsity": 0.5})),
                # teal_mlp's down launch with the 2048-row programs it had before the 1792-row default
                ("teal all projections 50%, down rows 2048", dict(
                    mlp="teal", mlp_sparsity=0.5, contextual_options={"attn_sparsity": 0.5},
                    flags={"gemv.TEAL_DOWN_CONFIG": dict(gemv.TEAL_DOWN_CONFIG, cuda=(64, 64, 2048, 8, 1, 1))})),
                # single projections (q/k/v, o) in loop steps of 128 / 256 weight rows x 32 columns, 4 warps
                # (results/contextual/teal_tall.md: o 8.7 vs 10.3 us, q/k/v 10.5 vs 11.1 us alone); not kept: the
                # step is slower, 4.260-4.281 vs 4.241-4.248 ms (step_teal_tall_rejected.md)
                *[(f"teal all projections 50%, q/k/v + o {bk} x 32 steps", dict(
                    mlp="teal", mlp_sparsity=0.5, contextual_options={"attn_sparsity": 0.5},
                    flags={"gemv.TEAL_CONFIG": dict(gemv.TEAL_CONFIG, cuda=(bk, 32, 2048, 4, 1, 1))})) for bk in (128, 256)],
                ("dejavu mlp 50%", dict(mlp="dejavu", mlp_sparsity=0.5)),
                ("dejavu int4 mlp 50%", dict(mlp="dejavu", mlp_sparsity=0.5, source="int4")),
                ("dejavu mlp 50% global top-k", dict(mlp="dejavu", mlp_sparsity=0.5,
                                                     contextual_options={"select_block": None})),
                ("dejavu mlp 50% no PDL", dict(mlp="dejavu", mlp_sparsity=0.5,
                                               flags={"pdl.DEJAVU_ROWS": False, "pdl.DEJAVU_SELECT": 0})),
                ("dejavu mlp 50% + heads 50%", dict(mlp="dejavu", mlp_sparsity=0.5, heads="dejavu", head_sparsity=0.5)),
                # predictors on the attention input: the selection overlaps the attention (side stream)
                ("dejavu mlp 50% look-ahead", dict(mlp="dejavu", mlp_sparsity=0.5, source="attn_in")),
                ("dejavu mlp 50% look-ahead, q/k/v unfused", dict(mlp="dejavu", mlp_sparsity=0.5, source="attn_in",
                                                                  fuse_qkv=False)),
                ("dejavu mlp 50% look-ahead + heads 50%", dict(mlp="dejavu", mlp_sparsity=0.5, heads="dejavu",
                                                               head_sparsity=0.5, source="attn_in")),
                # nothing dropped (threshold 0 / K = all neurons): the sparse kernels' path with no selection to flip,
                # so compiled vs eager (and vs dense) show the arithmetic alone; at 50% a near-threshold channel or
                # neuron that rounds differently flips, and such flips compound over the layers of a random model
                ("check: teal 0% on all projections", dict(mlp="teal", mlp_sparsity=0.0,
                                                           contextual_options={"attn_sparsity": 0.0})),
                ("check: dejavu 0% mlp", dict(mlp="dejavu", mlp_sparsity=0.0)),
                # per-layer sparsities with the same mean (what a calibrated allocation gives): layers at 40 / 60%
                # alternating, the 60% ones on the compacted path (gemv.COMPACT_MIN_SPARSITY)
                ("teal per-layer 40/60% (mean 50%), all projections", dict(mlp="teal", mlp_sparsity=(0.4, 0.6),
                                                                           contextual_options={"attn_sparsity": 0.5}))]
    if args.only:  # a subset of the settings (names containing one of these)
        # "=name": that name only; a list of "=name"s only: not even the stock dense step
        only = [o for o in args.only.split(";" if ";" in args.only else ",") if o]  # ";" for names with commas
        exact = all(o.startswith("=") for o in only)
        settings = [(n, kw) for n, kw in settings if (n == "dense" and not exact) or any(
            n == o[1:] if o.startswith("=") else o in n for o in only)]
    if args.no_reorder:  # inductor keeps the graph's order (look-ahead: the side-stream fork stays early)
        import torch._inductor.config as icfg

        icfg.reorder_for_locality = False
    if args.compile:  # the same settings with the step through torch.compile (fuses the
        # norms, RoPE and residual adds that otherwise cost ~0.2 ms per layer), then captured
        settings += [(f"{name} (compiled)", kw) for name, kw in settings if name in COMPILED]
        if getattr(args, "compiled_only", False):
            settings = [(n, kw) for n, kw in settings if n.endswith("(compiled)")]
    from sparseinfer.kernels import pdl as pdl_mod
    from sparseinfer.kernels import predict as predict_mod

    rows, saved_flags, saved_logits = [], [], {}
    for n_layers in (args.layers,) if getattr(args, "full", False) else (args.layers // 2, args.layers):
        model = build_model(shapes, n_layers, dev, dt)
        th, pred = fake_files(model, dev)
        pred_la = Predictors(pred.layers, dict(pred.meta, mlp_input="attn_in"))
        pred_q = quantized([(lay.mlp.gate_proj.weight.detach(), lay.mlp.up_proj.weight.detach())
                            for lay in model.model.layers])  # kind "int4" from the model's own weights
        cfg = model.config
        dense_ref = None
        # one prompt and one next token for every setting of this model, so that "vs dense" compares the
        # same inputs (before: a fresh random prompt per setting made that ratio ~1.4 for every setting)
        g_in = torch.Generator(device=dev).manual_seed(n_layers)
        ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=dev, generator=g_in)
        tok = torch.randint(0, cfg.vocab_size, (1, 1), device=dev, generator=g_in)
        for name, kw in settings:
            try:
                torch._dynamo.reset()
                compiled = name.endswith("(compiled)")
                fwd = torch.compile(model.forward, dynamic=False) if compiled else model.forward
                kw = dict(kw)  # the settings are reused for the second model size
                if isinstance(kw.get("mlp_sparsity"), tuple):  # a per-layer pattern, repeated over the layers
                    pat = kw["mlp_sparsity"]
                    kw["mlp_sparsity"] = [pat[i % len(pat)] for i in range(n_layers)]
                flags = kw.pop("flags", {})  # module switches (PDL): "module.NAME" -> value, restored below
                for f, v in flags.items():
                    mod_name, attr = f.split(".")
                    mod = {"gemv": gemv, "predict": predict_mod, "pdl": pdl_mod, "decode": decode_mod}[mod_name]
                    saved_flags.append((mod, attr, getattr(mod, attr)))
                    setattr(mod, attr, v)
                co = dict(kw.pop("contextual_options", {}), thresholds=th)
                p_used = {"attn_in": pred_la, "int4": pred_q, "mlp_in": pred}[kw.pop("source", "mlp_in")]
                handle = sparseinfer.patch(model, "dense", predictors=p_used, contextual_options=co, **kw) if kw else None
                if name.startswith("dense (sparseinfer attention)"):  # the patched model's decode attention
                    # (KV heads shared inside SDPA), without contextual sparsity: the dense step of the sparse ones
                    handle = sparseinfer.patch(model, "dense", fuse_qkv=False if "unfused" in name else None)
                cache = StaticCache(config=cfg, max_cache_len=ctx + 8)
                ck = sparseinfer.kv.cache_kwargs(model, cache)  # `cache=` from transformers 5.24
                with torch.no_grad():
                    model(input_ids=ids, **ck, cache_position=torch.arange(ctx, device=dev), use_cache=True)
                pos = torch.tensor([ctx], device=dev)
                # StaticCache layers that count tokens in a device tensor (transformers 5.17) would
                # advance on every graph replay and overflow the buffer: rewind before each step
                lengths = [lay.cumulative_length for lay in getattr(cache, "layers", [])
                           if isinstance(getattr(lay, "cumulative_length", None), torch.Tensor)]

                ctx_t = [torch.full_like(t, ctx) for t in lengths]

                def step():
                    if lengths:  # one multi-tensor launch for all layers (not one fill per layer)
                        torch._foreach_copy_(lengths, ctx_t)
                    with torch.no_grad():
                        return fwd(input_ids=tok, **ck, cache_position=pos, position_ids=pos[None],
                                   use_cache=True).logits

                check = {}
                if name == "dense":
                    dense_ref = step().float().clone()
                elif dense_ref is not None:  # what the sparsity itself changes (random weights)
                    check["rel_err_vs_dense"] = float((step().float() - dense_ref).norm() / dense_ref.norm())
                    log(f"  step logits vs the eager dense step: rel. err {check['rel_err_vs_dense']:.2e}")
                if "look-ahead" in name and not compiled:  # the side-stream selection == inline selection
                    got = step().float()
                    sparseinfer.unpatch(model)
                    handle = sparseinfer.patch(model, "dense", predictors=p_used,
                                               contextual_options=dict(co, lookahead=False), **kw)
                    want = step().float()
                    sparseinfer.unpatch(model)
                    handle = sparseinfer.patch(model, "dense", predictors=p_used, contextual_options=co, **kw)
                    check["rel_err_vs_inline_selection"] = float((got - want).norm() / want.norm())
                    log(f"  look-ahead vs inline selection: rel. err {check['rel_err_vs_inline_selection']:.2e}")
                if compiled:  # the compiled step computes what the eager one does
                    for t in lengths:
                        t.fill_(ctx)
                    with torch.no_grad():
                        ref = model(input_ids=tok, **ck, cache_position=pos, position_ids=pos[None],
                                    use_cache=True).logits.float()
                    got = step().float()
                    check["rel_err_vs_eager"] = float((got - ref).norm() / ref.norm())
                    log(f"  compiled vs eager step logits: rel. err {check['rel_err_vs_eager']:.2e}")
                    if getattr(args, "save_logits", None):  # compared across runs (benchmarks/pdl_step.py)
                        saved_logits[f"{n_layers}/{name}"] = got.cpu()
                note = "CUDA graph" if cuda else "eager"
                try:
                    ms = timed(step, args.iters // 4 or 1, cuda)
                except Exception as e:  # capture failed: eager time (launch-bound) with the reason
                    log(f"  CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eagerly")
                    note = f"eager (capture failed: {type(e).__name__})"
                    ms = timed(step, args.iters // 4 or 1, cuda, graph=False)
                if args.profile and cuda and n_layers == args.layers:
                    check["kernels"] = kernel_table(step, name)
                calls = dict(handle.contextual.stats.calls) if getattr(handle, "contextual", None) is not None else {}
                rows.append({"layers": n_layers, "setting": name, "ms": round(ms, 4), "sparse_calls": len(calls),
                             "timing": note, **check})
                log(f"  decode step, {n_layers} layers, {name:<28} {ms:.4f} ms")
            except Exception as e:
                rows.append({"layers": n_layers, "setting": name, "error": f"{type(e).__name__}: {e}"[:400]})
                log(f"  decode step, {n_layers} layers, {name}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                if hasattr(model, "_sparseinfer_patch"):
                    sparseinfer.unpatch(model)
                while saved_flags:
                    mod, attr, v = saved_flags.pop()
                    setattr(mod, attr, v)
        del model
        if cuda:
            torch.cuda.empty_cache()
    if getattr(args, "save_logits", None):
        torch.save(saved_logits, args.save_logits)
    ext = extrapolate(rows, [name for name, _ in settings], args.layers)
    for e in ext:
        log(f"  {e['setting']:<28} per layer {e['per_layer_ms']:.4f} ms, est. 32 layers {e['est_32_layers_ms']:.2f} ms "
            f"x{e.get('speedup_32_layers')}")
    out["decode_step"] = {"context": ctx, "rows": rows, "extrapolated": ext}


def extrapolate(rows: list, names: list, layers: int) -> list:
    """Per-layer time (the --layers step minus the --layers/2 one) and the 32-layer estimate of
    each setting; speedups against the fastest dense step (eager-captured or compiled, stock or
    with sparseinfer's attention) and against the fastest dense step of the same mode."""
    ext = []
    for name in names:
        a = next((r for r in rows if r["setting"] == name and r["layers"] == layers // 2 and "ms" in r), None)
        b = next((r for r in rows if r["setting"] == name and r["layers"] == layers and "ms" in r), None)
        if b and not a and layers == 32:  # --full: the 32-layer step measured, nothing extrapolated
            ext.append({"setting": name, "per_layer_ms": round(b["ms"] / 32, 4), "rest_ms": 0.0,
                        "est_32_layers_ms": b["ms"], "measured_32_layers": True})
        elif a and b:
            per = (b["ms"] - a["ms"]) / (layers - layers // 2)
            ext.append({"setting": name, "per_layer_ms": round(per, 4), "rest_ms": round(a["ms"] - per * (layers // 2), 4),
                        "est_32_layers_ms": round(a["ms"] + per * (32 - layers // 2), 3)})
    dense = [e for e in ext if e["setting"].split(" (")[0] == "dense"]
    d = min(dense, key=lambda e: e["est_32_layers_ms"], default=None)
    for e in ext:
        if d:
            e["speedup_per_layer"] = round(d["per_layer_ms"] / e["per_layer_ms"], 3) if e["per_layer_ms"] > 0 else None
            e["speedup_32_layers"] = round(d["est_32_layers_ms"] / e["est_32_layers_ms"], 3)
            e["vs_dense"] = d["setting"]
        same = min((x for x in dense if x["setting"].endswith("(compiled)") == e["setting"].endswith("(compiled)")),
                   key=lambda x: x["est_32_layers_ms"], default=None)
        if same:
            e["speedup_32_layers_same_mode"] = round(same["est_32_layers_ms"] / e["est_32_layers_ms"], 3)
    return ext


def gpu_args(p, step_help: str) -> None:
    """The arguments every one-device-call GPU script here shares."""
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--step", action="store_true", help=step_help)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="with --step: GPU time per kernel of each step")


def teal_projections(dev, dt, sh: dict) -> tuple:
    """One 8B layer's decode projections for the TEAL launch benchmarks (seed 0, bf16 weights * 0.02):
    (x [1, H], w {name: [out, in]}, wt {name: [in, out] contiguous}, hid [1, I] = SiLU(gate) * up of x,
    tx / th = the 50% thresholds of x and hid); names gate, up, down, qkv (stacked), o."""
    h, inter = sh["hidden_size"], sh["intermediate_size"]
    hq, hkv = sh["num_attention_heads"], sh["num_key_value_heads"]
    d = h // hq
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, h, device=dev, dtype=dt, generator=g)
    w = {n: torch.randn(o, i, device=dev, dtype=dt, generator=g) * 0.02 for n, (o, i) in
         {"gate": (inter, h), "up": (inter, h), "down": (h, inter), "qkv": ((hq + 2 * hkv) * d, h), "o": (h, h)}.items()}
    wt = {n: v.t().contiguous() for n, v in w.items()}
    hid = F.silu(x @ w["gate"].T) * (x @ w["up"].T)
    tx = torch.quantile(x.float().abs().flatten(), 0.5)
    th = torch.quantile(hid.float().abs().flatten(), 0.5)
    return x, w, wt, hid, tx, th


def run_header(dev) -> tuple[dict, float]:
    """(the result dict's header: device, versions, UTC date, copy bandwidth in GB/s; the bandwidth in B/s)."""
    import transformers
    import triton

    bw = copy_bandwidth(dev)
    return {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bandwidth_GBs": round(bw / 1e9, 1)}, bw


def save(out_dir: str, stem: str, res: dict, markdown) -> None:
    """res as out_dir/stem.json and markdown(res) as out_dir/stem.md (other scripts' results)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(markdown(res))
    log(f"wrote {stem}.json and {stem}.md in {out_dir}")


def write(out_dir: str, res: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "contextual.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Contextual sparsity at decode ({'smoke, CPU' if res['smoke'] else 'Llama-3.1-8B shapes'})", "",
             f"{res['device']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
             f"{res['date']}; bf16, random weights. Copy bandwidth {res.get('copy_bandwidth_GBs')} GB/s.", "",
             "## A. One MLP layer (CUDA graph per variant; bound = weight bytes read / copy bandwidth)", "",
             "| batch | method | kept share of bytes | ms | speedup vs dense | bound ms |", "|---|---|---|---|---|---|"]
    for r in res.get("mlp", []):
        lines.append(f"| {r['batch']} | {r['method']} | {r['kept']} | {r['ms']} | {r['speedup']} | {r['bound_ms']} |")
    lines += ["", f"Best kernel configs (sweep at 50%, batch 1): {res.get('best_config')}", ""]
    pr = res.get("predictor")
    if pr:
        lines += ["## P. Deja Vu MLP (batch 1) with its predictor run in front (glu kind, no look-ahead)", "",
                  "| method | ms | speedup vs dense MLP | bound ms |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['ms']} | {r['speedup_vs_dense']} | {r['bound_ms']} |" for r in pr["rows"]]
        lines += ["", f"Checks (fused lists vs the float64 rule: neurons differing, of k; the library's chain vs the fp32 "
                  f"reference): {pr['checks_neurons_differing']}", ""]
    ap = res.get("attn_proj")
    if ap:
        lines += ["## T. TEAL on the attention projections (batch 1, 50%)", "",
                  "| projection | method | ms | speedup vs dense | bound ms | rel. err vs float64 |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['method']} | {r['ms']} | {r['speedup_vs_dense']} | {r['bound_ms']} | "
                  f"{r.get('rel_err', '')} |" for r in ap["rows"]]
        lines.append("")
    q4 = res.get("int4")
    if q4:
        lines += ["## Q. Deja Vu MLP (batch 1) behind the int4 kind's selection (packed 4-bit W_gate / W_up copies, "
                  f"{q4['selection_bytes'] / q4['mlp_bytes']:.1%} of the MLP's bytes)", "",
                  "| method | ms | speedup vs dense MLP | bound ms |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['ms']} | {r['speedup_vs_dense']} | {r['bound_ms']} |" for r in q4["rows"]]
        lines += ["", f"Checks (int4 lists vs the float64 rule on the dequantized weights: neurons differing; the "
                  f"library's chain vs the fp32 reference): {q4['checks']}", ""]
    ds = res.get("decode_step")
    if ds:
        lines += [f"## B. Decode step, {ds['context']} context, CUDA graph (transformers model + sparseinfer.patch)", "",
                  "| layers | setting | ms | timing |", "|---|---|---|---|"]
        for r in ds["rows"]:
            err = f"; compiled vs eager logits rel. err {r['rel_err_vs_eager']:.1e}" if "rel_err_vs_eager" in r else ""
            err += f"; vs dense {r['rel_err_vs_dense']:.1e}" if "rel_err_vs_dense" in r else ""
            lines.append(f"| {r['layers']} | {r['setting']} | {r.get('ms', r.get('error'))} | {r.get('timing', '')}{err} |")
        measured = bool(ds["extrapolated"]) and all(e.get("measured_32_layers") for e in ds["extrapolated"])
        col = "32 layers ms (measured, --full)" if measured else "est. 32 layers ms"
        lines += ["", f"| setting | per layer ms | {col} | speedup vs the fastest dense step (32 layers) | "
                  "vs the fastest dense step of the same mode |", "|---|---|---|---|---|"]
        for e in ds["extrapolated"]:
            lines.append(f"| {e['setting']} | {e['per_layer_ms']} | {e['est_32_layers_ms']} | {e.get('speedup_32_layers')} "
                         f"({e.get('vs_dense')}) | {e.get('speedup_32_layers_same_mode')} |")
    with open(os.path.join(out_dir, "contextual.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def compact_sweep(args, dev, dt, shapes, out: dict) -> None:
    """--compact-sweep: configs of the compacted-rows path at each --sparsity (batch 1): the
    gate+up launch and the down launch alone, then the MLP with the best pair."""
    h, inter = shapes["hidden_size"], shapes["intermediate_size"]
    g = torch.Generator(device=dev).manual_seed(0)
    wg, wu, wd = (torch.randn(*sh, device=dev, dtype=dt, generator=g) * 0.02 for sh in ((inter, h), (inter, h), (h, inter)))
    wgT, wuT, wdT = wg.t().contiguous(), wu.t().contiguous(), wd.t().contiguous()
    x = torch.randn(1, h, device=dev, dtype=dt, generator=g)
    hid = F.silu(x @ wg.T) * (x @ wu.T)
    cfgs = [(64, 128, 2048, 4, 3), (64, 128, 4096, 4, 3), (64, 128, 1024, 4, 3), (128, 128, 2048, 8, 3),
            (64, 256, 2048, 8, 3), (32, 128, 2048, 4, 4), (64, 64, 2048, 4, 3), (128, 64, 2048, 4, 3),
            (64, 128, 2048, 4, 2), (64, 128, 2048, 8, 3)]
    t_dense = timed(lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd), args.iters, True)
    res = []
    for s in args.sparsity:
        tx = torch.quantile(x.float().abs().flatten(), s)
        th = torch.quantile(hid.float().abs().flatten(), s)
        best = {}
        for name, call in (("gate_up", lambda c: gemv._teal(x, wgT, wuT, tx, c, True, True)),
                           ("down", lambda c: gemv._teal(hid, wdT, None, th, c, False, True))):
            times = []
            for c in cfgs:
                try:
                    times.append((timed(lambda: call(c), args.iters, True), c))
                except Exception as e:  # noqa: BLE001
                    log(f"  compact {name} {c}: {type(e).__name__}: {str(e)[:100]}")
            for ms, c in times:
                res.append({"sparsity": s, "launch": name, "config": c, "ms": round(ms, 4)})
            best[name] = min(times)
            log(f"compact {s:.0%} {name}: best {best[name][1]} {best[name][0]:.4f} ms")
        cm = (best["gate_up"][1], best["down"][1])
        ms = timed(lambda: gemv.teal_mlp_launch(x, wgT, wuT, wdT, tx, th, cm, compact=True), args.iters, True)
        res.append({"sparsity": s, "launch": "mlp", "config": list(cm), "ms": round(ms, 4), "speedup": round(t_dense / ms, 3)})
        log(f"compact {s:.0%} MLP with the best pair: {ms:.4f} ms, x{t_dense / ms:.2f} (dense {t_dense:.4f} ms)")
    out["compact_sweep"] = res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (Triton interpreter)")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--sparsity", default="0.25,0.4,0.5,0.75")
    p.add_argument("--rank", type=int, default=256, help="Deja Vu predictor rank (default: %(default)s)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the decode-step model (and half of it)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--profile", action="store_true", help="part b: GPU time per kernel of each --layers step")
    p.add_argument("--compile", action="store_true", help="part b: also each step through torch.compile, then captured")
    p.add_argument("--skip", default="", help="comma list of parts to skip: a, p, t, q, b")
    p.add_argument("--only", default="", help="part b: only the settings whose names contain one of these (comma list; "
                   "\"=NAME\": that name only; a list of \"=NAME\"s only: without the stock dense step; separated by \";\" "
                   "where names hold commas)")
    p.add_argument("--compiled-only", action="store_true", help="part b: only the compiled steps")
    p.add_argument("--full", action="store_true", help="part b: only the --layers model (with --layers 32: the whole "
                   "8B step measured, not extrapolated from --layers / 2 and --layers)")
    p.add_argument("--no-reorder", action="store_true", help="part b: torch._inductor.config.reorder_for_locality = False")
    p.add_argument("--save-logits", default=None, help="part b: save each compiled step's logits to this file "
                   "(torch.save of {'layers/setting': logits})")
    p.add_argument("--compact-sweep", action="store_true", help="only: configs of the compacted-rows path (CUDA)")
    args = p.parse_args()
    args.batch = [int(x) for x in args.batch.split(",")]
    args.sparsity = [float(x) for x in args.sparsity.split(",")]
    skip = set(args.skip.split(","))
    import transformers
    import triton

    if args.smoke:
        dev, dt, shapes = torch.device("cpu"), torch.float32, SMOKE
        args.iters, args.context, args.layers, args.rank = 10, 64, 2, 16
        args.batch, args.sparsity = [1, 2], [0.5]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --smoke on the CPU")
        dev, dt, shapes = torch.device("cuda"), torch.bfloat16, LLAMA_31_8B
    res = {"smoke": args.smoke, "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shapes": shapes, "args": {k: v for k, v in vars(args).items()}}
    t0 = time.time()
    if args.compact_sweep:
        compact_sweep(args, dev, dt, shapes, res)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compact_sweep.json"), "w") as f:
            json.dump(res, f, indent=1)
        return 0
    for key, title, part in (("a", "A. MLP layer", part_a),
                             ("p", "P. MLP with its predictor in front (fused predictor + blocked selection)", part_p),
                             ("t", "T. TEAL on the attention projections", part_t),
                             ("q", "Q. MLP behind the int4 kind's selection", part_q)):
        if key not in skip:
            log(title)
            part(args, dev, dt, shapes, res)
            write(args.out, res)
    if "b" not in skip:
        log("B. decode step")
        part_b(args, dev, dt, shapes, res)
    res["seconds"] = round(time.time() - t0, 1)
    write(args.out, res)
    log(f"wrote {args.out}/contextual.json and contextual.md in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
