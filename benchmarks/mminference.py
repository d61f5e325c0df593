"""MMInference on a synthetic video input: one Llama-3-8B-shaped attention layer vs dense SDPA.

B=1, 32 query heads, 8 KV heads, D=128, bf16, causal. Input (sparseinfer.synthetic_video):
a text prefix, video frames of --frame tokens (default 1024, as the issue asks) with a 64-token
text segment after every 4 frames, a text suffix; q/k carry a planted grid per KV head (vertical + horizontal
lines at the frame period, random phase), a sink, a local band and a few text verticals.

    python benchmarks/mminference.py --out benchmarks/results/mminference      # H100: 128K, 256K, 512K
    python benchmarks/mminference.py --smoke --out /tmp/mm-smoke                # CPU, tiny, < 1 min

Variants (each: estimation ms, kernel ms, total, density, ratio vs the faster dense SDPA
backend in the same run, % of the density limit = ratio x density, output rel. error vs dense,
attention recall on sampled query rows):
  mm-q-grid   Q-boundary: text/image vertical-slash (1000 verticals, 1024 slashes), video grid
              (128 sink, 1024 window, lines estimated from the last 64 video queries)
  mm-2d-grid  2D-boundary: the same, verticals per key modality (500 text + 500 video)
  mm-q-vs     Q-boundary with vertical-slash for video too (1000 / 1024), no grid
  vs          MInference vertical-slash (1000 / 6096) estimated from the last 64 queries (text)
  vs-video    vertical-slash 1000 / 1024 (about mm-q-grid's density), last queries
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseinfer import ops  # noqa: E402
from sparseinfer.ops import reference as ref  # noqa: E402
from sparseinfer.ops.mm import mm_rows  # noqa: E402
from sparseinfer.patterns.mm import MMInferenceLayer, ModalityContext  # noqa: E402
from sparseinfer.patterns.vertical_slash import VerticalSlash  # noqa: E402
from sparseinfer.synthetic_video import video_qkv  # noqa: E402


def variants(smoke: bool) -> dict:
    s = 0.125 if smoke else 1  # token budgets scale down with the smoke shapes
    nv, ns, sink, win = int(1000 * s), int(1024 * s), int(128 * s), int(1024 * s)
    text = {"pattern": "vertical_slash", "vertical": nv, "slash": ns}
    grid = {"pattern": "grid", "sink": sink, "window": win}
    return {
        "mm-q-grid": ("mm", {"boundary": "q", "intra": {"all": text, "video": grid}}),
        "mm-2d-grid": ("mm", {"boundary": "2d", "intra": {
            "all": dict(text, vertical={"text": nv // 2, "video": nv // 2}), "video": grid}}),
        "mm-q-vs": ("mm", {"boundary": "q", "intra": {"all": text}}),
        "vs": ("vs", {"vertical": nv, "slash": int(6096 * s)}),
        "vs-video": ("vs", {"vertical": nv, "slash": ns}),
    }


def timer(dev):
    """ms per call: on CUDA benchmarks/attention.py's `bench` (CUDA events, median); on the CPU one call."""
    if dev.type == "cuda":
        from attention import bench as cuda_bench

        return lambda fn, budget_s=1.5, max_reps=10, min_reps=2: cuda_bench(fn, budget_s, max_reps, min_reps)

    def bench(fn, budget_s=1.5, max_reps=10, min_reps=2):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return bench


def dense_fns(q, k, v, dev):
    if dev.type != "cuda":
        return {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def mk(backend, rep=False):
        def f():
            kk, vv = (k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)) \
                if rep else (k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not rep)
        return f

    def cudnn():
        try:
            return mk(SDPBackend.CUDNN_ATTENTION)()
        except RuntimeError:  # no GQA in this cuDNN path: repeat K/V (baseline only)
            return mk(SDPBackend.CUDNN_ATTENTION, rep=True)()

    return {"cudnn": cudnn, "flash": mk(SDPBackend.FLASH_ATTENTION)}


def recall(q, k, rows_fn, windows, scale):
    """Share of the dense softmax mass inside the mask, on query windows [(i0, i1)], float32."""
    got = tot = 0.0
    g = q.shape[1] // k.shape[1]
    for i0, i1 in windows:
        s = torch.matmul(q[:, :, i0:i1].float(), k[:, :, :i1].float().repeat_interleave(g, 1).transpose(-1, -2)) * scale
        causal = torch.arange(i0, i1, device=q.device)[:, None] >= torch.arange(i1, device=q.device)[None, :]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        m = rows_fn(i0, i1) & causal
        got += float((p * m).sum())
        tot += float(p.sum())
    return got / tot


def profile(args, log, q, k, v, mod, n):
    """Per-op CUDA time (torch.profiler) of one estimation + one kernel call per mm variant."""
    from torch.profiler import ProfilerActivity, profile as tprof

    scale = q.shape[-1] ** -0.5
    for name, (kind, spec) in variants(args.smoke).items():
        if args.variants and name not in args.variants:
            continue
        pat = (MMInferenceLayer([spec] * q.shape[1], ModalityContext(mod, args.frame),
                                strides=tuple(args.strides) if args.strides else None)
               if kind == "mm" else VerticalSlash(**spec))
        for _ in range(2):  # warm-up (compile)
            (sel,) = pat.select(q, k, scale)
            getattr(ops, sel.op)(q, k, v, **sel.kwargs, scale=scale, backend="triton")
        torch.cuda.synchronize()
        for part in ("est", "kernel"):
            with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                if part == "est":
                    (sel,) = pat.select(q, k, scale)
                else:
                    getattr(ops, sel.op)(q, k, v, **sel.kwargs, scale=scale, backend="triton")
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
            log(f"--- profile N={n} {name} {part}\n{table}")
            if part == "kernel":
                ev = [e for e in prof.events() if e.name == "sparse_fwd_kernel"]
                log(f"--- launches N={n} {name}: " + ", ".join(
                    f"{getattr(e, 'device_time', getattr(e, 'cuda_time', 0.0)) / 1e3:.2f} ms" for e in ev))
        if kind == "mm":  # kernel time split: without each slot's index, without the dense rows
            bench = timer(q.device)
            kw = sel.kwargs
            full = bench(lambda: ops.mm_attention(q, k, v, **kw, scale=scale, backend="triton"))
            parts = {"full": full}
            for a in range(kw["vertical_idx"].shape[2]):
                vi, si = kw["vertical_idx"].clone(), kw["slash_idx"].clone()
                vi[:, :, a] = -1
                si[:, :, a] = -1
                parts[f"slot {a} empty"] = bench(lambda: ops.mm_attention(
                    q, k, v, kw["modality"], vi, si, kw["dense_rows"], scale=scale, backend="triton", slots=kw["slots"]))
            parts["no dense rows"] = bench(lambda: ops.mm_attention(
                q, k, v, kw["modality"], kw["vertical_idx"], kw["slash_idx"], None, scale=scale, backend="triton",
                slots=kw["slots"]))
            log(f"--- kernel split N={n} {name}: " + ", ".join(f"{k_}: {v_:.2f} ms" for k_, v_ in parts.items()))


def grid_recovered(kw: dict, mod: torch.Tensor, strides: torch.Tensor, phases: torch.Tensor) -> str:
    """'k/H': heads whose dense rows (the estimated horizontal lines, video slot) are exactly the
    video positions of the planted (stride, phase) of their KV head."""
    rows = kw["dense_rows"][0].cpu()
    hq = rows.shape[0]
    g = hq // len(strides)
    pos = torch.arange(mod.shape[-1])
    video = mod[0].cpu() == 2
    ok = 0
    for h in range(hq):
        want = pos[video & (pos % int(strides[h // g]) == int(phases[h // g]))]
        got = rows[h][rows[h] >= 0].sort().values
        ok += bool(got.shape == want.shape and (got == want).all())
    return f"{ok}/{hq}"


def run(args, log):
    dev = torch.device("cpu" if args.smoke else "cuda")
    hq, hkv, d = (2, 1, 32) if args.smoke else (32, 8, 128)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    backend = "triton"
    bench = timer(dev)
    rows = []
    # check: the kernel path vs the torch reference on the same indices (small N)
    nc = 256 if args.smoke else 8192
    q, k, v, mod, _, _ = video_qkv(1, hq, hkv, nc, d, args.frame, seed=1, device=dev, dtype=dtype)
    for name, (kind, spec) in variants(args.smoke).items():
        if kind != "mm":
            continue
        (sel,) = MMInferenceLayer([spec] * hq, ModalityContext(mod, args.frame)).select(q, k, d ** -0.5)
        o = ops.mm_attention(q, k, v, **sel.kwargs, scale=d ** -0.5, backend=backend).float()
        r = ops.mm_attention(q.float(), k.float(), v.float(), **sel.kwargs, scale=d ** -0.5, backend="reference")
        err = float((o - r).norm() / r.norm())
        log(f"check N={nc} {name}: kernel vs float32 reference rel err {err:.2e}, NaN {bool(o.isnan().any())}")
        rows.append(dict(N=nc, variant=f"check {name}", est_ms=0.0, kernel_ms=0.0, ms=0.0, ratio=0.0,
                         density=float(sel.density.float().mean()), pct_limit=0.0, err=err, recall=float("nan")))
    for n in args.sizes:
        t0 = time.time()
        q, k, v, mod, strides, phases = video_qkv(1, hq, hkv, n, d, args.frame, seed=0, device=dev, dtype=dtype)
        scale = d ** -0.5
        log(f"N={n}: inputs in {time.time() - t0:.1f}s; video share {float((mod == 2).float().mean()):.3f}; "
            f"planted strides {strides.tolist()} phases {phases.tolist()}")
        if args.profile:
            profile(args, log, q, k, v, mod, n)
            continue
        dense = dense_fns(q, k, v, dev)
        dense_ms = {name: bench(fn) for name, fn in dense.items()}
        best = min(dense_ms, key=dense_ms.get)
        o_dense = dense[best]()
        for name, ms in dense_ms.items():
            rows.append(dict(N=n, variant=f"dense-{name}", est_ms=0.0, kernel_ms=ms, ms=ms, ratio=dense_ms[best] / ms,
                             density=1.0, pct_limit=100 * dense_ms[best] / ms, err=0.0, recall=1.0))
            log(f"  dense {name}: {ms:.2f} ms")
        windows = [(int(n * f), int(n * f) + (16 if args.smoke else 32)) for f in (0.3, 0.55, 0.8)] + [(n - 32, n)]
        ctx = ModalityContext(mod, args.frame)
        for name, (kind, spec) in variants(args.smoke).items():
            if args.variants and name not in args.variants:
                continue
            try:
                if kind == "mm":
                    pat = MMInferenceLayer([spec] * hq, ctx, strides=tuple(args.strides) if args.strides else None)
                else:
                    pat = VerticalSlash(**spec)
                est = lambda: pat.select(q, k, scale)  # noqa: E731
                est_ms = bench(est)
                (sel,) = est()
                got = {}
                run_op = lambda: got.setdefault("out", getattr(ops, sel.op)(q, k, v, **sel.kwargs, scale=scale,  # noqa: E731
                                                                          backend=backend))
                kern_ms = bench(lambda: (got.clear(), run_op()))
                if args.smoke:  # the interpreter is slow: no separate end-to-end timing
                    total = est_ms + kern_ms
                else:
                    total = bench(lambda: (lambda s: getattr(ops, s[0].op)(q, k, v, **s[0].kwargs, scale=scale,
                                                                           backend=backend))(est()))
                out = got["out"]
                err = float((out.float() - o_dense.float()).norm() / o_dense.float().norm())
                dens = float(sel.density.float().mean())
                kw = sel.kwargs
                if kind == "mm":
                    rf = mm_rows(n, kw["modality"], kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])
                else:
                    rf = ref.vertical_slash_rows(n, kw["vertical_idx"], kw["slash_idx"])
                rec = recall(q, k, rf, windows, scale)
                ratio = dense_ms[best] / total
                grid_ok = grid_recovered(kw, mod, strides, phases) if "grid" in name else ""
                rows.append(dict(N=n, variant=name, est_ms=est_ms, kernel_ms=kern_ms, ms=total, ratio=ratio,
                                 density=dens, pct_limit=100 * ratio * dens, err=err, recall=rec, grid=grid_ok))
                log(f"  {name}: est {est_ms:.2f} + kernel {kern_ms:.2f} -> {total:.2f} ms, {ratio:.2f}x, "
                    f"density {100 * dens:.2f}%, {100 * ratio * dens:.0f}% of limit, err {err:.3f}, recall {rec:.3f}"
                    + (f", planted grid lines recovered exactly in {grid_ok} heads" if grid_ok else ""))
            except Exception:
                log(f"  {name}: FAILED\n{traceback.format_exc()}")
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del q, k, v, o_dense
    return rows


def markdown(meta, rows):
    out = [f"# MMInference on a synthetic video input, {meta['device']}", "",
           f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; "
           f"B=1, {meta['hq']} q heads / {meta['hkv']} KV heads, D={meta['d']}, {meta['dtype']}, causal; frame "
           f"{meta['frame']} tokens, a 64-token text segment every 4 frames. ms = median; ratio vs the faster "
           "dense SDPA backend of the same run (estimation included); % limit = ratio x density; err = "
           "||o - o_dense|| / ||o_dense||; recall = dense softmax mass kept on sampled query rows; grid lines = "
           "heads whose estimated horizontal lines are exactly the planted ones.", "",
           "| N | variant | est ms | kernel ms | total ms | ratio | density | % of limit | err | recall | grid lines |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['N'] // 1024}K | {r['variant']} | {r['est_ms']:.2f} | {r['kernel_ms']:.2f} | {r['ms']:.2f} | "
                   f"{r['ratio']:.2f}x | {100 * r['density']:.2f}% | {r['pct_limit']:.0f}% | {r['err']:.3f} | "
                   f"{r['recall']:.3f} | {r.get('grid') or '—'} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 131072,262144,524288; smoke 512)")
    ap.add_argument("--frame", type=int, default=None, help="tokens per frame (default 1024; smoke 32)")
    ap.add_argument("--strides", default=None, help="grid candidate strides (default multiples of 16 to 1024 + frame)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--variants", default=None, help="comma-separated variant names (default all)")
    ap.add_argument("--profile", action="store_true", help="per-op CUDA profile of each variant instead of timings")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mminference"))
    args = ap.parse_args()
    args.sizes = [int(s) for s in (args.sizes or ("512" if args.smoke else "131072,262144,524288")).split(",")]
    args.frame = args.frame or (32 if args.smoke else 1024)
    args.strides = [int(s) for s in args.strides.split(",")] if args.strides else None
    args.variants = args.variants.split(",") if args.variants else None
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    import triton

    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "hq": 2 if args.smoke else 32, "hkv": 1 if args.smoke else 8, "d": 32 if args.smoke else 128,
            "dtype": "float32" if args.smoke else "bfloat16", "frame": args.frame, "sizes": args.sizes,
            "variants": {k: v[1] for k, v in variants(args.smoke).items()}}
    log(json.dumps(meta))
    rows = []
    try:
        rows = run(args, log)
    except Exception:
        log(traceback.format_exc())
    finally:
        with open(os.path.join(args.out, "mminference.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "mminference.md"), "w") as f:
            f.write(markdown(meta, rows))
        with open(os.path.join(args.out, "mminference.log"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
