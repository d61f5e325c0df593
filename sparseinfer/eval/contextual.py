"""Accuracy of contextual sparsity (TEAL, Deja Vu) on held-out essays: perplexity, next-token
top-1 agreement and KL vs dense, predictor recall per layer -> docs/contextual.md (+ JSON, PNG).

Protocol: windows of `length` tokens of `sparseinfer.data.heldout_text`; one forward per window
with the sparsity applied to every token (apply_to="all"). Since MLP and head sparsity act per
token, this equals teacher-forced decoding in which every token (its hidden states, hence its
K/V) was produced by a sparse decode step: a pessimistic bound on decoding after a dense pre-fill.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..contextual import attach, detach
from ..contextual.dejavu import SELECT_BLOCK


@dataclass
class Setting:
    name: str  # "dense", "teal", "dejavu", "dejavu-heads", "teal-all"
    mlp: str | None = None
    mlp_sparsity: float = 0.0
    heads: str | None = None
    head_sparsity: float = 0.0
    attn_sparsity: float | None = None
    predictors: str | None = None  # a key of run(extra_predictors=...) instead of the main predictors
    allocation: str | None = None  # a key of run(allocations=...): per-layer sparsities, mean mlp_sparsity

    @property
    def label(self) -> str:
        if self.name == "dense":
            return "dense"
        parts = []
        if self.mlp:
            tag = f" ({self.predictors})" if self.predictors else " (allocated)" if self.allocation else ""
            parts.append(f"{self.mlp}{tag} MLP {self.mlp_sparsity:.0%}")
        if self.attn_sparsity:
            parts.append(f"TEAL attn {self.attn_sparsity:.0%}")
        if self.heads:
            parts.append(f"{self.heads} heads {self.head_sparsity:.0%}")
        return " + ".join(parts)


def default_settings(mlp_sparsities=(0.25, 0.4, 0.5, 0.7), head_sparsities=(0.25, 0.5)) -> list[Setting]:
    out = [Setting("dense")]
    for m in ("teal", "dejavu"):
        out += [Setting(m, m, s) for s in mlp_sparsities]
    out += [Setting("dejavu-heads", heads="dejavu", head_sparsity=s) for s in head_sparsities]
    out += [Setting("dejavu+heads", "dejavu", 0.5, "dejavu", 0.25)]
    out += [Setting("teal-all", "teal", 0.5, attn_sparsity=0.5)]
    return out


@torch.no_grad()
def run(model, tok, settings: list[Setting], length: int = 1024, windows: int = 2, progress: bool = True,
        predictors=None, thresholds=None, extra_predictors: dict | None = None,
        allocations: dict | None = None) -> list[dict]:
    """One row per setting: ppl, top-1 agreement and mean KL(dense || sparse) over all predicted
    tokens of `windows` disjoint windows of `length` tokens; TEAL rows add the measured kept share.
    Settings with `.predictors` set use extra_predictors[that key], with `.allocation` set the
    per-layer MLP sparsities allocations[that key] (a `contextual.allocation.Allocation`)."""
    from ..data import heldout_text

    ids = tok(heldout_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < length * windows:
        raise ValueError(f"eval contextual: held-out text has {ids.numel()} tokens, need {length * windows}")
    dev = next(model.parameters()).device
    chunks = [ids[i * length:(i + 1) * length][None].to(dev) for i in range(windows)]
    dense_logp = [F.log_softmax(model(input_ids=c, use_cache=False).logits[0, :-1].float(), -1) for c in chunks]
    rows = []
    for s in tqdm(settings, desc="contextual settings", disable=not progress):
        t0 = time.perf_counter()
        handle = None
        if s.name != "dense":
            handle = attach(model, mlp=s.mlp, heads=s.heads,
                            mlp_sparsity=(allocations or {})[s.allocation] if s.allocation else s.mlp_sparsity,
                            head_sparsity=s.head_sparsity, attn_sparsity=s.attn_sparsity, apply_to="all",
                            predictors=(extra_predictors or {})[s.predictors] if s.predictors else predictors,
                            thresholds=thresholds, record=True, backend="reference")
        nll = kl = agree = n = 0.0
        try:
            for c, dl in zip(chunks, dense_logp):
                lp = F.log_softmax(model(input_ids=c, use_cache=False).logits[0, :-1].float(), -1)
                tgt = c[0, 1:]
                nll += float(-lp.gather(-1, tgt[:, None]).sum())
                kl += float((dl.exp() * (dl - lp)).sum())
                agree += float((lp.argmax(-1) == dl.argmax(-1)).sum())
                n += tgt.numel()
        finally:
            if handle is not None:
                detach(model)
        row = dict(asdict(s), label=s.label, ppl=round(float(torch.tensor(nll / n).exp()), 4),
                   kl=round(kl / n, 5), top1=round(agree / n, 4), tokens=int(n),
                   seconds=round(time.perf_counter() - t0, 1))
        if handle is not None and handle.stats.kept:
            row["kept_share"] = {k: round(v, 4) for k, v in handle.stats.kept_share().items()}
        rows.append(row)
    return rows


def _tag(r: dict) -> str | None:
    """A row's curve tag: its extra predictor set, "allocated" (per-layer sparsities), or None."""
    return r.get("predictors") or ("allocated" if r.get("allocation") else None)


def _curves(rows: list[dict]) -> list[tuple]:
    """(method, tag) of the MLP-sparsity curves: teal, dejavu, then per extra predictor set and allocation."""
    return [("teal", None), ("dejavu", None)] + sorted({(r["name"], _tag(r)) for r in rows
                                                        if r["name"] in ("teal", "dejavu") and _tag(r)})


def _plot(rows: list[dict], path: Path, title: str) -> Path:
    from .report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    dense = next(r for r in rows if r["name"] == "dense")
    curves = _curves(rows)
    colors = ("#4c72b0", "#c44e52", "#dd8452", "#8172b3", "#937860", "#55a868", "#da8bc3")
    for (name, tag), color in zip(curves, colors):
        pts = sorted((r["mlp_sparsity"], r["ppl"], r["kl"]) for r in rows if r["name"] == name and _tag(r) == tag)
        if not pts:
            continue
        xs = [0.0] + [p[0] * 100 for p in pts]
        label = name + (f" ({tag})" if tag else "")
        axes[0].plot(xs, [dense["ppl"]] + [p[1] for p in pts], "o-", color=color, label=label)
        axes[1].plot(xs, [0.0] + [p[2] for p in pts], "o-", color=color, label=label)
    axes[0].axhline(dense["ppl"] * 1.03, ls="--", color="gray", lw=0.8, label="dense +3%")
    axes[0].set(xlabel="MLP sparsity (%)", ylabel="perplexity (log)", title="perplexity vs MLP sparsity", yscale="log")
    axes[1].set(xlabel="MLP sparsity (%)", ylabel="mean KL vs dense (nats)", title="KL vs MLP sparsity")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_recall(recall: list[dict], path: Path, title: str) -> Path:
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    layers = [r["layer"] for r in recall]
    for keep, color in zip(sorted(recall[0]["mlp"], reverse=True), ("#55a868", "#4c72b0", "#c44e52")):
        ax.plot(layers, [r["mlp"][keep]["recall"] for r in recall], "o-", ms=3, color=color,
                label=f"MLP, keep {float(keep):.0%}: recall")
        ax.plot(layers, [r["mlp"][keep]["kept"] for r in recall], "--", color=color, lw=1,
                label=f"MLP, keep {float(keep):.0%}: h² kept")
    if recall[0].get("heads"):
        keep = sorted(recall[0]["heads"])[0]
        ax.plot(layers, [r["heads"][keep]["recall"] for r in recall], "s:", ms=3, color="k",
                label=f"heads, keep {float(keep):.0%}: recall")
    ax.set(xlabel="layer", ylabel="share", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CEILING = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "contextual" / "dejavu_ceiling.json"


def _ceiling_lines(dense_ppl: float) -> list[str]:
    """The per-token selection's ceiling (benchmarks/dejavu_ceiling.py: the true top-K neurons by
    |SiLU(gate)·up|, and the weights' plain SVD), when that result file is there and was measured
    on the same dense perplexity."""
    import json

    if not CEILING.exists():
        return []
    data = json.loads(CEILING.read_text())
    rows = data.get("rows", [])
    dense = next((r for r in rows if r["how"] == "dense"), None)
    if dense is None or abs(dense["ppl"] - dense_ppl) > 1e-2 * dense_ppl:
        return []
    by = {}
    for r in rows:
        if r["how"] != "dense":
            by.setdefault(r["how"], []).append(f"{1 - r['keep']:.0%} {r['delta_pct']:+.1f}%")
    return ["", f"The ceiling (`python benchmarks/dejavu_ceiling.py`, `benchmarks/results/contextual/dejavu_ceiling.md`, "
            f"{data['meta'].get('tokens', '?')} tokens, {data['meta'].get('date', '?')[:10]}): perplexity vs dense at each "
            "MLP sparsity when every token keeps " + "; ".join(
                f"{_ceiling_label(how)}: " + ", ".join(v) for how, v in by.items())
            + ". Per-token selection itself is sound on this model; the predictor's ranking is what costs accuracy."]


def _ceiling_label(how: str) -> str:
    if how == "oracle":
        return "its true top-K neurons by |SiLU(gate)·up|"
    if how.startswith("int "):  # "int 4" / "int 4 gate only": b-bit copies of the weights as the predictor
        bits = how.split()[1]
        if how.endswith("gate only"):
            return f"the top-K of |SiLU(g~)| from a {bits}-bit copy of W_gate (CATS's score)"
        return f"the top-K of |SiLU(g~)·u~| from {bits}-bit copies of W_gate / W_up (one scale per 64 inputs)"
    return f"the top-K of a training-free {how} (plain SVD of the weights)"


def _niah_lines(niah: list[dict], out: Path) -> list[str]:
    """Needle retrieval with the sparsity on the decode steps: accuracy per method and length + heatmap."""
    from .report import niah_heatmap

    lengths = sorted({r["length"] for r in niah})
    methods = list(dict.fromkeys(r["method"] for r in niah))
    lines = ["## Needle in a haystack with contextual sparsity on", "",
             "The answer's decode steps run sparse (pre-filling dense, `apply_to=\"decode\"`, the default); "
             f"{len({r['depth'] for r in niah})} needle depths per length, Paul Graham essays "
             "(`sparseinfer eval niah`'s prompts).", "",
             "| method | " + " | ".join(f"{L} tok" for L in lengths) + " | all |",
             "|---" * (len(lengths) + 2) + "|"]
    for m in methods:
        rs = [r for r in niah if r["method"] == m]
        cells = []
        for L in lengths:
            sub = [r["correct"] for r in rs if r["length"] == L]
            cells.append(f"{100 * sum(sub) / len(sub):.0f}%")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * sum(r['correct'] for r in rs) / len(rs):.0f}% |")
    png = niah_heatmap(niah, out / "contextual-niah.png", "NIAH, contextual sparsity on the decode steps")
    return lines + ["", f"![needle retrieval]({png.name})", ""]


def _allocation_lines(allocations: dict, out: Path) -> list[str]:
    """The calibrated per-layer MLP sparsities of the "(allocated)" rows: table + plot."""
    from .report import _plt

    allocs = list(allocations.items())
    n = len(allocs[0][1].sparsities)
    c0 = allocs[0][1].curves
    lines = ["## Calibrated per-layer MLP sparsity (the \"(allocated)\" rows)", "",
             f"`sparseinfer allocate-mlp` (`contextual.allocation`): for each layer and sparsity level "
             f"{', '.join(f'{x:.0%}' for x in c0.levels)}, the mean KL vs dense with only that layer's MLP sparse, on "
             f"{c0.meta.get('tokens', '?')} tokens of the calibration essays (not the held-out text above; "
             + ", ".join(f"{m} {sec} s" for m, sec in {a.method: a.curves.meta.get("seconds", "?") for _, a in allocs}.items())
             + f" on this CPU); then, from every layer at 0, steps of {allocs[0][1].meta.get('step', 0.05):.0%} go one at a "
             "time to the layer whose KL rises "
             "least, until the mean is the target. 'sum of layer KLs' = the measured single-layer KLs added up "
             "(what the greedy minimises), allocated vs uniform.", "",
             "| allocation | sum of layer KLs: allocated / uniform | min / max layer sparsity |", "|---|---|---|"]
    for key, a in allocs:
        lines.append(f"| {key} | {a.predicted_kl:.3f} / {a.uniform_kl:.3f} | {min(a.sparsities):.0%} / {max(a.sparsities):.0%} |")
    lines += ["", "| layer | " + " | ".join(k for k, _ in allocs) + " |", "|---" * (len(allocs) + 1) + "|"]
    for i in range(n):
        lines.append(f"| {i} | " + " | ".join(f"{a.sparsities[i]:.0%}" for _, a in allocs) + " |")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key, a in allocs:
        ax.plot(range(n), [100 * x for x in a.sparsities], "o-", ms=3, label=key)
    ax.set(xlabel="layer", ylabel="MLP sparsity (%)", title="calibrated per-layer MLP sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / "contextual-allocation.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return lines + ["", f"![per-layer allocation]({png.name})", ""]


def write_report(rows: list[dict], out: Path, model_id: str, command: str, pred_meta: dict, teal_meta: dict,
                 length: int, windows: int, niah: list[dict] | None = None, allocations: dict | None = None) -> Path:
    from .report import environment, write_json

    out = Path(out)
    env = environment()
    write_json(out / "contextual.json", "contextual", {"model": model_id, "length": length, "windows": windows,
                                                       "command": command, "predictors": {k: v for k, v in pred_meta.items() if k != "recall"},
                                                       "teal": teal_meta, "niah": niah,
                                                       "allocations": {k: asdict(a) for k, a in (allocations or {}).items()}},
               rows)
    png = _plot(rows, out / "contextual.png", f"{model_id}: contextual sparsity, {windows}x{length} held-out tokens")
    recall = pred_meta.get("recall")
    rpng = _plot_recall(recall, out / "contextual-recall.png", "Deja Vu predictor recall per layer (held-out tokens)") \
        if recall else None
    dense = next(r for r in rows if r["name"] == "dense")
    lines = [
        f"# Contextual sparsity in decoding (TEAL, Deja Vu): {model_id}",
        "",
        f"Regenerate: `{command}`  ",
        f"Date {env['date']}, {env['device']}, torch {env['torch']}, transformers {env['transformers']}.",
        "",
        f"Perplexity on {windows} disjoint window(s) of {length} tokens of held-out essays "
        "(`sparseinfer.data.heldout_text`), one forward per window with the sparsity applied to **every** "
        "token (`apply_to=\"all\"`): MLP / head sparsity act per token, so this equals teacher-forced decoding "
        "where every token was a sparse decode step (a pessimistic bound: in use, pre-filling stays dense). "
        "KL = mean KL(dense || sparse) of the next-token distributions; top-1 = share of positions where the "
        "sparse model's argmax equals the dense one's. Masked torch reference (`backend=\"reference\"`).",
        "",
        f"- TEAL: thresholds on the inputs of gate/up_proj and down_proj (and q/k/v/o_proj for \"TEAL attn\"), "
        f"the {teal_meta.get('n_tokens', '?')}-token calibration's |x| quantile at the target sparsity, uniform over layers. "
        "`kept` = measured share of input channels kept on this text (mlp_in / down_in).",
        (f"- Deja Vu: per-layer predictor of kind \"glu\" (rank {pred_meta.get('rank', '?')}) from the layer's "
         f"{'MLP input' if pred_meta.get('mlp_input', 'mlp_in') == 'mlp_in' else 'attention input (look-ahead)'}: "
         "a rank-r model of the gate and up projections fitted in closed form (reduced-rank ridge regression on the "
         "calibration activations; `contextual.dejavu.fit_glu`)"
         + (f", then fine-tuned for the selection ({pred_meta['finetune_steps']} Adam steps per layer at "
            f"{' / '.join(f'{k:.0%}' for k in pred_meta.get('finetune_keeps', []))} kept; `contextual.dejavu.finetune_glu`)"
            if pred_meta.get("finetune_steps") else "")
         + ", scored |SiLU(g~)·u~|"
         if pred_meta.get("kind") == "glu" else
         f"- Deja Vu: kind \"int4\": W_gate / W_up rounded to {pred_meta.get('bits', '?')} bits, scored |SiLU(g~)·u~|"
         if pred_meta.get("kind") == "int4" else
         f"- Deja Vu: per-layer linear predictor (rank {pred_meta.get('rank', '?')}, no nonlinearity) from the layer's "
         f"{'MLP input' if pred_meta.get('mlp_input', 'mlp_in') == 'mlp_in' else 'attention input (look-ahead)'}, "
         f"trained with weighted BCE on the top {pred_meta.get('label_frac', 0.5):.0%} neurons by |SiLU(gate)·up|")
        + f" ({pred_meta.get('n_tokens', '?')} calibration tokens of `haystack_text`, "
        f"{pred_meta.get('seconds_total', pred_meta.get('seconds', '?'))} s on this CPU, heads included); a fixed K "
        f"neurons per token, chosen per block of {SELECT_BLOCK} neurons (each block keeps its share of the K, "
        "`contextual.dejavu.blocked_top_mask`). Rows marked (r=N) use low-rank predictors at rank N (the same kind, "
        "or glu when the above is int4), fitted by this command; rows marked (intB) use kind \"int4\" predictors: W_gate / W_up rounded to B bits "
        "(one scale per 64 inputs), training-free, scored |SiLU(g~)·u~| (`contextual.dejavu.quantized`; on a GPU "
        "one Triton launch scores and selects from the packed 4-bit codes, `kernels.predict.dejavu_select_int4`). "
        "Heads: a linear predictor of the per-head attention-output norm; the top-K query heads are kept, the "
        "others' outputs zeroed before o_proj.",
        "",
    ]
    if allocations:
        lines += ["- Rows marked (allocated): the same method with calibrated per-layer MLP sparsities whose mean is "
                  "the row's sparsity (`sparseinfer allocate-mlp`; section below); the other rows use one sparsity "
                  "for every layer.", ""]
    lines += [
        "| setting | ppl | Δppl | top-1 vs dense | KL (nats) | kept (measured) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r.get("kept_share", {}).items()))
        d = (r["ppl"] / dense["ppl"] - 1) * 100
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {d:+.1f}% | {r['top1']:.3f} | {r['kl']:.4f} | {kept} |")
    summary = []
    for name, tag in _curves(rows):
        pts = sorted(((r["mlp_sparsity"], r) for r in rows if r["name"] == name and _tag(r) == tag),
                     key=lambda t: t[0])
        ok = [sp for sp, r in pts if r["ppl"] <= dense["ppl"] * 1.03]
        if pts:
            summary.append(f"**{name}{f' ({tag})' if tag else ''}**: highest tested MLP sparsity within +3% ppl of dense: "
                           + (f"{max(ok):.0%}" if ok else "none") + "; KL at "
                           + ", ".join(f"{sp:.0%} {r['kl']:.3f}" for sp, r in pts) + ".")
    lines += [""] + [f"- {x}" for x in summary]
    lines += _ceiling_lines(dense["ppl"])
    lines += ["", f"![ppl and KL vs MLP sparsity]({png.name})", ""]
    if allocations:
        lines += _allocation_lines(allocations, out)
    if niah:
        lines += _niah_lines(niah, out)
    lines += [
              "GPU speed (sparse decode kernels, captured decode step, Llama-3.1-8B shapes): "
              "`python benchmarks/contextual.py --out benchmarks/results/contextual` -> "
              "`benchmarks/results/contextual/contextual.md`.", ""]
    if recall:
        lines += ["## Deja Vu predictor recall (held-out calibration tokens)", "",
                  "recall = share of the true top-K neurons (by |SiLU(gate)·up|) that the predicted top-K contains; "
                  "h² kept = share of the activation energy sum(h²) the predicted set keeps (oracle in brackets).", ""]
        keeps = sorted(recall[0]["mlp"], reverse=True)
        lines.append("| layer | " + " | ".join(f"MLP keep {float(k):.0%}: recall / h² kept (oracle)" for k in keeps)
                     + (f" | heads keep {float(sorted(recall[0]['heads'])[0]):.0%}: recall" if recall[0].get("heads") else "") + " |")
        lines.append("|---" * (1 + len(keeps) + (1 if recall[0].get("heads") else 0)) + "|")
        for r in recall:
            cells = [f"{r['mlp'][k]['recall']:.2f} / {r['mlp'][k]['kept']:.2f} ({r['mlp'][k]['oracle_kept']:.2f})" for k in keeps]
            if r.get("heads"):
                cells.append(f"{r['heads'][sorted(r['heads'])[0]]['recall']:.2f}")
            lines.append(f"| {r['layer']} | " + " | ".join(cells) + " |")
        lines += ["", f"![predictor recall per layer]({rpng.name})", ""]
    path = out / "contextual.md"
    path.write_text("\n".join(lines) + "\n")
    return path
