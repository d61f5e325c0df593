"""TEAL one-row GEMV: the plain loop (x -> mask -> weight rows, one step at a time) against the
register double-buffered loop (config's 6th entry = 1: weight rows one step ahead, x two steps
ahead), on the Llama-3.1-8B decode projections at 50% sparsity, batch 1, on one GPU.

For each launch (up_proj alone, fused gate+up, down_proj, fused q/k/v, o_proj): the library
default, a sweep of plain configs and a sweep of prefetch configs, each captured in a CUDA graph
and checked against the float64 reference; then the whole TEAL MLP with the best configs of each
kind against cuBLAS. Optional --step: the captured compiled 8B decode step (benchmarks/contextual.py
part B, 4K context) with the library defaults, then with the best prefetch configs as defaults.

    python benchmarks/teal_prefetch.py --out benchmarks/results/contextual [--step]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from sparseinfer.kernels import gemv  # noqa: E402
import contextual as ctx  # noqa: E402  (timed, copy_bandwidth, part_b, LLAMA_31_8B)


# the library's plain-loop defaults before the prefetch loop (single projections, gate+up)
PLAIN = {"down": (64, 128, 1024, 4, 1), "gate+up": (32, 128, 1024, 4, 1)}


# alternative sweeps (--sweep NAME): result file stem, help, configs (BLOCK_K, BLOCK_N, ROWS, warps, stages, prefetch)
SWEEPS = {
    # few rows per step, long row segments (>= 256 B) per program
    "wide": ("teal_wide", "wide tiles (BLOCK_K 8-32, BLOCK_N 128-512)",
             lambda: [(bk, bn, rows, wa, 1, 1) for bk in (8, 16, 32) for bn in (128, 256, 512)
                      for rows in (256, 512, 1024, 2048) for wa in (4, 8)]),
    # rows per program not only powers of 2: programs per launch against full waves of the SMs
    "waves": ("teal_waves", "rows per program 192-2048",
              lambda: [(bk, 64, rows, wa, 1, 1) for bk, wa in ((32, 4), (64, 8))
                       for rows in (192, 256, 320, 384, 448, 512, 576, 640, 768, 896, 1024, 1152, 1280, 1536, 1792,
                                    2048)]),
    # the plain loop (no register look-ahead) with Triton's cp.async pipeline 4-6 stages deep: more weight bytes in
    # flight per program, from shared memory instead of registers
    "deep": ("teal_deep_stages", "the plain loop pipelined 4-6 stages deep (cp.async)",
             lambda: [(bk, bn, rows, wa, st, 0) for bk, bn in ((32, 64), (64, 64), (32, 128))
                      for st in (4, 6) for wa in (4, 8) for rows in (1024, 2048)]),
    # 128-256 weight rows per loop step (more bytes in flight per program)
    "tall": ("teal_tall", "128-256 weight rows per loop step",
             lambda: [(bk, bn, rows, wa, 1, pf) for bk in (128, 256) for bn in (32, 64)
                      for wa in (4, 8) for rows in (1024, 2048) for pf in (0, 1)]),
}


def sweep(args, res, x, w, wt, hid, tx, th, bw) -> None:
    """Each launch: library default, best plain, best prefetch; then the MLP with each kind's best."""
    def ref_of(name):
        xi, t = (hid, th) if name == "down" else (x, tx)
        xs = torch.where(xi.double().abs() > t.double(), xi.double(), 0)
        if name == "gate+up":
            return F.silu(xs @ w["gate"].double().T) * (xs @ w["up"].double().T)
        return xs @ w[name].double().T

    def call_of(name, cfg):
        if name == "gate+up":  # None: the MLP's gate+up default (what teal_mlp runs)
            return lambda: gemv._teal(x, wt["gate"], wt["up"], tx, cfg or gemv.TEAL_MLP_CONFIG["cuda"], True)
        xi, t = (hid, th) if name == "down" else (x, tx)
        return lambda: gemv.teal_gemv_launch(xi, wt[name], t, cfg)

    plain = [(bk, bn, rows, 4, 1, 0) for bk in (32, 64) for bn in (64, 128) for rows in (512, 1024, 2048)]
    pref = [(bk, bn, rows, wa, 1, 1) for bk in (16, 32, 64) for bn in (64, 128) for rows in (512, 1024, 2048)
            for wa in (4, 8)]
    kinds = (("plain", plain), ("prefetch", pref))
    names = ("up", "gate+up", "down", "qkv", "o")
    if args.sweep:  # one alternative sweep against the library defaults, on the four launches of a layer
        kinds = (("default", [None]), (args.sweep, SWEEPS[args.sweep][2]()))
        names = ("gate+up", "down", "qkv", "o")
    best = {}
    for name in names:
        nbytes = (2 if name == "gate+up" else 1) * (w["up" if name == "gate+up" else name].numel()) * 2
        bound = nbytes / 2 / bw * 1e3
        ref = ref_of(name)
        err = lambda y: float((y.double() - ref).norm() / ref.norm())  # noqa: E731
        t_lib = ctx.timed(call_of(name, None), args.iters, True)
        res["rows"].append({"launch": name, "method": "library default", "ms": round(t_lib, 4),
                            "bound_ms": round(bound, 4), "rel_err": err(call_of(name, None)())})
        for kind, cfgs in kinds:
            times = []
            for c in cfgs:
                try:
                    ms = ctx.timed(call_of(name, c), args.iters, True)
                except Exception as e:  # noqa: BLE001
                    ctx.log(f"  {name} {c}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                times.append((ms, c))
                res["sweep"].append({"launch": name, "config": c and list(c), "ms": round(ms, 4)})
            ms, c = min(times, key=lambda t: t[0])
            best[(name, kind)] = c
            res["rows"].append({"launch": name, "method": f"best {kind} {c and list(c)}", "ms": round(ms, 4),
                                "bound_ms": round(bound, 4), "rel_err": err(call_of(name, c)())})
        for r in res["rows"][-3:]:
            ctx.log(f"  {name:<8} {r['method']:<34} {r['ms']:.4f} ms  bound {r['bound_ms']:.4f}  "
                    f"rel err {r['rel_err']:.1e}")
    # the whole MLP
    t_dense = ctx.timed(lambda: F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"]),
                        args.iters, True)
    mref = ref_of("gate+up")
    mref = torch.where(mref.abs() > th.double(), mref, 0) @ w["down"].double().T
    mlp = [("dense cuBLAS", None)] + [(f"teal {k}", (best[("gate+up", k)], best[("down", k)])) for k, _ in kinds]
    mlp.insert(1, ("teal library default", "default"))
    for label, cm in mlp:
        if cm is None:
            ms, e = t_dense, 0.0
        else:
            cfg = None if cm == "default" or cm == (None, None) else cm
            fn = lambda: gemv.teal_mlp_launch(x, wt["gate"], wt["up"], wt["down"], tx, th, cfg)  # noqa: E731
            ms = ctx.timed(fn, args.iters, True)
            e = float((fn().double() - mref).norm() / mref.norm())
        res["rows"].append({"launch": "mlp", "method": label + ("" if cm in (None, "default") else f" {[c and list(c) for c in cm]}"),
                            "ms": round(ms, 4), "speedup_vs_dense": round(t_dense / ms, 3), "rel_err": e})
        ctx.log(f"  mlp {label:<24} {ms:.4f} ms  x{t_dense / ms:.2f}  rel err {e:.1e}")
    res["best"] = {f"{n}/{k}": c and list(c) for (n, k), c in best.items()}


def markdown(res: dict) -> str:
    out = ["# TEAL one-row GEMV: plain loop vs weight rows one step ahead (Llama-3.1-8B shapes, 50%, batch 1)", "",
           f"{res['device']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
           f"{res['date']}; bf16 random weights; copy bandwidth {res.get('copy_bandwidth_GBs')} GB/s; each time the "
           "median of CUDA-graph replays; config = (BLOCK_K, BLOCK_N, ROWS, warps, stages, prefetch).", ""]
    if res["rows"]:
        out += ["| launch | method | ms | bound ms | speedup vs dense | rel. err vs float64 |", "|---|---|---|---|---|---|"]
        out += [f"| {r['launch']} | {r['method']} | {r['ms']:.4f} | {r.get('bound_ms', '')} | "
                f"{r.get('speedup_vs_dense', '')} | {r['rel_err']:.1e} |" for r in res["rows"]]
    if res.get("step"):
        out += ["", "## Captured compiled decode step (4K context; 2 / 4 layers extrapolated to 32)", "",
                "| configs | setting | est. 32 layers ms | vs the fastest dense step |", "|---|---|---|---|"]
        ext = [(lab, e) for lab, st in res["step"].items() for e in st["extrapolated"]]
        fastest = next((e["est_32_layers_ms"] for lab, e in ext
                        if lab == "plain" and e["setting"] == "dense (sparseinfer attention) (compiled)"), None)
        for lab, e in ext:
            ms = e["est_32_layers_ms"]
            ratio = f"{fastest / ms:.3f}x" if fastest else ""
            out.append(f"| {lab} | {e['setting']} | {ms:.3f} | {ratio} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ctx.gpu_args(p, "also the captured compiled decode step, old vs new defaults")
    p.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                   help="instead of plain vs prefetch, one sweep against the library defaults: "
                   + "; ".join(f"{k}: {v[1]}" for k, v in SWEEPS.items()))
    p.add_argument("--configs", default=None, help="skip the sweep: JSON {'gate+up': [...], 'down': [...]} as the "
                   "prefetch defaults of --step")
    args = p.parse_args()
    dev, dt, sh = torch.device("cuda"), torch.bfloat16, ctx.LLAMA_31_8B
    res, bw = ctx.run_header(dev)
    res.update(rows=[], sweep=[])
    x, w, wt, hid, tx, th = ctx.teal_projections(dev, dt, sh)

    if args.configs:  # no sweep: the given prefetch configs
        best = {(k, "prefetch"): tuple(v) for k, v in json.loads(args.configs).items()}
    else:
        sweep(args, res, x, w, wt, hid, tx, th, bw)
        best = {tuple(k.split("/")): v and tuple(v) for k, v in res["best"].items()}
    os.makedirs(args.out, exist_ok=True)
    stem = SWEEPS[args.sweep][0] if args.sweep else "teal_prefetch"
    path = os.path.join(args.out, stem + ".json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    if args.step:  # the decode step, library defaults vs the best prefetch configs as defaults
        steps = {}
        saved = (gemv.TEAL_CONFIG["cuda"], gemv.TEAL_MLP_CONFIG["cuda"])
        default = {"down": saved[0], "gate+up": saved[1]}  # a sweep's best may be the default (None)
        for label, only in (("plain", "sparseinfer attention,teal all"), ("prefetch", "teal all")):
            kind = "prefetch" if args.configs else args.sweep or "prefetch"
            cfg = PLAIN if label == "plain" else {k: tuple(best[(k, kind)] or default[k]) for k in ("down", "gate+up")}
            gemv.TEAL_CONFIG["cuda"], gemv.TEAL_MLP_CONFIG["cuda"] = cfg["down"], cfg["gate+up"]
            ns = argparse.Namespace(context=4096, layers=args.layers, iters=args.iters, compile=True, profile=args.profile,
                                    only=only, no_reorder=False)
            out = {}
            t0 = time.time()
            ctx.part_b(ns, dev, dt, sh, out)
            steps[label] = out["decode_step"]
            ctx.log(f"step ({label}) done in {time.time() - t0:.0f} s")
        gemv.TEAL_CONFIG["cuda"], gemv.TEAL_MLP_CONFIG["cuda"] = saved
        ext = {(lab, e["setting"]): e["est_32_layers_ms"] for lab, st in steps.items() for e in st["extrapolated"]}
        fastest = ext.get(("plain", "dense (sparseinfer attention) (compiled)"))
        for (lab, name), ms in sorted(ext.items()):
            ctx.log(f"  step {lab:<17} {name:<42} est. 32 layers {ms:.3f} ms"
                    + (f"  x{fastest / ms:.3f} vs the fastest dense step" if fastest else ""))
        res["step"] = steps
    ctx.save(args.out, stem, res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
