"""Attention recall and output error vs density on synthetic video-structured q/k (CPU, torch
reference): grid and Q-boundary patterns vs vertical-slash and A-shape. No model weights.

    python benchmarks/mm_recall.py --out docs/mminference          # ~2-4 min on 2 CPU cores

Input: sparseinfer.synthetic_video at N=8192 (frames of 256 tokens, a 64-token text segment
every 4 frames, text question at the end), 8 query heads / 4 KV heads, D=64, float32, 2 seeds.
Recall = dense softmax mass inside the mask on 6 windows of 32 query rows (4 in video, 2 in
text); err = ||o - o_dense|| / ||o_dense|| over all rows. Writes mm_recall.json / .md / .png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseinfer import ops  # noqa: E402
from sparseinfer.ops import reference as ref  # noqa: E402
from sparseinfer.ops.mm import mm_rows  # noqa: E402
from sparseinfer.patterns.ashape import AShape  # noqa: E402
from sparseinfer.patterns.mm import MMInferenceLayer, ModalityContext  # noqa: E402
from sparseinfer.patterns.vertical_slash import VerticalSlash  # noqa: E402
from sparseinfer.synthetic_video import video_qkv  # noqa: E402

LEVELS = (0.005, 0.01, 0.02, 0.05, 0.1)


def methods(lv: float) -> dict:
    text = {"pattern": "vertical_slash", "vertical": lv, "slash": lv}
    grid = {"pattern": "grid", "sink": 64, "window": 2 * lv}
    return {
        "ashape": ("pat", AShape(sink=64, window=2 * lv)),
        "vertical_slash": ("pat", VerticalSlash(vertical=lv, slash=lv)),
        "mm q-boundary vertical_slash": ("mm", {"boundary": "q", "intra": {"all": text}}),
        "mm none grid": ("mm", {"boundary": "none", "intra": {"all": grid}}),
        "mm q-boundary grid": ("mm", {"boundary": "q", "intra": {"all": text, "video": grid}}),
        "mm q-boundary grid (no horizontal)": ("mm", {"boundary": "q", "intra": {
            "all": text, "video": dict(grid, horizontal_lines=False)}}),
        "mm 2d-boundary grid": ("mm", {"boundary": "2d", "intra": {"all": text, "video": grid}}),
    }


def rows_fn(sel, n):
    kw = sel.kwargs
    if sel.op == "mm_attention":
        return mm_rows(n, kw["modality"], kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])
    if sel.op == "ashape_attention":
        return ref.ashape_rows(n, kw["sink"], kw["window"], "cpu")
    return ref.vertical_slash_rows(n, kw["vertical_idx"], kw["slash_idx"])


def recall(q, k, rows, windows, scale):
    got = tot = 0.0
    g = q.shape[1] // k.shape[1]
    for i0, i1 in windows:
        s = torch.matmul(q[:, :, i0:i1], k[:, :, :i1].repeat_interleave(g, 1).transpose(-1, -2)) * scale
        causal = torch.arange(i0, i1)[:, None] >= torch.arange(i1)[None, :]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        got += float((p * (rows(i0, i1) & causal)).sum())
        tot += float(p.sum())
    return got / tot


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--frame", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "mminference"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    n, hq, hkv, d = args.n, 8, 4, 64
    scale = d ** -0.5
    results = []
    t0 = time.time()
    for seed in range(args.seeds):
        q, k, v, mod, st, ph = video_qkv(1, hq, hkv, n, d, args.frame, seed=seed)
        video = (mod[0] == 2).nonzero().flatten()
        text = (mod[0] == 0).nonzero().flatten()
        windows = [(int(video[int(len(video) * f)]), int(video[int(len(video) * f)]) + 32) for f in (0.2, 0.45, 0.7, 0.95)]
        windows += [(int(text[len(text) // 2]), int(text[len(text) // 2]) + 32), (n - 32, n)]
        dense = ops.dense_attention(q, k, v, scale=scale, backend="reference")
        ctx = ModalityContext(mod, args.frame)
        for lv in LEVELS:
            for name, (kind, spec) in methods(lv).items():
                pat = MMInferenceLayer([spec] * hq, ctx) if kind == "mm" else spec
                (sel,) = pat.select(q, k, scale)
                out = getattr(ops, sel.op)(q, k, v, **sel.kwargs, scale=scale, backend="reference")
                err = float((out - dense).norm() / dense.norm())
                r = dict(seed=seed, level=lv, method=name, density=float(sel.density.float().mean()), err=err,
                         recall=recall(q, k, rows_fn(sel, n), windows, scale))
                results.append(r)
                print(f"[{time.time() - t0:.0f}s] seed {seed} level {lv} {name}: density {r['density']:.4f} "
                      f"recall {r['recall']:.3f} err {r['err']:.3f}", flush=True)
    meta = {"device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "n": n, "hq": hq, "hkv": hkv, "d": d, "frame": args.frame, "seeds": args.seeds, "levels": LEVELS}
    with open(os.path.join(args.out, "mm_recall.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    # mean over seeds
    agg = {}
    for r in results:
        agg.setdefault((r["method"], r["level"]), []).append(r)
    lines = ["# Recall and output error vs density: synthetic video q/k", "",
             f"{meta['date']}; {meta['device']}, torch {meta['torch']}; N={n}, {hq} q / {hkv} KV heads, D={d}, "
             f"frame {args.frame}, mean of {args.seeds} seeds (torch reference; no model weights).", "",
             "| method | level | density | recall | err |", "|---|---|---|---|---|"]
    for (m, lv), rs in agg.items():
        dd = sum(r["density"] for r in rs) / len(rs)
        rc = sum(r["recall"] for r in rs) / len(rs)
        er = sum(r["err"] for r in rs) / len(rs)
        lines.append(f"| {m} | {lv} | {100 * dd:.2f}% | {rc:.3f} | {er:.3f} |")
    with open(os.path.join(args.out, "mm_recall.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods(0.01):
        pts = sorted((sum(r["density"] for r in rs) / len(rs), sum(r["recall"] for r in rs) / len(rs),
                      sum(r["err"] for r in rs) / len(rs)) for (mm, _), rs in agg.items() if mm == m)
        axes[0].plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        axes[1].plot([100 * p[0] for p in pts], [p[2] for p in pts], "o-", label=m)
    axes[0].set(xlabel="density (%)", ylabel="attention recall", xscale="log", title="recall vs density")
    axes[1].set(xlabel="density (%)", ylabel="output rel. error", xscale="log", yscale="log", title="error vs density")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"synthetic video q/k, N={n}, frame {args.frame}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "mm_recall.png"), dpi=110)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
