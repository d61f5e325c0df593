"""Offline per-head pattern search (MInference): for every layer and query head, pick the
pattern (A-shape, vertical-slash, block-sparse) and budget that keep the most attention
mass (recall) for the compute spent.

Cost = kept density (computed causal cells, what the kernel's time follows), measured per
head on the calibration input. Each pattern family is tried at several densities (multiples
of the target, and dense); `allocate` then picks one candidate per head so that the summed
recall is highest while the mean density over all heads of the model stays at the target:
heads with diffuse attention get more, focused heads less.
Calibration: long real text with a needle and a retrieval question, at the model's maximum
length. Budgets are stored as fractions of N, so the config applies at any length.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from . import config as config_io
from .data import essays
from .eval.needle import NeedleBuilder
from .integration import patch, unpatch
from .patterns import block_sparse as bs
from .patterns import vertical_slash as vs
from .patterns.ashape import ashape_density
from .patterns.base import Selection
from .recall import RecallProbe, row_blocks

VS_RATIOS = (0.2, 0.5, 0.8)  # share of the vertical-slash budget given to verticals
LEVELS = (0.5, 1.0, 2.0, 4.0)  # candidate densities, as multiples of the target (and dense)
ASHAPE_SINK = 64
ROW_BLOCKS = 4  # blocks of 64 query rows (spread over the sequence) on which recall is measured
BLOCK = 64


def _pick(dens: torch.Tensor, target: float) -> torch.Tensor:
    """dens [G, H] over a budget grid (ascending) -> per head the grid index of the largest
    density <= target (index 0 if none)."""
    ok = dens <= target
    idx = torch.arange(dens.shape[0], device=dens.device)[:, None].expand_as(dens)
    return torch.where(ok, idx, -1).amax(0).clamp(min=0)


def _prefix(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """order [1, H, M], counts [H] -> [1, H, max(counts)], each head's first counts[h] entries, -1 after."""
    m = max(1, int(counts.max()))
    ar = torch.arange(m, device=order.device)
    return torch.where(ar < counts[:, None], order[..., :m], -1)


def layer_candidates(q, k, scale: float, targets: list[float], last_q: int = 64) -> list[dict]:
    """Candidates for one layer's heads: every pattern family at every density in `targets`
    (per head, the largest budget on a grid whose density does not exceed the target).
    q [1, Hq, N, D], k [1, Hkv, N, D].

    -> list of {"pattern", "budgets": per-head list of dicts (fractions of N), "density": [H],
    "recall": [H]}.
    """
    n = q.shape[2]
    hq = q.shape[1]
    probe = RecallProbe(q, k, scale, row_blocks(n, ROW_BLOCKS))
    out = []
    p = vs.last_query_probs(q, k, last_q, scale)
    vorder = vs._topk_forced(p.sum(-2), n, vs.INIT_TOKENS)
    sorder = vs._topk_forced(vs.diagonal_sums(p), n, vs.LOCAL_OFFSETS)
    del p
    grid = sorted({int(x) for x in torch.logspace(math.log10(8), math.log10(2 * n), 40).round().tolist()})
    vs_dens = {
        r: torch.stack([
            vs.vertical_slash_density(n, vorder[..., : max(1, round(r * t))], sorder[..., : max(1, t - round(r * t))])[0]
            for t in grid
        ])
        for r in VS_RATIOS
    }
    for r, target in [(r, t) for r in VS_RATIOS for t in targets]:
        dens = vs_dens[r]
        choice = _pick(dens, target)
        tot = torch.tensor(grid, device=q.device)[choice]
        nv = (tot * r).round().long().clamp(1, n)
        ns = (tot - (tot * r).round().long()).clamp(1, n)
        sel = Selection("vertical_slash_attention", {"vertical_idx": _prefix(vorder, nv), "slash_idx": _prefix(sorder, ns)},
                        dens.gather(0, choice[None])[0])
        out.append({"pattern": "vertical_slash", "density": sel.density, "recall": probe.recall([sel])[0],
                    "budgets": [{"vertical": int(a) / n, "slash": int(b) / n} for a, b in zip(nv, ns)]})
    sink = min(ASHAPE_SINK, n)
    wgrid = [w for w in grid if w <= n]
    wdens = torch.stack([ashape_density(n, sink, w) for w in wgrid])
    nb = math.ceil(n / BLOCK)
    # best first: the Triton top-k (CUDA) returns rows ascending; the prefixes below are the budgets
    border = bs.estimate(q, k, nb, BLOCK, scale, by_score=True)
    kgrid = sorted({max(1, int(x)) for x in torch.logspace(0, math.log10(nb), 32).round().tolist()})
    ar = torch.arange(nb, device=q.device)
    bdens = torch.stack([bs.block_sparse_density(n, torch.where(ar < kk, border, -1), BLOCK)[0] for kk in kgrid])
    for target in targets:
        out += _ashape_and_block(probe, n, hq, sink, wgrid, wdens, kgrid, bdens, border, ar, nb, target)
    return out


def _ashape_and_block(probe, n, hq, sink, wgrid, wdens, kgrid, dens, border, ar, nb, target) -> list[dict]:
    out = []
    w = wgrid[int(_pick(wdens[:, None], target)[0])]
    sel = Selection("ashape_attention", {"sink": sink, "window": w}, wdens[wgrid.index(w)].expand(hq))
    out.append({"pattern": "ashape", "density": sel.density, "recall": probe.recall([sel])[0],
                "budgets": [{"sink": sink, "window": w / n}] * hq})
    choice = _pick(dens, target)
    kk = torch.tensor(kgrid, device=border.device)[choice]
    idx = torch.where(ar < kk[:, None, None], border, -1)
    sel = Selection("block_sparse_attention", {"block_idx": idx, "block_size": BLOCK}, dens.gather(0, choice[None])[0])
    out.append({"pattern": "block_sparse", "density": sel.density, "recall": probe.recall([sel])[0],
                "budgets": [{"topk": int(x) / nb, "block_size": BLOCK} for x in kk]})
    return out


def allocate(recall: torch.Tensor, density: torch.Tensor, target: float, resolution: float = 5e-4) -> torch.Tensor:
    """Choose one candidate per head: the highest summed recall with the mean density at most
    `target` (a multiple-choice knapsack, solved exactly by dynamic programming over the
    density budget in steps of `resolution`, costs rounded up).

    recall, density: [M, C] for M heads and C candidates -> [M] chosen candidate indices.
    """
    import numpy as np

    r = recall.double().cpu().numpy()
    cost = np.ceil(density.double().cpu().numpy() / resolution - 1e-3).astype(np.int64)
    m, c = r.shape
    cap = int(np.floor(target * m / resolution + 1e-6))
    cheapest = int(cost.min(1).sum())
    if cheapest > cap:  # even the cheapest candidates exceed the target: take them
        return torch.as_tensor(cost.argmin(1))
    best = np.full(cap + 1, -np.inf)
    best[0] = 0.0
    choice = np.zeros((m, cap + 1), dtype=np.int16)
    for h in range(m):
        cand = np.full((c, cap + 1), -np.inf)
        for j in range(c):
            w = cost[h, j]
            if w <= cap:
                cand[j, w:] = best[: cap + 1 - w] + r[h, j]
        choice[h] = cand.argmax(0)
        best = cand.max(0)
    b = int(best.argmax())
    out = np.zeros(m, dtype=np.int64)
    for h in range(m - 1, -1, -1):
        out[h] = choice[h, b]
        b -= cost[h, out[h]]
    return torch.as_tensor(out)


def calibration_prompts(tokenizer, length: int, count: int) -> list[list[int]]:
    """NIAH-style prompts (essays + needle + question) of `length` tokens, needles at spread depths."""
    builder = NeedleBuilder(tokenizer, seed=1234)
    return [builder.build(length, (i + 0.5) / count).input_ids for i in range(count)]


@torch.inference_mode()
def search(model, tokenizer, *, model_id: str = "", length: int | None = None, target_density: float = 0.1,
           prompts: int = 2, progress: bool = True) -> dict:
    """-> a config dict (see `sparseinfer.config`) for `model`. Runs the model densely on the
    calibration prompts and scores each layer's candidates as the layer is computed."""
    if not 0 < target_density <= 1:
        raise ValueError(f"target_density: expected a share in (0, 1], got {target_density!r}")
    length = length or getattr(model.config, "max_position_embeddings", 8192)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    sums: dict[int, list[dict]] = {}
    levels = sorted({min(1.0, target_density * f) for f in LEVELS} | {1.0})
    t0 = time.perf_counter()
    bar = tqdm(total=prompts * n_layers, desc="search", disable=not progress)

    def observe(layer, q, k, scale):
        bar.set_postfix_str(f"layer {layer}")
        cands = layer_candidates(q, k, scale, levels)
        if layer not in sums:
            sums[layer] = cands
        else:
            for acc, c in zip(sums[layer], cands):
                acc["recall"] = acc["recall"] + c["recall"]
                acc["density"] = acc["density"] + c["density"]
                acc["budgets"] = [{key: a[key] + b[key] if isinstance(a[key], float) else a[key] for key in a}
                                  for a, b in zip(acc["budgets"], c["budgets"])]
        bar.update()

    handle = patch(model, "dense")
    for m in model.modules():
        if hasattr(m, "_sparseinfer"):
            m._sparseinfer.observer = observe
    try:
        for ids in calibration_prompts(tokenizer, length, prompts):
            model(torch.tensor([ids], device=model.device), logits_to_keep=1)
    finally:
        unpatch(model)
        bar.close()
    del handle
    rec = torch.stack([torch.stack([c["recall"] for c in sums[li]], -1) for li in range(n_layers)]) / prompts
    den = torch.stack([torch.stack([c["density"] for c in sums[li]], -1) for li in range(n_layers)]) / prompts
    n_cand = rec.shape[-1]
    best = allocate(rec.reshape(-1, n_cand).cpu(), den.reshape(-1, n_cand).cpu(), target_density).reshape(n_layers, n_heads)
    layers = []
    for li in range(n_layers):
        cands = sums[li]
        heads = []
        for h in range(n_heads):
            c = cands[int(best[li, h])]
            b = {key: (val / prompts if isinstance(val, float) else val) for key, val in c["budgets"][h].items()}
            heads.append({"pattern": c["pattern"], **b, "recall": round(float(rec[li, h, best[li, h]]), 4),
                          "density": round(float(den[li, h, best[li, h]]), 4)})
        layers.append(heads)
    return {
        "schema_version": config_io.SCHEMA_VERSION,
        "model": model_id or getattr(model.config, "_name_or_path", ""),
        "fingerprint": config_io.fingerprint(model.config),
        "search": {"length": length, "target_density": target_density, "prompts": prompts,
                   "seconds": round(time.perf_counter() - t0, 1),
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "candidates": {"vertical_slash_ratios": list(VS_RATIOS), "ashape_sink": ASHAPE_SINK,
                                  "block_size": BLOCK, "densities": levels},
                   "mean_density": round(float(den.gather(-1, best[..., None]).mean()), 4),
                   "mean_recall": round(float(rec.gather(-1, best[..., None]).mean()), 4)},
        "layers": layers,
    }
