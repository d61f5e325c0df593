"""The captured, compiled 32-layer decode step, one process per setting.

Step times of `benchmarks/contextual.py` part b depend on what ran before them in the same process
(H100: TEAL all projections 50% 4.255 ms alone, 4.336-4.347 ms after dense settings had re-laid
out the weights; results/contextual/step_isolated.md), so here every setting runs in a fresh
process (`contextual.py --full --only "=NAME"`), with TORCHINDUCTOR_ENABLE_PDL=1 (the fastest dense
step, kernels/pdl.py) unless --no-pdl. --rounds repeats the whole list (even rounds in reverse
order). Reported: each setting's step per round, and its speedup against the fastest dense
setting (a name starting with "dense") of the same round.

    python benchmarks/step_isolated.py --out DIR [--settings "NAME;NAME;..."] [--rounds 2]
    python benchmarks/step_isolated.py --replot DIR/step_isolated.json [more.json ...]   # the PNG only (no GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = ";".join(["dense (sparseinfer attention)", "dense (sparseinfer attention), q/k/v unfused",
                    "teal all projections 50%", "teal mlp 50%", "dejavu mlp 50%", "dejavu mlp 50% look-ahead",
                    "dejavu mlp 50% look-ahead, q/k/v unfused"])


def run_one(args, name: str, out: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_ENABLE_PDL="0" if args.no_pdl else "1")
    env.pop("SPARSEINFER_PDL", None)  # ours follow torch.compile's switch
    cmd = [sys.executable, os.path.join(HERE, "contextual.py"), "--skip", "a,p,t,q", "--compile", "--compiled-only",
           "--layers", str(args.layers), "--full", "--only", f"={name};", "--iters", str(args.iters), "--out", out]
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "contextual.json")) as f:
        res = json.load(f)
    row = next(r for r in res["decode_step"]["rows"] if "ms" in r)
    print(f"  {name}: {row['ms']} ms ({time.time() - t0:.0f} s)", flush=True)
    return dict(res=res, ms=row["ms"])


def markdown(res: dict) -> str:
    md = ["# Captured compiled decode step, one process per setting (Llama-3.1-8B shapes)", "",
          f"{res['device']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
          f"{res['date']}; {res['layers']} layers measured, 4K context, batch 1, bf16 random weights; "
          f"TORCHINDUCTOR_ENABLE_PDL={'1' if res['pdl'] else '0'}; {res['rounds']} round(s), each setting in a fresh "
          "process; speedups against the fastest dense setting of the same round. "
          "`python benchmarks/step_isolated.py`.", "",
          "| setting | ms (per round) | vs the fastest dense (per round) |", "|---|---|---|"]
    md += [f"| {r['setting']} | {' / '.join(str(v) for v in r['ms'])} | "
           f"{' / '.join(f'{v}x' for v in r['speedup_vs_fastest_dense'])} |" for r in res["rows"]]
    return "\n".join(md) + "\n"


def plot(results: list[dict], path: str) -> None:
    """Bars: each setting's step (ms) per result file (machine / run), the speedup over the fastest dense step
    written on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in results[0]["rows"]]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(names) + 1.5))
    n = len(results)
    h = 0.8 / n
    for j, res in enumerate(results):
        by = {r["setting"]: r for r in res["rows"]}
        for i, name in enumerate(names):
            r = by.get(name)
            if r is None:
                continue
            ms, sp = r["ms"][0], r["speedup_vs_fastest_dense"][0]
            y = i + (j - (n - 1) / 2) * h
            ax.barh(y, ms, height=h * 0.9, color="tab:gray" if name.startswith("dense") else "tab:blue",
                    alpha=1.0 - 0.35 * j)
            ax.text(ms, y, f" {ms:.2f} ms, {sp:.3f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("captured compiled decode step, ms (lower is better)")
    head = results[0]
    ax.set_title(f"{head['layers']}-layer Llama-3.1-8B step, 4K context, batch 1, {head['device']}\n"
                 f"one process per setting, {n} run(s); speedup vs the fastest dense step of the same run", fontsize=9)
    ax.set_xlim(0, max(r["ms"][0] for res in results for r in res["rows"]) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--replot", nargs="+", help="step_isolated.json files: write step_isolated.png next to the first")
    p.add_argument("--settings", default=DEFAULT, help="contextual.py part b names, ';'-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--no-pdl", action="store_true")
    args = p.parse_args()
    if args.replot:
        results = []
        for f in args.replot:
            with open(f) as fh:
                results.append(json.load(fh))
        out = os.path.join(os.path.dirname(args.replot[0]) or ".", "step_isolated.png")
        plot(results, out)
        print(f"wrote {out}")
        return 0
    if not args.out:
        p.error("--out is required (unless --replot)")
    names = [n.strip() for n in args.settings.split(";") if n.strip()]
    if not any(n.startswith("dense") for n in names):
        p.error("--settings needs a dense setting (a name starting with 'dense') to compare with")
    rounds, head = [], None
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        print(f"round {r + 1}: {len(order)} settings", flush=True)
        got = {}
        for i, n in enumerate(order):
            one = run_one(args, n, os.path.join(args.out, f"round{r + 1}", f"{i:02d}"))
            head = head or one["res"]
            got[n] = one["ms"]
        rounds.append(got)
    rows = []
    for n in names:
        ms = [g[n] for g in rounds]
        sp = [round(min(v for k, v in g.items() if k.startswith("dense")) / g[n], 3) for g in rounds]
        rows.append({"setting": n, "ms": ms, "speedup_vs_fastest_dense": sp})
    res = {k: head[k] for k in ("device", "torch", "triton", "transformers", "date")}
    res.update(layers=args.layers, pdl=not args.no_pdl, rounds=args.rounds, rows=rows)
    import contextual as cb  # (save) imported here: the other paths need no torch in this process

    cb.save(args.out, "step_isolated", res, markdown)
    plot([res], os.path.join(args.out, "step_isolated.png"))
    print(markdown(res), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
