"""Adaptive sparse attention (XAttention, FlexPrefill, the learned gate) vs dense SDPA on one GPU.

One Llama-3-8B layer: B=1, 32 query heads, 8 KV heads, D=128, bf16, causal, on the structured
q/k of benchmarks/attention.py (sinks, a local band, distant diagonals, heavy columns) and
random v. The learned gate (`patch(model, "adaptive")`) has no trained weights for this shape:
it is distilled first, for one layer, on structured q/k of the same length drawn with another
seed (the library's self-distillation: dense attention max-pooled to blocks, KL;
`distilled_gate`), as training on a real model would fit it to that model's heads. For each
method and size: index estimation alone, the kernel on those indices, and both together, the
kept density, speed-up vs the faster of cuDNN / flash SDPA, % of the density limit (speed-up x
density), the recall of the dense attention mass, whether the density guard would route heads
dense, and the patched attention function itself (guards included) against its dense path.

    python benchmarks/adaptive.py --out benchmarks/results            # 32K and 128K (< 4 min on an H100)
    python benchmarks/adaptive.py --smoke --out /tmp/adaptive-smoke   # CPU, tiny shapes, < 1 min
    python benchmarks/adaptive.py --methods gate --sizes 131072       # only the methods matching "gate"

First a check: the Triton kernel on the estimated indices vs the float32 torch reference at
8K (rel. err <= 1e-2, no NaN). Writes adaptive.json + adaptive.md to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import attention as base  # noqa: E402  (benchmarks/attention.py: structured inputs, dense SDPA fns)
from sparseinfer import guards  # noqa: E402
from sparseinfer.integration import run_selections  # noqa: E402
from sparseinfer.patterns import FlexPrefill, XAttention  # noqa: E402
from sparseinfer.patterns.adaptive import AdaptiveLayer  # noqa: E402
from sparseinfer.patterns.base import combined_density  # noqa: E402
from sparseinfer.recall import RecallProbe, row_blocks  # noqa: E402

METHODS = {
    "xattention tau=0.9": lambda bs: XAttention(tau=0.9, stride=8, block_size=bs),
    "xattention tau=0.95": lambda bs: XAttention(tau=0.95, stride=8, block_size=bs),
    "xattention tau=0.9 stride=16": lambda bs: XAttention(tau=0.9, stride=16, block_size=bs),
    "flexprefill gamma=0.9": lambda bs: FlexPrefill(gamma=0.9, tau=0.1, block_size=bs),
    "flexprefill gamma=0.95": lambda bs: FlexPrefill(gamma=0.95, tau=0.1, block_size=bs),
    # the learned gate, threshold mode (patch's default 1e-3) and top-k mode, on its own block size
    "adaptive gate threshold=1e-3 block 64": lambda bs: AdaptiveLayer(distilled_gate(64), 0, threshold=1e-3),
    # patch's default dense tail (the last query block sees every causal key)
    "adaptive gate threshold=1e-3 block 64 tail 64": lambda bs: AdaptiveLayer(distilled_gate(64), 0, threshold=1e-3,
                                                                               dense_tail=64),
    "adaptive gate threshold=1e-3 block 128": lambda bs: AdaptiveLayer(distilled_gate(128), 0, threshold=1e-3),
    "adaptive gate density=0.3 block 128": lambda bs: AdaptiveLayer(distilled_gate(128), 0, density=0.3),
}
GATE_STEPS, GATE_LR = 300, 1e-2  # as `sparseinfer train-gate`
_GATES: dict = {}  # (block size, length) -> (Gates, first loss, last loss)
_CTX: dict = {"dev": torch.device("cpu"), "log": print, "n": 1024}  # n: the length being measured


def distilled_gate(block_size: int):
    """Gates of the Llama-3.1-8B shape (block `block_size`, default pooling and width) whose
    layer 0 is distilled on structured q/k of the length being measured (another seed) with
    `gate_training.train_layer` (targets from `block_targets` on every other query block);
    cached per (block size, length)."""
    key = (block_size, _CTX["n"])
    if key not in _GATES:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from gate_overhead import llama8b_config
        from sparseinfer.gate import Gates
        from sparseinfer.gate_training import LayerCache, block_targets, train_layer

        dev, t0 = _CTX["dev"], time.perf_counter()
        cfg = llama8b_config()
        if base.HQ != cfg.num_attention_heads:  # the smoke run's fewer heads
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size = base.HQ, base.HKV, base.HQ * base.D
        gates = Gates.new(cfg, block_size=block_size, model="llama-3.1-8b shape, distilled on structured q/k").to(dev)
        gates.rotary = LlamaRotaryEmbedding(cfg).to(dev)
        n = _CTX["n"]
        q, k = base.structured_qk(1, n, dev, torch.Generator(device=dev).manual_seed(1))
        with torch.no_grad():
            qf, kf = gates.features(q, k)
            rows = torch.arange(0, qf.shape[2], 2)
            target, _ = block_targets(q, k, base.D ** -0.5, block_size, rows)
        losses = train_layer(gates.layers[0], LayerCache(qf=[qf], kf=[kf], rows=[rows], target=[target]),
                             GATE_STEPS if dev.type == "cuda" else 20, GATE_LR)
        _CTX.setdefault("kl", []).append((n, block_size, losses[0], losses[-1]))
        _GATES.clear()  # one length at a time (GPU memory)
        _GATES[key] = (gates, losses[0], losses[-1])
        _CTX["log"](f"gate block {block_size}: distilled at N={n}, KL {losses[0]:.3f} -> {losses[-1]:.3f} "
                    f"({time.perf_counter() - t0:.1f} s)")
    return _GATES[key][0]


def fmt_ms(x):
    return "-" if x is None else f"{x:.2f}"


def fmt_pct(x):
    return "-" if x is None else f"{x:.0f}%"


def timed_ahead(fn, dev, reps=5):
    """Median GPU ms of fn with the host ahead of the GPU (~10 ms of full-power work queued first,
    `attention.busy_ahead`, so the host's launches overlap it, as a model's launches overlap the
    previous layer's GPU work); host synchronisations inside fn still count. None on the CPU.
    (Until session 19 the work queued first was a sleep kernel, which also let the card's clocks
    rise under its power cap: those "host ahead" numbers include 3-7% of such headroom at 128K.)"""
    if dev.type != "cuda":
        return None
    return base.bench(fn, budget_s=0.0, max_reps=reps, min_reps=reps, ahead=True)


def timed(fn, dev, budget_s=1.0, max_reps=10):
    """Median ms (CUDA events on a GPU, perf_counter on the CPU) after one warm-up."""
    if dev.type == "cuda":
        return base.bench(fn, budget_s=budget_s, max_reps=max_reps)
    fn()
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts)


def chained(fn, dev, calls=4, groups=3):
    """Median ms per call of `calls` back-to-back calls (CUDA events around the group, no sync
    between the calls), as the layers of a model call it: the host launches a call's work while
    the GPU still runs the previous one (`timed` syncs after every call, which exposes the host's
    launch time of anything that follows a host sync inside the call)."""
    if dev.type != "cuda":
        return timed(fn, dev)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(groups):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    return statistics.median(times)


def check(dev, gen, log, n, block_size, backend):
    rows = []
    _CTX["n"] = n
    q, k = base.structured_qk(1, n, dev, gen)
    v = torch.randn(1, base.HKV, n, base.D, device=dev, generator=gen).to(q.dtype)
    scale = base.D ** -0.5
    for name, make in METHODS.items():
        parts = make(block_size).select(q, k, scale)
        out = run_selections(parts, q, k, v, scale, backend)
        ref = run_selections(parts, q, k, v, scale, "reference")
        err = base.rel(out, ref)
        ok = err <= 1e-2 and bool(torch.isfinite(out).all())
        rows.append({"method": name, "N": n, "rel_err": err, "ok": ok})
        log(f"check N={n} {name}: rel err {err:.2e} {'ok' if ok else 'FAILED'}")
        pat = make(block_size)
        if isinstance(pat, AdaptiveLayer) and pat.threshold is not None:  # fused selection vs the probabilities path
            sels = [pat.select(q, k, scale, fused=f)[0].kwargs for f in (True, False)]
            nb = sels[0]["block_idx"].shape[2]
            keep = [torch.zeros(*kw["block_idx"].shape[:3], nb + 1, dtype=torch.bool, device=dev).scatter_(
                -1, torch.where(kw["block_idx"] >= 0, kw["block_idx"], nb).long(), True)[..., :nb] for kw in sels]
            for kp, kw in zip(keep, sels):  # rows from dense_from on keep every causal block
                if kw.get("dense_from") is not None:
                    kp[:, :, kw["dense_from"]:] = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()[kw["dense_from"]:]
            diff = int((keep[0] ^ keep[1]).sum())
            ok = diff <= 1e-5 * int(keep[1].sum())  # near-threshold blocks only (float32 softmax vs log-softmax)
            rows.append({"method": f"{name}: fused selection vs probabilities (blocks that differ)", "N": n,
                         "rel_err": diff / max(1, int(keep[1].sum())), "ok": ok})
            log(f"check N={n} {name}: fused selection differs in {diff} of {int(keep[1].sum())} kept blocks "
                f"{'ok' if ok else 'FAILED'}")
    # the estimation's fused path (half-precision matmul with float32 output, scale in the
    # kernels) against the torch path in float64 on the same inputs
    from sparseinfer.kernels import lastq
    from sparseinfer.patterns import flexprefill as fp
    from sparseinfer.patterns import xattention as xa

    q64, k64 = q.double(), k.double()
    d_x = float((xa.antidiagonal_mass(q, k, 8, block_size, scale, fused=True)
                 - xa.antidiagonal_mass(q64, k64, 8, block_size, scale, fused=False)).abs().max())
    ef, ep = fp.estimate(q, k, 0.9, 0.1, block_size, scale, fused=True), fp.estimate(q64, k64, 0.9, 0.1, block_size,
                                                                                     scale, fused=False)
    d_f = float(max((ef.vertical_mass - ep.vertical_mass).abs().max(), (ef.slash_mass - ep.slash_mass).abs().max()))
    ok = d_x < 2e-3 and d_f < 1e-4  # xattention's scores are bf16 (2^-9 relative rounding of each logit)
    rows.append({"method": "estimation fused vs float64 torch (max abs diff of masses)", "N": n,
                 "rel_err": max(d_x, d_f), "ok": ok, "xattention": d_x, "flexprefill": d_f,
                 "bmm_out_dtype": lastq._OUT_DTYPE[0]})
    log(f"check N={n} estimation fused vs float64: xattention mass {d_x:.1e}, flexprefill masses {d_f:.1e} "
        f"(bmm out_dtype {'used' if lastq._OUT_DTYPE[0] else 'unavailable: TF32'}) {'ok' if ok else 'FAILED'}")
    return rows


class _Attn(torch.nn.Module):
    """What the registered attention function reads of a transformers attention module."""

    def __init__(self, groups, plan):
        super().__init__()
        self.is_causal, self.num_key_value_groups, self.layer_idx = True, groups, 0
        self._sparseinfer = plan


def patched(pattern, q, k, v, scale, dev, backend):
    """The registered attention function of a patched model (`integration.sparse_attention_forward`:
    break-even length, probe, estimation, density guard, kernel, dense fallback, output layout)
    on q / k / v, with cuDNN as SDPA's backend -> (ms, route of the last call: the method or
    the reason it ran dense, dense heads). pattern None: the dense path of the same function."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparseinfer import integration as integ

    mod = _Attn(q.shape[1] // k.shape[1], integ.LayerPlan(0, pattern, 0, integ.PatchStats(), backend, set())).eval()
    fn = lambda: integ.sparse_attention_forward(mod, q, k, v, None, scaling=scale)  # noqa: E731
    ctx = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        ms = chained(fn, dev)
    rec = mod._sparseinfer.stats.records[-1]
    heads = int(rec.dense_heads.sum()) if rec.dense_heads is not None else None
    return ms, (rec.reason or rec.method), heads


def run(sizes, dev, gen, log, block_size, backend, save):
    rows = []
    scale = base.D ** -0.5
    for n in sizes:
        _CTX["n"] = n
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        q, k = base.structured_qk(1, n, dev, gen)
        v = torch.randn(1, base.HKV, n, base.D, device=dev, generator=gen).to(q.dtype)
        if dev.type == "cuda":
            dense = {name: base.bench(fn, budget_s=1.0, max_reps=10) for name, fn in base.dense_fns(q, k, v).items()}
        else:
            from sparseinfer import ops

            dense = {"sdpa": timed(lambda: ops.dense_attention(q, k, v, scale=scale), dev)}
        dms = min(dense.values())
        log(f"N={n} dense " + ", ".join(f"{k_} {v_:.2f} ms" for k_, v_ in dense.items()))
        recall_probe = RecallProbe(q, k, scale, row_blocks(n, count=4))  # dense softmax of 4 x 64 sampled rows
        patched_dense, _, _ = patched(None, q, k, v, scale, dev, backend)
        log(f"N={n} patched model's dense path {patched_dense:.2f} ms")
        rows.append({"N": n, "method": "dense", "variant": "/".join(dense), "est_ms": 0.0, "kernel_ms": dms,
                     "total_ms": dms, "dense_ms": dms, "ratio": 1.0, "density": 1.0, "pct_limit": 100.0,
                     "dense_cudnn_ms": dense.get("cudnn"), "dense_flash_ms": dense.get("flash")})
        for name, make in METHODS.items():
            pat = make(block_size)
            try:
                parts = pat.select(q, k, scale)
                est = timed(lambda: pat.select(q, k, scale), dev)
                kern = timed(lambda: run_selections(parts, q, k, v, scale, backend), dev)
                total = timed(lambda: run_selections(pat.select(q, k, scale), q, k, v, scale, backend), dev)
                total_ahead = timed_ahead(lambda: run_selections(pat.select(q, k, scale), q, k, v, scale, backend), dev)
            except torch.OutOfMemoryError:
                log(f"N={n} {name}: out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            probe_ms = timed(lambda: pat.probe(q, k, scale), dev) if hasattr(pat, "probe") else None
            recall = float(recall_probe.recall(parts).mean())
            p_ms, route, p_heads = patched(pat, q, k, v, scale, dev, backend)
            p_copy = None
            if _CTX.get("direct_ab"):  # the same with the old output layout (a [B, Hq, N, D] result + copy)
                from sparseinfer import integration as integ

                def timed_layout(direct):
                    integ.DIRECT_OUT = direct
                    try:
                        return patched(pat, q, k, v, scale, dev, backend)[0]
                    finally:
                        integ.DIRECT_OUT = True

                p_copy = timed_layout(False)  # alternated: direct, copy, direct, copy
                p_ms = min(p_ms, timed_layout(True))
                p_copy = min(p_copy, timed_layout(False))
                log(f"N={n} {name}: patched {p_ms:.2f} ms (direct output), {p_copy:.2f} ms (result + layout copy)")
            dens_h = combined_density(parts)[0].float()
            dens = float(dens_h.mean())
            if q.is_cuda:  # the integration's guard after the estimation
                over = guards.over_break_even(parts, q, backend, None)
            else:  # smoke run on the CPU: the GPU table, so the column still says something
                over = guards.over_limit(parts, [guards.BREAK_EVEN_DENSITY.get(p.op, 1.0) for p in parts])
            n_over = int(over.sum()) if over is not None else 0
            qa = int(parts[0].heads.sum()) if parts[0].heads is not None else None
            ratio = dms / total
            r = {"N": n, "method": name, "variant": f"block {block_size}", "est_ms": est, "kernel_ms": kern,
                 "total_ms": total, "dense_ms": dms, "ratio": ratio, "density": dens, "recall": recall,
                 "total_ahead_ms": total_ahead, "patched_copy_ms": p_copy,
                 "pct_limit_ahead": None if total_ahead is None else 100 * dms / total_ahead * dens,
                 "patched_ms": p_ms, "patched_dense_ms": patched_dense, "patched_ratio": patched_dense / p_ms,
                 "patched_route": route, "patched_dense_heads": p_heads,
                 "density_min": float(dens_h.min()), "density_max": float(dens_h.max()), "pct_limit": 100 * ratio * dens,
                 "heads_over_break_even": n_over, "query_aware_heads": qa, "probe_ms": probe_ms,
                 "probe_density": float(pat.probe(q, k, scale).mean()) if probe_ms is not None else None}
            rows.append(r)
            log(f"N={n:7d} {name:24s} est {est:8.2f} ms kernel {kern:8.2f} ms total {total:8.2f} ms {ratio:6.2f}x "
                f"density {100 * dens:5.1f}% (heads {100 * r['density_min']:.1f}-{100 * r['density_max']:.1f}%) "
                f"limit {r['pct_limit']:4.0f}% (host ahead: {fmt_ms(total_ahead)} ms, {fmt_pct(r['pct_limit_ahead'])}) recall {recall:.3f} patched {p_ms:.2f} ms {r['patched_ratio']:.2f}x ({route}) guard->dense {n_over}/{base.HQ}" + (f" query-aware {qa}" if qa is not None else "")
                + (f" probe {probe_ms:.2f} ms density {100 * r['probe_density']:.1f}%" if probe_ms is not None else ""))
            del parts
        del q, k, v, recall_probe
        save(rows)
    return rows


def profile(n, dev, gen, log, block_size, backend, out_dir):
    """Per-op GPU time of each method's estimation (select), kernel (run_selections) and the patched
    attention function (integration.sparse_attention_forward: probe, guards, output layout) at one size."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    _CTX["n"] = n  # the learned gate is distilled at this length
    q, k = base.structured_qk(1, n, dev, gen)
    v = torch.randn(1, base.HKV, n, base.D, device=dev, generator=gen).to(q.dtype)
    scale = base.D ** -0.5
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    lines = [f"# Per-op profile, N={n}, block {block_size}", ""]
    for name, make in METHODS.items():
        pat = make(block_size)
        parts = pat.select(q, k, scale)
        run_selections(parts, q, k, v, scale, backend)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from sparseinfer import integration as integ

        mod = _Attn(q.shape[1] // k.shape[1], integ.LayerPlan(0, pat, 0, integ.PatchStats(), backend, set())).eval()

        def patched_call():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if dev.type == "cuda" else contextlib.nullcontext():
                return integ.sparse_attention_forward(mod, q, k, v, None, scaling=scale)

        patched_call()
        for what, fn in (("estimation", lambda: pat.select(q, k, scale)),
                         ("kernel", lambda: run_selections(parts, q, k, v, scale, backend)),
                         ("patched attention function", patched_call)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            with tprofile(activities=acts) as prof:
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            try:
                table = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
            except Exception:  # older/newer key names
                table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=18,
                                                  max_name_column_width=60)
            log(f"{name} {what}:\n{table}")
            lines += [f"## {name}: {what}", "", "```", table, "```", ""]
    with open(os.path.join(out_dir, "profile.md"), "w") as f:
        f.write("\n".join(lines))
    return 0


MASS_VARIANTS = [("lastq", None), ("scores", (256, 1, 4, 1)), ("scores", (128, 4, 8, 3)), ("scores", (512, 1, 8, 3)),
                 ("scores", "16 chunks"), ("scores", "matmuls only")]


def mass_variants(n, dev, gen, log, block_size, out_dir, meta):
    """XAttention's block mass (stride 8, the estimation's dominant cost) at one size, side by
    side: "lastq" (a half-precision matmul to float32 scores + kernels.lastq's two passes),
    "scores" (half-precision cuBLAS scores per query head, then one reduction pass,
    kernels.xattn.scores_block_mass; config = (key groups per step, query blocks per program,
    num_warps, stages)), "matmuls only" (the reduction skipped); max abs diff of the row-normalised masses against the first and the
    share of kept blocks (tau 0.9) that change. Then the selection: threshold_rows +
    table_to_index (torch) vs kernels.xattn.select_blocks, same indices required."""
    from sparseinfer.kernels import xattn
    from sparseinfer.patterns import xattention as xa

    q, k = base.structured_qk(1, n, dev, gen)
    scale = base.D ** -0.5
    rows, ref, ref_keep = [], None, None
    taus = xa.head_values("tau", 0.9, base.HQ, q.device, 0.0, 1.0).float()
    default = (xa.MASS_KERNEL, xattn.SCORES_CONFIG, xa.MIN_CHUNKS, xattn.scores_block_mass)
    for kind, cfg in MASS_VARIANTS:
        xa.MASS_KERNEL = kind
        if isinstance(cfg, tuple):
            xattn.SCORES_CONFIG = cfg
        elif cfg is not None and cfg.endswith("chunks"):
            xa.MIN_CHUNKS = int(cfg.split()[0])
        elif cfg == "matmuls only":  # the reduction pass skipped: what the matmuls alone cost
            xattn.scores_block_mass = lambda s, out, *a: out.fill_(1.0)
        try:
            fn = lambda: xa.antidiagonal_mass(q, k, 8, block_size, scale)  # noqa: E731
            m = fn()
            ms = timed(fn, dev)
        except Exception as e:  # a config that does not compile / fit: recorded, not fatal
            log(f"mass N={n} {kind} {cfg}: {type(e).__name__}: {str(e)[:200]}")
            continue
        finally:
            xa.MASS_KERNEL, xattn.SCORES_CONFIG, xa.MIN_CHUNKS, xattn.scores_block_mass = default
        keep = xa.threshold_rows(m, taus)
        ref, ref_keep = (m, keep) if ref is None else (ref, ref_keep)
        diff = float((m - ref).abs().max())
        flips = float((keep != ref_keep).sum() / ref_keep.sum())  # blocks kept by one and not the other
        rows.append({"N": n, "kernel": kind, "config": cfg, "ms": ms, "max_abs_diff": diff, "keep_flips": flips})
        log(f"mass N={n} {kind:6s} {str(cfg):20s}: {ms:7.2f} ms, max abs diff vs lastq {diff:.1e}, "
            f"kept blocks changed (tau 0.9) {100 * flips:.3f}%")
        del m
    m = xa.antidiagonal_mass(q, k, 8, block_size, scale)
    sel = {"torch": timed(lambda: xa.select_rows(m, taus), dev),
           "kernel": timed(lambda: xa.select_rows(m, taus, fused=True), dev)}
    a, b = xa.select_rows(m, taus), xa.select_rows(m, taus, fused=True)
    same = bool(torch.equal(a, b))
    if not same:  # which rows differ, and by how much kept mass (float rounding at the tau boundary?)
        w = max(a.shape[-1], b.shape[-1])
        a, b = (torch.nn.functional.pad(x, (0, w - x.shape[-1]), value=-1) for x in (a, b))
        nbk = m.shape[-1]  # padding (-1) goes to a spill column nbk
        ka, kb = (torch.zeros(*m.shape[:-1], nbk + 1, dtype=torch.bool, device=m.device).scatter_(
            -1, torch.where(x >= 0, x, nbk), True)[..., :nbk] for x in (a, b))
        rows_diff = (ka != kb).any(-1)
        dmass = ((m * ka).sum(-1) - (m * kb).sum(-1)).abs()
        sel["rows_differing"] = int(rows_diff.sum())
        sel["max_kept_mass_diff"] = float(dmass.max())
        sel["min_kept_mass_kernel_minus_tau"] = float(((m * kb).sum(-1) - 0.9).min())
        log(f"selection differs in {sel['rows_differing']} of {rows_diff.numel()} rows; kept mass differs by at "
            f"most {sel['max_kept_mass_diff']:.1e}; kernel's kept mass - tau >= {sel['min_kept_mass_kernel_minus_tau']:.1e}")
    log(f"selection N={n}: torch {sel['torch']:.2f} ms, kernel {sel['kernel']:.2f} ms, same indices {same}")
    lines = [f"# XAttention block mass (stride 8, block {block_size}), N={n}, {meta['device']}", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; one Llama-3-8B layer (Hq={base.HQ}, "
             f"Hkv={base.HKV}, D=128, bf16), structured q/k. See `mass_variants` in benchmarks/adaptive.py for the kernels.",
             "", "| kernel | config | ms | max abs diff vs lastq | kept blocks changed at tau 0.9 |", "|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['config']} | {r['ms']:.2f} | {r['max_abs_diff']:.1e} | {100 * r['keep_flips']:.3f}% |"
              for r in rows]
    lines += ["", f"Selection at tau 0.9 (threshold, sink + diagonal, index): torch {sel['torch']:.2f} ms, "
              f"kernels.xattn.select_blocks {sel['kernel']:.2f} ms; same indices: {same}" +
              ("" if same else f" ({sel['rows_differing']} rows differ; kept mass differs by <= "
                               f"{sel['max_kept_mass_diff']:.1e}; the kernel's kept mass - tau >= "
                               f"{sel['min_kept_mass_kernel_minus_tau']:.1e})") + "."]
    with open(os.path.join(out_dir, "adaptive_mass.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "adaptive_mass.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "selection_ms": sel, "selection_same": same}, f, indent=1)
    return rows


def markdown(meta, checks, rows):
    out = [f"# XAttention / FlexPrefill / learned gate vs dense SDPA, {meta['device']}", "",
           f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; "
           f"one Llama-3-8B layer (B=1, Hq={meta['hq']}, Hkv={meta['hkv']}, D=128, bf16), structured q/k (benchmarks/attention.py), "
           f"block size {meta['block_size']}. Command: `{meta['command']}`.", "",
           "est = index estimation alone; kernel = the ops on those indices; total = both (what a patched layer "
           "pays, timed from an idle GPU: the host's launches are exposed). host ahead: the same with ~10 ms of "
           "full-power matrix products queued first, so the launches overlap them as they overlap the previous layer's "
           "GPU work in a model (host synchronisations still count), and its % limit. "
           "ratio = dense / total (dense = the faster of cuDNN and flash SDPA); % limit = ratio x density. "
           "guard->dense: heads whose density is above the kernel's break-even density (they would run dense). "
           "recall: the share of the dense softmax mass the kept indices cover, mean over heads and 4 x 64 sampled "
           "query rows (`sparseinfer.recall`). patched: the registered attention function of a patched model "
           "(`integration.sparse_attention_forward`: break-even length, probe, estimation, density guard, kernel, "
           "dense fallback, output layout; cuDNN SDPA; 4 calls back to back per timing, as a model's layers call it) "
           "against its own dense path; route: how the call ran "
           "(the method, or why dense: break-even, density).", "",
           "probe = the density guard's pre-check (the estimate on 16 query blocks) and the density it predicts.", ""]
    if meta.get("gate_kl"):
        out += ["learned gate (`AdaptiveLayer`, default pooling avg/max/min and width): distilled for one layer on "
                f"structured q/k of each measured length, another seed ({GATE_STEPS} Adam steps, lr {GATE_LR}; KL to "
                "the max-pooled dense targets: " + ", ".join(f"N={n} block {b} {l0:.3f} -> {l1:.3f}" for n, b, l0, l1 in
                                                           meta.get("gate_kl", [])) +
                "); its est ms = pooled features + gate scores + selection + index.", ""]
    out += [
           "| N | method | est ms | kernel ms | total ms | dense ms | ratio | density (heads min-max) | % limit "
           "| total, host ahead ms (% limit) | recall "
           "| guard->dense | probe ms (density) | patched ms (its dense path) | patched ratio | patched route |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    def patched_cells(r):
        if r.get("patched_ms") is None:
            return " - | - | - |"
        heads = f" ({r['patched_dense_heads']} heads dense)" if r.get("patched_dense_heads") else ""
        return (f" {r['patched_ms']:.2f} ({r['patched_dense_ms']:.2f}) | {r['patched_ratio']:.2f}x | "
                f"{r['patched_route']}{heads} |")

    for r in rows:
        if r["method"] == "dense":
            continue
        out.append(f"| {r['N']} | {r['method']} | {r['est_ms']:.2f} | {r['kernel_ms']:.2f} | {r['total_ms']:.2f} | "
                   f"{r['dense_ms']:.2f} | {r['ratio']:.2f}x | {100 * r['density']:.1f}% ({100 * r['density_min']:.0f}-"
                   f"{100 * r['density_max']:.0f}%) | {r['pct_limit']:.0f}% | {fmt_ms(r.get('total_ahead_ms'))} "
                   f"({fmt_pct(r.get('pct_limit_ahead'))}) | {fmt(r.get('recall'))} | {r['heads_over_break_even']}/{meta['hq']} | "
                   + (f"{r['probe_ms']:.2f} ({100 * r['probe_density']:.1f}%) |" if r.get("probe_ms") is not None else "- |")
                   + patched_cells(r))
    out += ["", "Check (Triton vs float32 reference on the same estimated indices): " +
            ", ".join(f"{c['method']} N={c['N']} {c['rel_err']:.1e}{'' if c['ok'] else ' FAILED'}" for c in checks)]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32768,131072")
    ap.add_argument("--block-size", type=int, default=128, help="KV/query block (XAttention and FlexPrefill use 128)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (torch reference ops), < 1 min")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--profile", action="store_true",
                    help="only: GPU time per op of each method's estimation and kernel at the largest size (profile.md)")
    ap.add_argument("--methods", default="",
                    help="comma-separated substrings: only the methods whose name contains one (default: all)")
    ap.add_argument("--mass", action="store_true",
                    help="first: XAttention's block mass kernels side by side at the largest size (adaptive_mass.md)")
    ap.add_argument("--direct-out-ab", action="store_true",
                    help="also time the patched function with integration.DIRECT_OUT off (result + layout copy)")
    ap.add_argument("--flags", default="",
                    help="sparseinfer.kernels.attention.FLAGS entries set first, e.g. 'BS_PAIRS=0,PF=0'")
    args = ap.parse_args()
    try:
        base.set_flags(args.flags)  # benchmarks/attention.py: one parser for both scripts
    except ValueError as e:
        ap.error(str(e))
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and dev.type != "cuda":
        ap.error("no CUDA device: run on a GPU, or pass --smoke")
    sizes = [1024] if args.smoke else [int(s) for s in args.sizes.split(",")]
    if args.smoke:  # fewer heads on the CPU (structured_qk needs D = 128)
        base.HQ, base.HKV = 8, 2
    backend = "reference" if args.smoke else "auto"
    if args.methods:
        want = [w.strip() for w in args.methods.split(",") if w.strip()]
        for name in [m for m in METHODS if not any(w in m for w in want)]:
            del METHODS[name]
        if not METHODS:
            ap.error(f"--methods {args.methods!r} matches none of the methods")
    gen = torch.Generator(device=dev).manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    import triton

    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sizes": sizes, "block_size": args.block_size, "smoke": args.smoke, "flags": args.flags,
            "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])}
    t0 = time.perf_counter()

    def log(s):
        print(f"[{time.perf_counter() - t0:6.1f}s] {s}", flush=True)

    _CTX.update(dev=dev, log=log, direct_ab=args.direct_out_ab)

    checks = []

    def save(rows):
        meta["gate_kl"] = _CTX.get("kl", [])
        with open(os.path.join(args.out, "adaptive.json"), "w") as f:
            json.dump({"meta": meta, "check": checks, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "adaptive.md"), "w") as f:
            f.write(markdown(meta, checks, rows))

    meta["hq"], meta["hkv"] = base.HQ, base.HKV
    if args.profile:
        return profile(sizes[-1], dev, gen, log, args.block_size, backend, args.out)
    log(f"device {meta['device']}, sizes {sizes}, block {args.block_size}")
    if args.mass:
        mass_variants(sizes[-1], dev, gen, log, args.block_size, args.out, meta)
    checks += check(dev, gen, log, 512 if args.smoke else 8192, args.block_size, backend if dev.type == "cuda" else "triton"
                    if os.environ.get("TRITON_INTERPRET") else "reference")
    rows = run(sizes, dev, gen, log, args.block_size, backend, save)
    save(rows)
    log(f"wrote {os.path.join(args.out, 'adaptive.md')} and adaptive.json")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
