"""Where the index construction of the pre-filling ops spends its time (one GPU call).

For the realistic vertical-slash (1000 / 6096) and block-sparse (top-100 of 64-blocks) indices of
benchmarks/attention.py at each size: the construction alone timed with CUDA events (what a
benchmark row pays when the GPU waits for the host), its host time (perf_counter around the
launches, no sync), and the GPU time of its kernels (torch.profiler), then the op with and
without the construction (the kernel on a prebuilt index).

    python benchmarks/profile_index.py --sizes 131072,524288 [--out DIR]
    python benchmarks/profile_index.py --smoke        # CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import attention as base  # noqa: E402
from sparseinfer import index as sidx  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402
from sparseinfer.kernels import graphed  # noqa: E402
from sparseinfer.kernels import gluon as kg  # noqa: E402
from sparseinfer.kernels import runs as kruns  # noqa: E402


def host_ms(fn, reps=5):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return sorted(ts)[len(ts) // 2]


TOP = 6  # kernels listed per construction (--top)


def gpu_ms(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = prof.key_averages()
    tot = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in evs) / 1e3
    top = sorted(evs, key=lambda e: -getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))[:TOP]
    return tot, [(e.key[:50], round(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3, 3),
                  e.count) for e in top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="131072,524288")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="profile_index")
    ap.add_argument("--top", type=int, default=6, help="kernels listed per construction (by GPU time)")
    ap.add_argument("--only", default="", help="time only the constructions whose name contains this")
    args = ap.parse_args()
    global TOP
    TOP = args.top
    dev = torch.device("cpu" if args.smoke else "cuda")
    sizes = [2048] if args.smoke else [int(s) for s in args.sizes.split(",")]
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    for n in sizes:
        gen = torch.Generator(device=dev).manual_seed(0)
        hq = 4 if args.smoke else base.HQ
        vi, si = base.realistic_vs(1, hq, n, dev, gen)
        bi = base.realistic_blocks(1, hq, n, dev, gen)
        vs_cfg = katt._config("vs", base.D, dev, None)
        bm, bn, *rest = vs_cfg
        tiles_n = bn if rest[3] == 4 else None
        band_bm = katt._config("ashape", base.D, dev)[0]

        def vs_plain(a, b):
            return sidx.from_vertical_slash(a, b, n, bm, block_n=tiles_n)

        narrow = int(kg.CONFIGS["vs"].get("narrow", 0)) if dev.type == "cuda" else 0

        def vs_library(a, b, narrow_n=narrow):
            """As vertical_slash_attention builds it for the Gluon kernel (band apart, tile cap, fused
            runs, narrow edges from the relative-tiles launch)."""
            return sidx.from_vertical_slash(a, b, n, bm, block_n=tiles_n, band_block_m=band_bm,
                                            band_min=katt.VS_BAND_MIN, max_tiled=katt.FLAGS["VS_TILED_RUNS"] or None,
                                            fused_runs=bool(katt.FLAGS["VS_RUNS_KERNEL"]) and a.is_cuda,
                                            narrow_n=narrow_n)

        def vs_library_split(a, b):  # the narrow edges split off by torch ops (sorts) instead (session 31)
            idx, band = vs_library(a, b, 0)
            return (sidx.split_narrow_edges(idx, narrow) if narrow else idx), band

        def warps(w):  # the library build with slash_runs on w warps (runs._warps picks 16 for 6097 slashes)
            def build(a, b):
                keep = kruns._warps
                kruns._warps = lambda block: w
                try:
                    return vs_library(a, b)
                finally:
                    kruns._warps = keep
            return build

        def bs_build(a):
            return sidx.from_block_sparse(a, base.BS, n, 64, 64)

        builds = {"vertical-slash index": (vs_plain, (vi, si)), "vertical-slash index (library)": (vs_library, (vi, si)),
                  "vertical-slash index (library, narrow split by torch)": (vs_library_split, (vi, si)),
                  "block-sparse index": (bs_build, (bi,))}
        if dev.type == "cuda":
            builds.update({f"vertical-slash index (library, slash_runs {w} warps)": (warps(w), (vi, si)) for w in (4, 8, 32)})
        for name, (build, inputs) in builds.items():
            if args.only not in name:
                continue
            fn = lambda: build(*inputs)  # noqa: E731
            h = host_ms(fn)
            if dev.type == "cuda":
                ev = base.bench(fn, budget_s=0.5, max_reps=10)
                g, top = gpu_ms(fn)
                log(f"N={n} {name}: events {ev:.3f} ms, host {h:.3f} ms, GPU kernels {g:.3f} ms; top {top}")
                # the same construction through kernels.graphed (inputs copied in, one graph replay)
                gfn = lambda: graphed.build_graphed(("profile", name, n), build, inputs)  # noqa: E731
                got, ref = gfn(), fn()
                got, ref = (got, ref) if isinstance(ref, tuple) else ((got,), (ref,))
                same = all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(got, ref) for f in vars(y)
                           if isinstance(getattr(y, f), torch.Tensor))
                gr = base.bench(gfn, budget_s=0.5, max_reps=10)
                log(f"N={n} {name}: CUDA graph replay {gr:.3f} ms (outputs equal: {same})")
            else:
                log(f"N={n} {name}: host {h:.3f} ms")
        # the library's graphed construction (kernels.graphed) on fresh indices of the same shapes
        worst = 0
        for t in range(3):
            vi2, si2 = base.realistic_vs(1, hq, n, dev, gen)
            got = graphed.build_graphed(("check", n), lambda a, b: sidx.from_vertical_slash(
                a, b, n, bm, block_n=tiles_n), (vi2, si2))
            want = sidx.from_vertical_slash(vi2, si2, n, bm, block_n=tiles_n)
            diff = sum(int((getattr(got, f) != getattr(want, f)).sum()) for f in vars(want)
                       if isinstance(getattr(want, f), torch.Tensor))
            worst = max(worst, diff)
        log(f"N={n} graphed vertical-slash index vs eager on 3 fresh index sets: {worst} entries differ")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
            f.write("# Index construction time\n\n" + (torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")
                    + f", torch {torch.__version__}\n\n" + "\n".join(f"- {s}" for s in lines) + "\n")


if __name__ == "__main__":
    main()
