"""Where one pre-filling call's time goes on the GPU timeline: its kernels, and the idle gaps
between them (host work the GPU waits for).

    python benchmarks/call_timeline.py [--sizes 131072,524288] [--out DIR] [--tag call_timeline]

For vertical-slash and block-sparse on attention.py's realistic indices (one Llama-3-8B layer: B 1,
32 / 8 heads, D 128, bf16): the call timed with CUDA events as attention.py times it (the GPU
idles until the host's first launch), timed with the host ahead (~10 ms of full-power work queued
first, `attention.busy_ahead`, as a model's earlier layers keep the GPU busy while the host
launches; a sleep kernel there would let the clocks rise: results/clocks_sleep_s19.md), and one call under
torch.profiler: every GPU kernel with its start relative to the first kernel, its duration and
stream, and the idle time of the GPU between the call's first and last kernel; then the host's
time per call and per launcher part (`host_parts`), the GPU kept busy, and a cProfile of the host
path (`host_profile`: the functions with the most own time).
Writes JSON + markdown to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention import BS, D, HKV, HQ, run_meta, bench, random_qkv, realistic_blocks, realistic_vs  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402


def timeline(fn) -> dict:
    """One call of fn under torch.profiler -> kernels (name, start_us from the first kernel,
    dur_us, stream) and the GPU's busy / idle time between the first kernel's start and the last
    kernel's end (kernels of any stream; overlapping kernels counted once)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            ks.append({"name": e.name[:70], "start": e.time_range.start, "dur": e.time_range.elapsed_us(),
                       "stream": getattr(e, "device_resource_id", None)})
    ks.sort(key=lambda k: k["start"])
    if not ks:
        return {"kernels": [], "span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0}
    t0 = ks[0]["start"]
    end, busy, cur_s, cur_e = 0.0, 0.0, None, None
    for k in ks:  # union of the kernels' intervals
        s, e = k["start"] - t0, k["start"] - t0 + k["dur"]
        end = max(end, e)
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    for k in ks:
        k["start"] = k["start"] - t0
    return {"kernels": ks, "span_us": end, "busy_us": busy, "idle_us": end - busy}


HOST_PARTS = [("sparseinfer.kernels.attention", "vertical_slash_attention"),
              ("sparseinfer.kernels.attention", "block_sparse_attention"),
              ("sparseinfer.kernels.attention", "run_index"), ("sparseinfer.kernels.attention", "_descriptors"),
              ("sparseinfer.kernels.attention", "_tma_mode"), ("sparseinfer.kernels.graphed", "build_graphed"),
              ("sparseinfer.index", "from_block_sparse"), ("sparseinfer.index", "_block_index"),
              ("sparseinfer.index", "band_index"), ("sparseinfer.kernels.rows", "block_lists")]


def _busy_calls(fn, calls: int, start=None, stop=None) -> float:
    """One warm call of fn, then `calls` calls with the GPU kept busy (a sleep kernel queued first, so no
    launch waits); start / stop run right before / after them. Returns their host time (s)."""
    import time

    fn()
    torch.cuda.synchronize()
    if start is not None:
        start()
    torch.cuda._sleep(int(4e9))
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    total = time.perf_counter() - t
    if stop is not None:
        stop()
    torch.cuda.synchronize()
    return total


def host_parts(fn, calls: int = 20) -> dict:
    """Inclusive host time (ms per call) of the functions in HOST_PARTS and of triton's kernel
    launches (JITFunction.run), the GPU kept busy; the functions are wrapped for the measurement
    only (module attributes, so callers that look them up at call time see the wrappers)."""
    import importlib
    import time

    from triton.runtime.jit import JITFunction

    acc: dict[str, float] = {}
    saved = []

    def wrap(owner, attr, label):
        orig = getattr(owner, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
        saved.append((owner, attr, orig))
        setattr(owner, attr, timed)

    for mod, name in HOST_PARTS:
        m = importlib.import_module(mod)
        if hasattr(m, name):
            wrap(m, name, f"{mod.split('.')[-1]}.{name}")
    wrap(JITFunction, "run", "triton launch")
    try:
        total = _busy_calls(fn, calls, start=acc.clear)
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)
    out = {k: 1e3 * v / calls for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}
    out["whole call"] = 1e3 * total / calls
    return out


def host_profile(fn, calls: int = 20, top: int = 30) -> list[dict]:
    """cProfile of `calls` calls of fn, the GPU kept busy (a sleep kernel queued first, so no launch
    waits): the `top` functions by own time, ms per call (own and inclusive) and calls per call."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    _busy_calls(fn, calls, start=prof.enable, stop=prof.disable)
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{os.path.basename(file)}:{line}({func})", "calls": nc / calls,
                     "own_ms": 1e3 * tt / calls, "incl_ms": 1e3 * ct / calls})
    rows.sort(key=lambda r: -r["own_ms"])
    return rows[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="131072,524288")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default="call_timeline")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("call_timeline.py times GPU kernels: no CUDA device")
    meta = run_meta()
    res = []
    lines = [f"# One pre-filling call on the GPU timeline, {meta['device']}", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; one Llama-3-8B layer (B 1, 32 / 8 "
             "heads, D 128, bf16), realistic indices. 'events': CUDA events around the call (attention.py's "
             "timing); 'host ahead': ~10 ms of full-power work queued first (attention.busy_ahead); span / busy / idle: one profiled call, from its "
             "first kernel's start to its last kernel's end (`benchmarks/call_timeline.py`).", ""]
    scale = D ** -0.5
    for n in [int(s) for s in args.sizes.split(",") if s]:
        torch.cuda.empty_cache()
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = random_qkv(1, HQ, HKV, n, D, torch.device("cuda"), gen, torch.bfloat16)
        vert, sl = realistic_vs(1, HQ, n, q.device, gen)
        bi = realistic_blocks(1, HQ, n, q.device, gen)
        # through the module's attributes, so that host_parts' wrappers of the launchers see these calls
        cases = {"vertical-slash": lambda: katt.vertical_slash_attention(q, k, v, vert, sl, scale),
                 "block-sparse": lambda: katt.block_sparse_attention(q, k, v, bi, BS, scale)}
        for name, fn in cases.items():
            ev = [bench(fn, budget_s=0.8) for _ in range(2)]
            ah = [bench(fn, budget_s=0.8, ahead=True) for _ in range(2)]
            tl = timeline(fn)
            parts = host_parts(fn)
            hp = host_profile(fn)
            r = {"N": n, "case": name, "events_ms": ev, "ahead_ms": ah, "host_parts_ms": parts, "host_profile": hp,
                 **tl}
            print(f"N={n} {name}: host parts (ms per call, inclusive) "
                  + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
            res.append(r)
            print(f"N={n} {name}: events {ev}, host ahead {ah}, span {tl['span_us'] / 1e3:.3f} ms, busy "
                  f"{tl['busy_us'] / 1e3:.3f}, idle {tl['idle_us'] / 1e3:.3f}", flush=True)
            lines += [f"## {n // 1024}K {name}", "",
                      f"events {', '.join(f'{x:.2f}' for x in ev)} ms; host ahead {', '.join(f'{x:.2f}' for x in ah)} "
                      f"ms; profiled call: span {tl['span_us'] / 1e3:.3f} ms, GPU busy {tl['busy_us'] / 1e3:.3f}, "
                      f"idle {tl['idle_us'] / 1e3:.3f}", "",
                      "host parts (ms per call, inclusive; the GPU kept busy): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in r["host_parts_ms"].items()), "",
                      "| start us | dur us | stream | kernel |", "|---|---|---|---|"]
            small = [kk for kk in tl["kernels"] if kk["dur"] < 20]
            for kk in tl["kernels"]:
                if kk["dur"] >= 20 or len(tl["kernels"]) <= 40:
                    lines.append(f"| {kk['start']:.1f} | {kk['dur']:.1f} | {kk['stream']} | {kk['name']} |")
            if len(tl["kernels"]) > 40:
                lines.append(f"| | {sum(kk['dur'] for kk in small):.1f} | | {len(small)} kernels under 20 us "
                             f"(median {statistics.median([kk['dur'] for kk in small]) if small else 0:.1f} us) |")
            lines += ["", "host profile (cProfile, 20 calls, the GPU kept busy; top functions by own time, ms per call):",
                      "", "| function | calls | own ms | inclusive ms |", "|---|---|---|---|"]
            lines += [f"| {h['function']} | {h['calls']:.0f} | {h['own_ms']:.3f} | {h['incl_ms']:.3f} |" for h in hp]
            lines.append("")
        q = k = v = vert = sl = bi = cases = None  # freed before the next size (not del: the lambdas name them)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as fh:
        json.dump({"meta": meta, "results": res}, fh, indent=1)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
