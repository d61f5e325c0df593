"""The adaptive-methods report: accuracy against kept density for fixed-budget and adaptive methods.

`sparseinfer eval adaptive-report --out docs` runs, on held-out essay windows of each length,
dense, block_sparse at fixed budgets, minference (the shipped config), xattention (several
tau) and flexprefill (several gamma), and writes `adaptive.md` + `adaptive-kl-density.png`:
mean next-token KL vs dense, perplexity, mean kept density and its spread (across layers x
heads and across windows), estimation time per layer call, and the audited share of the true
attention mass the kept indices cover on the last 64 queries (`sparseinfer.record`).

One model forward per (method, length, window) cell; logits are computed from the final hidden
states in chunks (no [N, vocab] tensor is kept). Cells are cached in `<out>/adaptive/*.json`
like the accuracy report's, so an interrupted run resumes.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .accuracy import _env_line

# label -> (family, spec). Families draw one curve each in the KL-vs-density plot.
METHODS: dict[str, tuple[str, str]] = {
    "dense": ("dense", "dense"),
    "block_sparse 10%": ("block_sparse", "block_sparse:topk=0.1"),
    "block_sparse 20%": ("block_sparse", "block_sparse:topk=0.2"),
    "block_sparse 40%": ("block_sparse", "block_sparse:topk=0.4"),
    "minference": ("minference", "minference"),
    "xattention 0.6": ("xattention", "xattention:tau=0.6:stride=8:block_size=64"),
    "xattention 0.8": ("xattention", "xattention:tau=0.8:stride=8:block_size=64"),
    "xattention 0.9": ("xattention", "xattention:tau=0.9:stride=8:block_size=64"),
    "flexprefill 0.85": ("flexprefill", "flexprefill:gamma=0.85:tau=0.1:block_size=64"),
    "flexprefill 0.95": ("flexprefill", "flexprefill:gamma=0.95:tau=0.1:block_size=64"),
    # the learned gate (issue 6, another branch) joins with register_method(...) or an entry here
}


def register_method(label: str, family: str, spec: str) -> None:
    """Hook for more methods, e.g. the learned gate once it ships:
    register_method("adaptive 1e-3", "adaptive", "adaptive:threshold=0.001")."""
    METHODS[label] = (family, spec)


def _chunked_logprobs(model, hidden: torch.Tensor, chunk: int = 512):
    """hidden [N, H] final hidden states -> yields (start, log-probs [c, vocab]) chunk by chunk."""
    head = model.get_output_embeddings()
    for i in range(0, hidden.shape[0], chunk):
        yield i, F.log_softmax(head(hidden[i:i + chunk]).float(), -1)


@torch.inference_mode()
def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model(ids).last_hidden_state[0]


@torch.inference_mode()
def run_cell(model, ids: torch.Tensor, dense_hidden: torch.Tensor, spec: str, min_len: int = 512) -> dict:
    """One method on one window: KL vs dense, NLL, density stats, estimation time, audit."""
    from ..integration import patch, unpatch
    from ..monitor import record
    from .runner import parse_method

    name, opts = parse_method(spec)
    handle = patch(model, name, min_len=min_len, **opts)
    try:
        with record(model, audit=1.0) as rec:
            t = time.perf_counter()
            hidden = _hidden(model, ids)
            secs = time.perf_counter() - t
    finally:
        unpatch(model)
    kl = nll = 0.0
    top1 = 0
    tgt = ids[0, 1:]
    for (i, lp), (_, lr) in zip(_chunked_logprobs(model, hidden), _chunked_logprobs(model, dense_hidden)):
        kl += float(F.kl_div(lp, lr, log_target=True, reduction="none").sum())
        top1 += int((lp.argmax(-1) == lr.argmax(-1)).sum())
        rows = lp[: max(0, min(lp.shape[0], tgt.shape[0] - i))]
        nll += float(F.nll_loss(rows, tgt[i:i + rows.shape[0]], reduction="sum"))
    n = ids.shape[1]
    layers = rec.layers()
    heads = [d for r in layers for d in (r["density"] or [1.0] * model.config.num_attention_heads)]
    cov = [c for r in layers if r["covered"] for c in r["covered"]]
    est = [r["estimate_ms"] for r in layers if r["estimate_ms"] is not None]
    return {
        "kl": kl / n, "nll": nll / (n - 1), "top1_agree": top1 / n, "density": handle.stats.density(),
        "density_heads": heads, "covered": statistics.fmean(cov) if cov else 1.0,
        "covered_min": min(cov) if cov else 1.0, "estimate_ms": statistics.fmean(est) if est else 0.0,
        "seconds": secs,
    }


def build(model_name: str, out: Path, lengths: list[int], windows: int = 2, methods: dict | None = None,
          run: bool = True, min_len: int = 512) -> Path:
    """Measure the missing cells (unless run=False), then write adaptive.md + the plot."""
    from ..data import heldout_text
    from ..models import load_model

    methods = METHODS if methods is None else methods
    shown = dict(METHODS) | methods  # the page shows every cached cell of the known methods
    cache = out / "adaptive"
    cache.mkdir(parents=True, exist_ok=True)
    model = tok = None
    cells = []
    todo = [(L, w) for L in lengths for w in range(windows)]
    bar = tqdm(total=len(todo) * len(methods), desc="adaptive report")
    for L, w in todo:
        dense_hidden = ids = None
        for label, (family, spec) in methods.items():
            safe = label.replace(" ", "_")
            path = cache / f"{safe}-{L}-w{w}.json"
            bar.set_postfix_str(f"{label} {L} tok, window {w}")
            if path.exists():
                row = json.loads(path.read_text())
            elif run:
                if model is None:
                    model, tok = load_model(model_name)
                if ids is None:
                    all_ids = tok(heldout_text(), add_special_tokens=False).input_ids
                    if (w + 1) * L > len(all_ids):
                        raise ValueError(f"adaptive report: window {w} of {L} tokens needs {(w + 1) * L} held-out "
                                         f"tokens, the text has {len(all_ids)}")
                    ids = torch.tensor([all_ids[w * L:(w + 1) * L]])
                    dense_hidden = _hidden(model, ids)
                row = dict(run_cell(model, ids, dense_hidden, spec, min_len), method=label, family=family,
                           spec=spec, length=L, window=w)
                path.write_text(json.dumps(row, indent=1))
            else:
                bar.update()
                continue
            cells.append(row)
            bar.update()
    bar.close()
    for path in sorted(cache.glob("*.json")):  # cells of other lengths / methods measured before
        row = json.loads(path.read_text())
        if row.get("method") in shown and row.get("window", 0) < windows and not any(
                c["method"] == row["method"] and c["length"] == row["length"] and c["window"] == row["window"]
                for c in cells):
            cells.append(row)
    png = plot(cells, out / "adaptive-kl-density.png", model_name)
    missing = [f"{m} {L} w{w}" for L, w in todo for m in shown
               if not any(c["method"] == m and c["length"] == L and c["window"] == w for c in cells)]
    return write_markdown(out / "adaptive.md", model_name, cells, shown, png.name, windows, missing)


def aggregate(cells: list[dict], methods: dict) -> list[dict]:
    """One row per (method, length): means over windows; density spread over windows and heads."""
    rows = []
    for L in sorted({c["length"] for c in cells}):
        for label, (family, spec) in methods.items():
            cs = [c for c in cells if c["method"] == label and c["length"] == L]
            if not cs:
                continue
            heads = sorted(h for c in cs for h in c["density_heads"])
            q = lambda p: heads[min(len(heads) - 1, int(p * len(heads)))]  # noqa: E731
            dens = [c["density"] for c in cs]
            rows.append({
                "method": label, "family": family, "spec": spec, "length": L, "windows": len(cs),
                "kl": statistics.fmean(c["kl"] for c in cs),
                "ppl": float(torch.tensor(statistics.fmean(c["nll"] for c in cs)).exp()),
                "top1": statistics.fmean(c["top1_agree"] for c in cs),
                "density": statistics.fmean(dens), "density_sd_inputs": statistics.pstdev(dens) if len(dens) > 1 else 0.0,
                "density_p10": q(0.1), "density_p90": q(0.9),
                "covered": statistics.fmean(c["covered"] for c in cs),
                "estimate_ms": statistics.fmean(c["estimate_ms"] for c in cs),
                "seconds": statistics.fmean(c["seconds"] for c in cs),
            })
    return rows


def plot(cells: list[dict], path: Path, model_name: str) -> Path:
    """Mean KL vs mean kept density, one panel per length, one curve per method family."""
    from .report import _plt

    plt = _plt()
    rows = [r for r in aggregate(cells, METHODS | {c["method"]: (c["family"], c["spec"]) for c in cells})
            if r["family"] != "dense"]
    lengths = sorted({r["length"] for r in rows}) or [0]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), squeeze=False)
    markers = {"block_sparse": "s", "minference": "D", "xattention": "o", "flexprefill": "^", "adaptive": "*"}
    for ax, L in zip(axes[0], lengths):
        for fam in dict.fromkeys(r["family"] for r in rows):
            rs = sorted((r for r in rows if r["family"] == fam and r["length"] == L), key=lambda r: r["density"])
            if rs:
                ax.plot([100 * r["density"] for r in rs], [r["kl"] for r in rs], marker=markers.get(fam, "x"),
                        label=fam, linestyle="--" if fam in ("block_sparse", "minference") else "-")
        ax.set_yscale("log")
        ax.set_xlabel("mean kept density (% of causal pairs)")
        ax.set_ylabel("mean KL vs dense (nats)")
        ax.set_title(f"{L} tokens" if L else "no data", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model_name}: accuracy vs density (lower-left is better)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_markdown(path: Path, model_name: str, cells: list[dict], methods: dict, png: str, windows: int,
                   missing=()) -> Path:
    rows = aggregate(cells, methods)
    dense_ppl = {r["length"]: r["ppl"] for r in rows if r["family"] == "dense"}
    lines = [
        "# Adaptive sparse attention: accuracy against kept density",
        "",
        f"Model: {model_name} (float32). Regenerate: `sparseinfer eval adaptive-report --out docs` "
        "(cells cached in `adaptive/`; `--from-cache` rewrites this page only).",
        f"Measured on: {_env_line()}.",
        "",
        f"Each cell: one forward over a held-out essay window ({windows} disjoint window(s) per length, means "
        "reported); KL(dense || method) of next-token distributions averaged over all positions; perplexity of the "
        "window; kept density = share of causal (query, key) pairs computed (dense layers / fallbacks count 1); "
        "p10-p90 across layers x heads; sd across windows; estimation = mean time of one layer's index estimation "
        "(CPU, torch); covered = share of the true attention mass of the last 64 queries the kept indices hold "
        "(audited on every call, mean over layers x heads). Calls shorter than 512 tokens run dense (none here).",
        "",
        "Methods:",
        "",
        *[f"- `{label}`: `{spec}`" for label, (_, spec) in methods.items()],
        "",
        f"![KL vs density]({png})",
        "",
        "| method | tokens | mean KL | top-1 agree | perplexity | vs dense | density | p10-p90 heads | sd windows (pts) "
        "| covered | est. ms / layer | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = 100 * (r["ppl"] / dense_ppl[r["length"]] - 1) if r["length"] in dense_ppl else float("nan")
        lines.append(
            f"| {r['method']} | {r['length']} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | {r['ppl']:.3f} | {rel:+.2f}% | "
            f"{100 * r['density']:.1f}% | {100 * r['density_p10']:.0f}-{100 * r['density_p90']:.0f}% | "
            f"{100 * r['density_sd_inputs']:.1f} | {r['covered']:.3f} | {r['estimate_ms']:.1f} | {r['seconds']:.1f} |")
    if missing:
        lines += ["", "## Not measured yet", "", "Re-running the command resumes: " + ", ".join(missing) + "."]
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "adaptive.json").write_text(json.dumps({"model": model_name, "rows": rows}, indent=1))
    return path
