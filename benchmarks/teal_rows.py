"""TEAL's gathered-rows loop (`gemv.teal_rows_launch`: kept input channels listed per program, U kept
weight rows' W output columns per step as long contiguous pieces, splits summed by fp32 atomics)
against the library's masked loop, on the Llama-3.1-8B decode projections at 50%, batch 1, one GPU.

Per launch (gate+up, down, q/k/v, o): the library default and a sweep of gathered-rows configs
(ROWS, U, W, warps, stages), each captured in a CUDA graph and checked against float64; down with
no row kept and every row kept (the launch's floor and its dense end); the TEAL MLP with the best
configs against cuBLAS. --step: the captured compiled 32-layer 8B step (4K context), each setting in
its own process (`step_isolated.run_one`, PDL on): dense, TEAL all projections 50% with the masked
loop, and with the gathered-rows loop at the sweep's best configs (env SPARSEINFER_TEAL_ROWS=1).

    python benchmarks/teal_rows.py --out benchmarks/results/contextual [--step]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from sparseinfer.kernels import gemv  # noqa: E402
import contextual as ctx  # noqa: E402


def configs(name: str) -> list[tuple]:
    """(ROWS, U, W, warps, stages) per launch: U kept rows per step, W output columns per program."""
    if name == "gate+up":
        return [(rows, u, wd, 4, st) for rows in (128, 256, 512) for u in (1, 2) for wd in (1024, 2048) for st in (4, 6)]
    if name == "down":
        return [(rows, u, wd, wa, 6) for rows in (64, 128, 256) for u in (1, 2) for wd in (2048, 4096) for wa in (4, 8)]
    return [(rows, u, wd, 4, st) for rows in (16, 32, 64) for u in (1, 2) for wd in (1024, 2048) for st in (4, 6)]


def markdown(res: dict) -> str:
    out = ["# TEAL gathered-rows loop vs the masked loop (Llama-3.1-8B shapes, 50%, batch 1)", "",
           f"{res['device']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
           f"{res['date']}; bf16 random weights; copy bandwidth {res.get('copy_bandwidth_GBs')} GB/s; each time the "
           "median of CUDA-graph replays; rows config = (ROWS, U, W, warps, stages). "
           "`python benchmarks/teal_rows.py`.", "",
           "| launch | method | ms | bound ms | speedup vs dense | rel. err vs float64 |", "|---|---|---|---|---|---|"]
    out += [f"| {r['launch']} | {r['method']} | {r['ms']:.4f} | {r.get('bound_ms', '')} | "
            f"{r.get('speedup_vs_dense', '')} | {r['rel_err']:.1e} |" for r in res["rows"]]
    if res.get("step"):
        out += ["", "## Captured compiled 32-layer decode step (4K context), one process per setting, PDL on", "",
                "| setting | ms | vs dense |", "|---|---|---|"]
        dense = res["step"].get("dense")
        out += [f"| {k} | {v} | {dense / v:.3f}x |" for k, v in res["step"].items()]
    return "\n".join(out) + "\n"


def mlp_by_sparsity(x, w, wt, hid, sparsities: list[float], iters: int) -> list[dict]:
    """The 8B MLP (batch 1) at each sparsity s (thresholds: the s-quantiles of |x| and of the dense |h|):
    cuBLAS, the gathered-rows loop (`teal_rows_mlp_launch`), the compacted masked loop (`compact=True`, what
    the patching asks for at >= gemv.COMPACT_MIN_SPARSITY) and the plain masked loop, each checked against
    float64; library configs throughout."""
    h, inter = x.shape[1], w["up"].shape[0]
    t_dense = ctx.timed(lambda: F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"]), iters,
                        True)
    masked_cfg = (gemv._sized(gemv.TEAL_MLP_CONFIG["cuda"], h, inter, x),
                  gemv._sized(gemv.TEAL_DOWN_CONFIG["cuda"], inter, h, x))
    rows = []
    for s in sparsities:
        tx = torch.quantile(x.float().abs().flatten(), s)
        th = torch.quantile(hid.float().abs().flatten(), s)
        xs = torch.where(x.double().abs() > tx.double(), x.double(), 0)
        hs = F.silu(xs @ w["gate"].double().T) * (xs @ w["up"].double().T)
        ref = torch.where(hs.abs() > th.double(), hs, 0) @ w["down"].double().T
        calls = {"gathered rows": lambda: gemv.teal_rows_mlp_launch(x, wt["gate"], wt["up"], wt["down"], tx, th),
                 "compacted masked loop": lambda: gemv.teal_mlp_launch(x, wt["gate"], wt["up"], wt["down"], tx, th,
                                                                       gemv.TEAL_COMPACT_MLP_CONFIG["cuda"], compact=True),
                 "masked loop": lambda: gemv.teal_mlp_launch(x, wt["gate"], wt["up"], wt["down"], tx, th, masked_cfg)}
        r = {"sparsity": s, "dense_ms": round(t_dense, 4)}
        for name, fn in calls.items():
            y = fn().double()
            err = float((y - ref).norm() / ref.norm().clamp_min(1e-30)) if torch.isfinite(y).all() else float("inf")
            ms = ctx.timed(fn, iters, True)
            r[name] = {"ms": round(ms, 4), "speedup_vs_dense": round(t_dense / ms, 3), "rel_err": err}
            ctx.log(f"  mlp {s:.0%} {name:<22} {ms:.4f} ms ({t_dense / ms:.3f}x cuBLAS)  rel err {err:.1e}")
        rows.append(r)
    return rows


def markdown_sparsity(res: dict) -> str:
    names = ("gathered rows", "compacted masked loop", "masked loop")
    out = ["# The TEAL MLP by sparsity: gathered rows vs the masked loops (Llama-3.1-8B shapes, batch 1)", "",
           f"{res['device']}; torch {res['torch']}, triton {res['triton']}; {res['date']}; bf16 random weights; "
           "median of CUDA-graph replays; library configs; speedup against cuBLAS (dense MLP) in the same run; "
           "`python benchmarks/teal_rows.py --sparsities ...`.", "",
           "| sparsity | cuBLAS ms | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    out += [f"| {r['sparsity']:.0%} | {r['dense_ms']} | " + " | ".join(
        f"{r[n]['ms']} ms = {r[n]['speedup_vs_dense']}x (err {r[n]['rel_err']:.1e})" for n in names) + " |"
        for r in res["mlp_by_sparsity"]]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ctx.gpu_args(p, "also the captured compiled 32-layer step, masked vs gathered-rows loop")
    p.add_argument("--race", action="store_true", help="first: each config's error 4 times, fence on and off")
    p.add_argument("--no-masked-step", action="store_true", help="--step without the masked loop's step")
    p.add_argument("--library-configs", action="store_true", help="--step: the gathered-rows step with the "
                   "library's configs (not the sweep's best)")
    p.add_argument("--alt-env", default=None, help="--step: one more gathered-rows step with this environment (JSON)")
    p.add_argument("--alt-configs", default=None, help="--step: one more gathered-rows step with these configs (JSON)")
    p.add_argument("--configs", default=None, help="skip the sweep: JSON {launch: config} of the gathered-rows loop")
    p.add_argument("--sparsities", default=None, help="only: the MLP at these sparsities (e.g. '0.5,0.6,0.75,0.9'), "
                   "gathered rows vs the compacted and the plain masked loop vs cuBLAS (library configs)")
    args = p.parse_args()
    dev, dt, sh = torch.device("cuda"), torch.bfloat16, ctx.LLAMA_31_8B
    h, inter = sh["hidden_size"], sh["intermediate_size"]
    hq, hkv = sh["num_attention_heads"], sh["num_key_value_heads"]
    d = h // hq
    res, bw = ctx.run_header(dev)
    res.update(rows=[], sweep=[])
    x, w, wt, hid, tx, th = ctx.teal_projections(dev, dt, sh)
    gemv.prepare_counters(dev)
    if args.sparsities:
        res["mlp_by_sparsity"] = mlp_by_sparsity(x, w, wt, hid, [float(v) for v in args.sparsities.split(",")],
                                                 args.iters)
        ctx.save(args.out, "teal_rows_sparsity", res, markdown_sparsity)
        return 0

    def ref_of(name, t=None):
        xi, t0 = (hid, th) if name == "down" else (x, tx)
        t = t0 if t is None else t
        xs = torch.where(xi.double().abs() > t.double(), xi.double(), 0)
        if name == "gate+up":
            return F.silu(xs @ w["gate"].double().T) * (xs @ w["up"].double().T)
        return xs @ w[name].double().T

    def call_of(name, cfg, rows: bool, t=None):
        xi, t0 = (hid, th) if name == "down" else (x, tx)
        t = t0 if t is None else t
        two = name == "gate+up"
        a, b = (wt["gate"], wt["up"]) if two else (wt[name], None)
        if rows:
            return lambda: gemv.teal_rows_launch(xi, a, b, t, cfg)
        if two:
            return lambda: gemv._teal(x, a, b, t, gemv.TEAL_MLP_CONFIG["cuda"], True)
        if name == "down":
            return lambda: gemv._teal(xi, a, None, t, gemv.TEAL_DOWN_CONFIG["cuda"], False)
        return lambda: gemv._teal(xi, a, None, t, None, False)  # the masked loop, whatever TEAL_ROWS says

    def err_of(fn, ref):
        y = fn().double()
        return float((y - ref).norm() / ref.norm().clamp_min(1e-30)) if torch.isfinite(y).all() else float("inf")

    def row(launch, method, fn, ref, bound=None):
        e = err_of(fn, ref)
        ms = ctx.timed(fn, args.iters, True)
        r = {"launch": launch, "method": method, "ms": round(ms, 4), "rel_err": e}
        if bound is not None:
            r["bound_ms"] = round(bound, 4)
        res["rows"].append(r)
        ctx.log(f"  {launch:<8} {method:<44} {ms:.4f} ms  rel err {e:.1e}")
        return ms, e

    if args.race:  # each config's error 4 times, with and without the fence after the split sums
        res["race"] = []
        for name in ("gate+up", "down", "o"):
            ref = ref_of(name)
            for c in ((128, 1, 1024, 4, 4), (128, 1, 2048, 8, 4), (64, 2, 4096, 8, 6)):
                for fence in (True, False):
                    gemv.FENCE = fence
                    errs = [err_of(call_of(name, c, True), ref) for _ in range(4)]
                    res["race"].append({"launch": name, "config": list(c), "fence": fence, "errs": errs})
                    ctx.log(f"  race {name} {c} fence={fence}: max rel err {max(errs):.1e}")
        gemv.FENCE = True
    best = json.loads(args.configs) if args.configs else {}
    for name in ("gate+up", "down", "qkv", "o"):
        nbytes = (2 if name == "gate+up" else 1) * w["up" if name == "gate+up" else name].numel() * 2
        bound = nbytes / 2 / bw * 1e3
        ref = ref_of(name)
        row(name, "masked loop (library default)", call_of(name, None, False), ref, bound)
        if name not in best:
            times = []
            for c in configs(name):
                try:
                    fn = call_of(name, c, True)
                    e = err_of(fn, ref)
                    if not e <= 1e-2:
                        raise AssertionError(f"rel err {e:.1e}")
                    ms = ctx.timed(fn, args.iters, True)
                except Exception as ex:  # noqa: BLE001
                    ctx.log(f"  {name} {c}: {type(ex).__name__}: {str(ex)[:160]}")
                    continue
                times.append((ms, c))
                res["sweep"].append({"launch": name, "config": list(c), "ms": round(ms, 4), "rel_err": e})
            best[name] = list(min(times)[1])
        c = tuple(best[name])
        row(name, f"gathered rows {list(c)}", call_of(name, c, True), ref, bound)
        y1, y2 = call_of(name, c, True)(), call_of(name, c, True)()
        res.setdefault("repeat_max_abs_diff", {})[name] = float((y1.float() - y2.float()).abs().max())
    res["best"] = best
    for label, t in (("no row kept", torch.tensor(1e30, device=dev)), ("every row kept", torch.tensor(-1.0, device=dev))):
        ref = ref_of("down", t)
        row("down", f"{label}: masked loop", call_of("down", None, False, t), ref)
        row("down", f"{label}: gathered rows", call_of("down", tuple(best["down"]), True, t), ref)
    # the whole MLP
    t_dense = ctx.timed(lambda: F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"]),
                        args.iters, True)
    mref = ref_of("gate+up")
    mref = torch.where(mref.abs() > th.double(), mref, 0) @ w["down"].double().T
    masked_cfg = (gemv._sized(gemv.TEAL_MLP_CONFIG["cuda"], h, inter, x), gemv._sized(gemv.TEAL_DOWN_CONFIG["cuda"], inter, h, x))
    mlp = {"masked loop (library default)": lambda: gemv.teal_mlp_launch(x, wt["gate"], wt["up"], wt["down"], tx, th,
                                                                         masked_cfg),
           "gathered rows, h finished in bf16 by the gate+up launch": lambda: gemv.teal_rows_launch(
               gemv.teal_rows_launch(x, wt["gate"], wt["up"], tx, tuple(best["gate+up"])), wt["down"], None, th,
               tuple(best["down"])),
           "gathered rows, h read by the down launch (teal_rows_mlp_launch)": lambda: gemv.teal_rows_mlp_launch(
               x, wt["gate"], wt["up"], wt["down"], tx, th, (tuple(best["gate+up"]), tuple(best["down"])))}
    res["rows"].append({"launch": "mlp", "method": "dense cuBLAS", "ms": round(t_dense, 4), "speedup_vs_dense": 1.0,
                        "rel_err": 0.0})
    for label, fn in mlp.items():
        ms, e = row("mlp", label, fn, mref)
        res["rows"][-1]["speedup_vs_dense"] = round(t_dense / ms, 3)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "teal_rows.json"), "w") as f:
        json.dump(res, f, indent=1)
    if args.step:
        import step_isolated

        sizes = {"gate+up": f"cuda glu {h}x{inter}", "down": f"cuda {inter}x{h}", "qkv": f"cuda {h}x{(hq + 2 * hkv) * d}",
                 "o": f"cuda {h}x{h}"}
        ns = argparse.Namespace(no_pdl=False, layers=32, iters=args.iters)
        step = {}
        runs = [("dense", "dense (sparseinfer attention)", {})]
        if not args.no_masked_step:
            runs.append(("teal all 50%, masked loop", "teal all projections 50%", {"SPARSEINFER_TEAL_ROWS": "0"}))
        runs.append(("teal all 50%, gathered rows", "teal all projections 50%", {"SPARSEINFER_TEAL_ROWS": "1"} if
                     args.library_configs else {"SPARSEINFER_TEAL_ROWS": "1", "SPARSEINFER_TEAL_ROWS_CONFIG":
                                                json.dumps({sizes[k]: v for k, v in best.items()})}))
        if args.alt_configs:
            alt = json.loads(args.alt_configs)
            res["alt_configs"] = alt
            runs.append(("teal all 50%, gathered rows, alternative configs", "teal all projections 50%",
                         {"SPARSEINFER_TEAL_ROWS": "1",
                          "SPARSEINFER_TEAL_ROWS_CONFIG": json.dumps({sizes[k]: v for k, v in alt.items()})}))
        if args.alt_env:
            res["alt_env"] = json.loads(args.alt_env)
            runs.append((f"teal all 50%, gathered rows, {args.alt_env}", "teal all projections 50%",
                         dict(res["alt_env"], SPARSEINFER_TEAL_ROWS="1")))
        for label, setting, env in runs:
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                step[label] = step_isolated.run_one(ns, setting, os.path.join(args.out, "_step"))["ms"]
            finally:
                os.environ.clear()
                os.environ.update(saved)
        res["step"] = step
    ctx.save(args.out, "teal_rows", res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
