"""The accuracy report: every method against dense on the real model, at a matched density.

`sparseinfer eval report --out docs` runs NIAH (lengths x depths), perplexity and next-token
KL for dense, A-shape, vertical-slash, block-sparse and minference (the shipped per-head
config), then writes `accuracy.md` with its plots. Results are cached per (part, method,
length) in `<out>/accuracy/*.json`, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from . import report
from .runner import run_fidelity, run_niah, run_ppl

# Budgets giving about 10% of the causal pairs at 1K-8K on SmolLM2 (the report shows the
# density each one actually kept). A-shape: 64 sink tokens + a window of 4.5% of N.
METHODS = {
    "dense": "dense",
    "ashape": "ashape:sink=64:window=0.045",
    "vertical_slash": "vertical_slash:vertical=0.042:slash=0.042",
    "block_sparse": "block_sparse:topk=0.052",
    "minference": "minference",
}


def _cached(folder: Path, key: str, compute):
    path = folder / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    rows = [asdict(r) for r in compute()]
    path.write_text(json.dumps(rows, indent=1))
    return rows


def build(model_name: str, out: Path, lengths: list[int], depths: int, ppl_lengths: list[int],
          methods: dict[str, str] = METHODS) -> Path:
    from ..models import load_model

    console = Console(width=140)
    cache = out / "accuracy"
    cache.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(model_name)
    niah, ppl, fid = [], [], []
    for label, spec in methods.items():
        for L in lengths:
            rows = _cached(cache, f"niah-{label}-{L}", lambda: run_niah(model, tok, [spec], [L], depths))
            niah += [dict(r, method=label) for r in rows]
    for label, spec in methods.items():
        for L in ppl_lengths:
            rows = _cached(cache, f"ppl-{label}-{L}", lambda: run_ppl(model, tok, [spec], [L], windows=2))
            ppl += [dict(r, method=label) for r in rows]
            if label != "dense":
                rows = _cached(cache, f"kl-{label}-{L}", lambda: run_fidelity(model, tok, [spec], [L]))
                fid += [dict(r, method=label) for r in rows]
    console.print(report.niah_table(niah))
    console.print(report.ppl_table(ppl))
    console.print(report.fidelity_table(fid))
    png = report.niah_heatmap(niah, out / "accuracy-niah.png", f"NIAH, {model_name}, {depths} depths")
    return write_markdown(out / "accuracy.md", model_name, niah, ppl, fid, methods, png.name)


def _env_line() -> str:
    env = report.environment()
    return f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, python {env['python']}, {env['date']}"


def write_markdown(path: Path, model_name, niah, ppl, fid, methods, niah_png) -> Path:
    lengths = sorted({r["length"] for r in niah})
    labels = list(dict.fromkeys(r["method"] for r in niah))
    lines = [
        "# Accuracy of the sparse methods against dense",
        "",
        f"Model: {model_name} (float32). Regenerate: `sparseinfer eval report --out docs`.",
        f"Measured on: {_env_line()}.",
        "",
        "Methods (budgets chosen for about 10% of the causal pairs; `density` is what each kept):",
        "",
        *[f"- `{k}`: `{v}`" for k, v in methods.items()],
        "",
        "## Needle in a haystack",
        "",
        f"![NIAH heatmaps]({niah_png})",
        "",
        "| method | " + " | ".join(f"{L} tok" for L in lengths) + " | all | density | CPU s / prompt |",
        "|---|" + "---|" * (len(lengths) + 3),
    ]
    dense_acc = None
    for m in labels:
        rs = [r for r in niah if r["method"] == m]
        cells = []
        for L in lengths:
            sel = [r["correct"] for r in rs if r["length"] == L]
            cells.append(f"{100 * sum(sel) / len(sel):.0f}%")
        acc = 100 * sum(r["correct"] for r in rs) / len(rs)
        dense_acc = acc if m == "dense" else dense_acc
        dens = sum(r["density"] for r in rs) / len(rs)
        sec = sum(r["seconds"] for r in rs) / len(rs)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {acc:.0f}% | {100 * dens:.1f}% | {sec:.1f} |")
    lines += ["", "## Perplexity on held-out essays", "", "| method | tokens | perplexity | vs dense | density | CPU s / window |",
              "|---|---|---|---|---|---|"]
    dense_ppl = {r["length"]: r["ppl"] for r in ppl if r["method"] == "dense"}
    for r in ppl:
        rel = 100 * (r["ppl"] / dense_ppl[r["length"]] - 1) if r["length"] in dense_ppl else float("nan")
        lines.append(f"| {r['method']} | {r['length']} | {r['ppl']:.3f} | {rel:+.2f}% | {100 * r['density']:.1f}% | {r['seconds']:.1f} |")
    lines += ["", "## Next-token distributions vs dense", "",
              "Mean KL(dense || sparse) over all positions of one held-out window, top-1 agreement, relative error of the final hidden states.",
              "", "| method | tokens | mean KL (nats) | top-1 agree | hidden rel. err | density | CPU s |", "|---|---|---|---|---|---|---|"]
    for r in fid:
        lines.append(f"| {r['method']} | {r['length']} | {r['kl']:.4f} | {100 * r['top1_agree']:.1f}% | "
                     f"{r['hidden_rel_err']:.4f} | {100 * r['density']:.1f}% | {r['seconds']:.1f} |")
    path.write_text("\n".join(lines) + "\n")
    return path
