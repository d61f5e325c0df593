"""KL vs kept density: adaptive (learned gates) against block_sparse, from `sparseinfer eval fidelity` JSONs.

    python benchmarks/gate_report.py --fidelity A/fidelity.json B/fidelity.json --out docs/gates-smollm2-135m

Writes <out>-kl.png (mean KL of next-token distributions vs dense, against the density kept,
one curve per method family and length) and <out>-fidelity.md (the table), and prints, for
every adaptive point, block_sparse's KL interpolated (log-linear) at the same density.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def family(method: str) -> str:
    name, *opts = method.split(":")
    mode = next((o.split("=")[0] for o in opts if o.split("=")[0] in ("threshold", "density")), "")
    return f"{name} ({mode})" if mode else name


def interp_log(points: list[tuple[float, float]], x: float) -> float | None:
    """points (density, kl) sorted by density -> kl at x, linear in log(kl); None outside."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and y0 > 0 and y1 > 0:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fidelity", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="path prefix for -kl.png and -fidelity.md")
    args = ap.parse_args(argv)
    rows, env = [], {}
    for f in args.fidelity:
        doc = json.loads(Path(f).read_text())
        rows += doc["results"]
        env = doc.get("env", env)
    curves = defaultdict(list)
    for r in rows:
        curves[(family(r["method"]), r["length"])].append((r["density"], r["kl"], r["method"], r["top1_agree"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (fam, L), pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{fam}, {L} tok")
    ax.set_yscale("log")
    ax.set_xlabel("kept density (share of causal q-k pairs)")
    ax.set_ylabel("mean KL vs dense, nats / token")
    ax.set_title("SmolLM2-135M, held-out essays: accuracy vs density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(f"{args.out}-kl.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    lines = ["| length | method | density | mean KL | top-1 agree | block_sparse KL at this density |", "|---|---|---|---|---|---|"]
    for (fam, L), pts in sorted(curves.items(), key=lambda x: (x[0][1], x[0][0])):
        base = sorted((p[0], p[1]) for p in curves.get(("block_sparse", L), []))
        for d, kl, m, top1 in sorted(pts):
            ref = interp_log(base, d) if not fam.startswith("block_sparse") else None
            lines.append(f"| {L} | `{m}` | {d:.3f} | {kl:.4f} | {top1:.3f} | {'-' if ref is None else f'{ref:.4f}'} |")
    md = Path(f"{args.out}-fidelity.md")
    md.write_text("\n".join(lines) + "\n\n" + f"env: {json.dumps(env)}\n")
    print("\n".join(lines))
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
