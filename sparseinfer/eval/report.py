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
            cells.append(f"{100 * sum(sel) / len(sel):.0f}%")
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
