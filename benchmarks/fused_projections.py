"""Decode GEMVs of stacked projections vs separate ones (cuBLAS, batch 1, CUDA graphs).

A decode step at batch 1 multiplies one hidden row by each projection. Timed here, per decoder layer
of Llama-3.1-8B shapes (32 layers' weights, so that nothing stays in L2; bf16; one CUDA graph per
variant, replayed): q, k, v as three GEMVs vs one over the stacked [Oq + Ok + Ov, H] weight
(`sparseinfer.qkv`, what `patch(fuse_qkv=...)` does), and gate, up as two vs one over [2I, H]. Each
variant is checked against its separate form first (max abs diff in bf16).

    python benchmarks/fused_projections.py --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch
import torch.nn.functional as F

H, I, HQ, HKV, D, LAYERS = 4096, 14336, 32, 8, 128, 32


def timed(fn, reps: int = 20) -> float:
    """us per call of fn (which runs all layers once) / LAYERS: a CUDA graph of one call, replayed."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / reps / LAYERS * 1e3)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(1, H, device=dev, dtype=dt)
    groups = {"q/k/v": [HQ * D, HKV * D, HKV * D], "gate/up": [I, I]}
    rows = []
    for name, outs in groups.items():
        sep = [[torch.randn(o, H, device=dev, dtype=dt) * 0.02 for o in outs] for _ in range(LAYERS)]
        stacked = [torch.cat(ws) for ws in sep]
        diff = max(float((torch.cat([F.linear(x, w) for w in ws], -1) - F.linear(x, st)).abs().max())
                   for ws, st in zip(sep, stacked))
        mb = sum(outs) * H * 2 / 1e6
        t_sep = timed(lambda: [F.linear(x, w) for ws in sep for w in ws])
        t_one = timed(lambda: [F.linear(x, st) for st in stacked])
        rows += [{"projections": name, "variant": f"{len(outs)} GEMVs", "us_per_layer": round(t_sep, 2),
                  "MB": round(mb, 1), "GB_per_s": round(mb / t_sep * 1e3, 1)},
                 {"projections": name, "variant": "1 GEMV, stacked weight", "us_per_layer": round(t_one, 2),
                  "MB": round(mb, 1), "GB_per_s": round(mb / t_one * 1e3, 1), "max_abs_diff_vs_separate": diff}]
        sep = stacked = None  # free before the next group
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "pdl_env": os.environ.get("TORCHINDUCTOR_ENABLE_PDL"), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fused_projections.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = ["# Stacked vs separate decode projections (cuBLAS GEMVs, batch 1)", "",
          f"{res['device']}; torch {res['torch']}, triton {res['triton']}; {res['date']}; Llama-3.1-8B shapes, bf16, "
          f"{LAYERS} layers' weights per graph (L2-cold), us per layer. `python benchmarks/fused_projections.py`.", "",
          "| projections | variant | us per layer | MB read | GB/s | max abs diff vs separate |", "|---|---|---|---|---|---|"]
    md += [f"| {r['projections']} | {r['variant']} | {r['us_per_layer']} | {r['MB']} | {r['GB_per_s']} | "
           f"{r.get('max_abs_diff_vs_separate', '')} |" for r in rows]
    with open(os.path.join(args.out, "fused_projections.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
