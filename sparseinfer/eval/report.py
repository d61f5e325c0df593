"""Tables (rich), JSON and plots (matplotlib, PNG) of evaluation results."""
from __future__ import annotations

import json
import platform
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table


def environment() -> dict:
    import torch
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
    }


def write_json(path: Path, kind: str, config: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": kind, "env": environment(), "config": config, "results": rows}, indent=1))


def niah_table(rows: list[dict]) -> Table:
    lengths = sorted({r["length"] for r in rows})
    t = Table(title="Needle in a haystack: retrieval accuracy")
    t.add_column("method")
    for L in lengths:
        t.add_column(f"{L} tok", justify="right")
    for c in ("all", "density kept", "s / prompt"):
        t.add_column(c, justify="right")
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    for m, rs in by.items():
        cells = []
        for L in lengths:
            sel = [r["correct"] for r in rs if r["length"] == L]
            cells.append(f"{100 * sum(sel) / len(sel):.0f}%" if sel else "—")
        acc = 100 * sum(r["correct"] for r in rs) / len(rs)
        dens = sum(r["density"] for r in rs) / len(rs)
        sec = sum(r["seconds"] for r in rs) / len(rs)
        t.add_row(m, *cells, f"{acc:.0f}%", f"{100 * dens:.1f}%", f"{sec:.1f}")
    return t


def fidelity_table(rows: list[dict]) -> Table:
    t = Table(title="Fidelity vs dense (same prompts)")
    for c in ("method", "tokens", "mean KL (nats)", "top-1 agree", "hidden rel. err", "density kept", "s"):
        t.add_column(c, justify="right" if c != "method" else "left")
    for r in rows:
        t.add_row(r["method"], str(r["length"]), f"{r['kl']:.4f}", f"{100 * r['top1_agree']:.1f}%",
                  f"{r['hidden_rel_err']:.4f}", f"{100 * r['density']:.1f}%", f"{r['seconds']:.1f}")
    return t


def print_table(table: Table) -> None:
    Console(width=140).print(table)


def niah_heatmap(rows: list[dict], path: Path, title: str = "") -> Path:
    """One panel per method: needle depth (rows) x context length (columns), green = found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    dps = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 1.1 * len(lengths) * len(methods), 3.4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = np.full((len(dps), len(lengths)), np.nan)
        for r in rows:
            if r["method"] == m:
                grid[dps.index(r["depth"]), lengths.index(r["length"])] = float(r["correct"])
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L / 1024:.3g}K" for L in lengths])
        ax.set_yticks(range(len(dps)), [f"{100 * d:.0f}%" for d in dps])
        acc = np.nanmean(grid) * 100
        ax.set_title(f"{m}\n{acc:.0f}% found", fontsize=9)
        ax.set_xlabel("context length (tokens)")
    axes[0][0].set_ylabel("needle depth")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PATTERN_COLORS = {"ashape": "#4c72b0", "vertical_slash": "#55a868", "block_sparse": "#c44e52"}


def config_table(cfg: dict) -> Table:
    """Per layer: how many heads got each pattern, mean recall and density."""
    t = Table(title=f"Per-head patterns for {cfg.get('model', '?')} (searched at {cfg['search']['length']} tokens)")
    for c in ("layer", "A-shape", "vertical-slash", "block-sparse", "mean recall", "min recall", "mean density"):
        t.add_column(c, justify="right")
    for li, heads in enumerate(cfg["layers"]):
        cnt = {p: sum(h["pattern"] == p for h in heads) for p in PATTERN_COLORS}
        rec = [h.get("recall", float("nan")) for h in heads]
        den = [h.get("density", float("nan")) for h in heads]
        t.add_row(str(li), *(str(cnt[p]) for p in PATTERN_COLORS), f"{sum(rec) / len(rec):.3f}", f"{min(rec):.3f}",
                  f"{100 * sum(den) / len(den):.1f}%")
    return t


def pattern_histogram(cfg: dict, path: Path) -> Path:
    """Stacked bars: per layer, heads per pattern; line: mean recall."""
    plt = _plt()
    layers = cfg["layers"]
    x = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers)), 3.4))
    bottom = [0] * len(layers)
    for p, color in PATTERN_COLORS.items():
        vals = [sum(h["pattern"] == p for h in heads) for heads in layers]
        ax.bar(x, vals, bottom=bottom, color=color, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("layer")
    ax.set_ylabel("heads")
    ax2 = ax.twinx()
    ax2.plot(list(x), [sum(h["recall"] for h in heads) / len(heads) for heads in layers], "k.-", label="mean recall")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("recall")
    ax.legend(loc="lower left", fontsize=7, ncol=3)
    ax.set_title(f"{cfg.get('model', '')}: searched patterns (target density {cfg['search']['target_density']:.0%})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def recall_heatmap(recall, path: Path, title: str) -> Path:
    """recall [layers, heads] -> heatmap PNG."""
    plt = _plt()
    import numpy as np

    r = np.asarray(recall, dtype=float)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * r.shape[1], 1.5 + 0.18 * r.shape[0]))
    im = ax.imshow(r, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\nmean recall {np.nanmean(r):.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ppl_table(rows: list[dict]) -> Table:
    t = Table(title="Perplexity on held-out essays")
    for c in ("method", "tokens", "perplexity", "density kept", "s / window"):
        t.add_column(c, justify="right" if c != "method" else "left")
    for r in rows:
        t.add_row(r["method"], str(r["length"]), f"{r['ppl']:.3f}", f"{100 * r['density']:.1f}%", f"{r['seconds']:.1f}")
    return t


def config_markdown(cfg: dict, path: Path) -> Path:
    """A config's report: how it was searched, the pattern histogram PNG, per-layer table."""
    png = pattern_histogram(cfg, path.with_suffix(".png"))
    srch = cfg["search"]
    lines = [
        f"# Searched per-head patterns: {cfg.get('model', '?')}",
        "",
        f"Searched on {srch.get('date', '?')} in {srch.get('seconds', '?')} s: {srch['prompts']} calibration prompt(s) "
        f"of {srch['length']} tokens (essays + needle + question), target mean density {srch['target_density']:.0%}. "
        f"Mean density kept on the calibration input: {100 * srch.get('mean_density', float('nan')):.1f}%, "
        f"mean attention recall {srch.get('mean_recall', float('nan')):.3f}.",
        "",
        f"![patterns per layer]({png.name})",
        "",
        "| layer | A-shape | vertical-slash | block-sparse | mean recall | min recall | mean density |",
        "|---|---|---|---|---|---|---|",
    ]
    for li, heads in enumerate(cfg["layers"]):
        cnt = [sum(h["pattern"] == p for h in heads) for p in PATTERN_COLORS]
        rec = [h["recall"] for h in heads]
        den = [h["density"] for h in heads]
        lines.append(f"| {li} | {cnt[0]} | {cnt[1]} | {cnt[2]} | {sum(rec) / len(rec):.3f} | {min(rec):.3f} | "
                     f"{100 * sum(den) / len(den):.1f}% |")
    path.write_text("\n".join(lines) + "\n")
    return path
