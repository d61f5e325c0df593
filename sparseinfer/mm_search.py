"""Offline MMInference search: per head, the boundary type and per-modality intra pattern and
budget with the smallest attention-output error on one calibration input, among candidates
whose *kernel cost* fits a target.

Kernel-aware cost (`kernel_cost`): the key tiles the Triton kernel visits for the candidate's
index (every modality slot's block-masked launch, `SparseIndex.work_fraction`, plus the dense
rows), over the causal cells; candidates of equal cost cost about the same time. Error: per head
||o - o_dense|| / ||o_dense|| of the attention output (torch reference) on the calibration
q/k/v. Per head, the candidate with the lowest error among those with cost <= ``target`` wins
(the cheapest candidate when none fits).

Search space (small; `candidates`): boundary in {none, k, q, 2d} x video intra in {A-shape,
vertical-slash, grid with / without horizontal lines} x budget level; text and image queries
use vertical-slash at the same level under q / 2d.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from . import config as config_io
from . import index as _index
from .ops import dense_attention
from .ops.mm import mm_attention
from .patterns.mm import MMInferenceLayer, ModalityContext

LEVELS = (0.01, 0.02, 0.05, 0.1)  # budget levels (fractions of N)
SINK = 64


def candidates(levels=LEVELS) -> list[dict]:
    """Head entries of the search space (see the module docstring)."""
    out = []
    for lv in levels:
        intras = {
            "ashape": {"pattern": "ashape", "sink": SINK, "window": 2 * lv},
            "vertical_slash": {"pattern": "vertical_slash", "vertical": lv, "slash": lv},
            "grid": {"pattern": "grid", "sink": SINK, "window": 2 * lv},
            "grid_v": {"pattern": "grid", "sink": SINK, "window": 2 * lv, "horizontal_lines": False},
        }
        text = {"pattern": "vertical_slash", "vertical": lv, "slash": lv}
        for name, video in intras.items():
            for b in ("none", "k"):
                out.append({"boundary": b, "intra": {"all": video}})
            for b in ("q", "2d"):
                if name != "vertical_slash":
                    out.append({"boundary": b, "intra": {"all": text, "video": video}})
                else:
                    out.append({"boundary": b, "intra": {"all": text}})
    return out


def kernel_cost(n: int, modality: torch.Tensor, vertical_idx, slash_idx, dense_rows, block: int = 64) -> torch.Tensor:
    """[B, H] visited key tiles x block^2 over the causal cells for `ops.mm_attention` with these
    indices (block-masked launch per modality slot) + the dense rows' cells."""
    b, h, slots = vertical_idx.shape[:3]
    nqb = math.ceil(n / block)
    m = torch.nn.functional.pad(modality.long(), (0, nqb * block - n), value=-1).view(b, nqb, block)
    total = 0.0
    for a in range(slots):
        idx = _index.from_vertical_slash(vertical_idx[:, :, a], slash_idx[:, :, a], n, block)
        keep = (m == a).any(-1)[:, None, :]
        idx.range_count = torch.where(keep, idx.range_count, 0).to(torch.int32)
        idx.column_count = torch.where(keep, idx.column_count, 0).to(torch.int32)
        total = total + idx.work_fraction(block, samples=nqb)
    if dense_rows is not None and dense_rows.shape[-1]:
        cells = torch.where(dense_rows >= 0, dense_rows + 1, 0).double().sum(-1)
        total = total + (cells / (n * (n + 1) / 2)).float()
    return total


def search_layer(q, k, v, modality, frame: int | None, scale: float, target: float, space=None, last_q: int = 64):
    """One layer: q [1, Hq, N, D], k/v [1, Hkv, N, D], modality [1, N] -> (per-head entries,
    per-head {"error", "cost", "density"} of the chosen candidate)."""
    space = candidates() if space is None else space
    hq, n = q.shape[1], q.shape[2]
    ctx = ModalityContext(modality, frame)
    dense = dense_attention(q, k, v, scale=scale, backend="reference")
    errs, costs, dens = [], [], []
    for cand in space:
        (sel,) = MMInferenceLayer([cand] * hq, ctx, last_q).select(q, k, scale)
        kw = sel.kwargs
        out = mm_attention(q, k, v, **kw, scale=scale, backend="reference")
        errs.append(((out - dense).double().norm(dim=(-1, -2)) / dense.double().norm(dim=(-1, -2)))[0])
        costs.append(kernel_cost(n, modality, kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])[0].double())
        dens.append(sel.density[0].double())
    err, cost, den = torch.stack(errs), torch.stack(costs), torch.stack(dens)  # [C, H]
    fits = cost <= target
    score = torch.where(fits, err, float("inf"))
    pick = torch.where(fits.any(0), score.argmin(0), cost.argmin(0))
    heads = [space[int(c)] for c in pick]
    info = [{"error": float(err[c, h]), "cost": float(cost[c, h]), "density": float(den[c, h])}
            for h, c in enumerate(pick.tolist())]
    return heads, info


def capture_qkv(model, inputs: dict) -> list[tuple]:
    """Run `model(**inputs)` once densely and return each language-model layer's (q, k, v, scale)
    (post-RoPE) from the attention function, through transformers' registry (no model code)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got = []

    def capture(module, query, key, value, attention_mask, scaling=None, **kw):
        got.append((module.layer_idx, query.detach(), key.detach(), value.detach(),
                    query.shape[-1] ** -0.5 if scaling is None else scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("sparseinfer_capture", capture)
    cfg = model.config
    vlm = hasattr(cfg, "text_config") and cfg.text_config is not cfg
    prev = ({"text_config": cfg.text_config._attn_implementation, "vision_config": cfg.vision_config._attn_implementation}
            if vlm else cfg._attn_implementation)
    model.set_attn_implementation({"text_config": "sparseinfer_capture", "vision_config": prev["vision_config"]}
                                  if vlm else "sparseinfer_capture")
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.set_attn_implementation(prev)
    return [g[1:] for g in sorted(got, key=lambda g: g[0])]


def search_model(model, inputs: dict, modality: torch.Tensor, frame: int | None, target: float = 0.1,
                 space=None, name: str = "model") -> dict:
    """Search every language-model layer on one calibration input -> an MMInference config
    (``"kind": "mminference"``, see sparseinfer.config)."""
    t0 = time.time()
    tc = model.config.text_config if hasattr(model.config, "text_config") else model.config
    layers, infos = [], []
    for q, k, v, scale in tqdm(capture_qkv(model, inputs), desc="mminference search", leave=False):
        heads, info = search_layer(q, k, v, modality, frame, scale, target, space)
        layers.append(heads)
        infos.append(info)
    cfg = {
        "schema_version": config_io.SCHEMA_VERSION,
        "kind": "mminference",
        "model": name,
        "fingerprint": config_io.fingerprint(tc),
        "search": {"length": int(modality.shape[-1]), "target_cost": target, "frame": frame,
                   "seconds": round(time.time() - t0, 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "per_head": infos},
        "layers": layers,
    }
    return config_io.validate(cfg)
