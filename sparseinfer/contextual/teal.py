"""TEAL (training-free activation sparsity): per layer and per projection input, a magnitude
threshold below which input channels are dropped; the threshold for a target sparsity s is
the s-quantile of |x| over calibration tokens.

Sites (see `activations`): "attn_in" (q/k/v_proj input), "o_in" (o_proj input), "mlp_in"
(gate/up_proj input), "down_in" (down_proj input). A `Thresholds` file keeps the |x|
quantiles at levels 0.00, 0.01, ..., 0.99 for every layer and site, so any sparsity in
[0, 0.99] is read off by linear interpolation, with no recalibration.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .activations import SITES, Activations, collect

LEVELS = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)
_MAX_QUANTILE = 1 << 23  # torch.quantile takes at most 16M elements: sample beyond this


@dataclass
class Thresholds:
    """quantiles [L, len(SITES), 100] float32: |x| quantile at LEVELS per layer and site."""

    quantiles: torch.Tensor
    meta: dict

    @property
    def n_layers(self) -> int:
        return self.quantiles.shape[0]

    def threshold(self, layer: int, site: str, sparsity: float) -> float:
        """|x| threshold dropping a `sparsity` share of the site's input channels (calibration estimate)."""
        if not 0.0 <= sparsity <= 0.99:
            raise ValueError(f"threshold: expected a sparsity in [0, 0.99], got {sparsity}")
        q = self.quantiles[layer, SITES.index(site)].double()
        pos = sparsity / 0.01
        lo = min(int(pos), 98)
        frac = pos - lo
        return float(q[lo] * (1 - frac) + q[lo + 1] * frac) if sparsity > 0 else 0.0

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"quantiles": self.quantiles.contiguous()}, str(path),
                  metadata={"kind": "teal-thresholds", "sites": json.dumps(SITES), "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path) -> "Thresholds":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("kind") != "teal-thresholds":
                raise ValueError(f"{path}: expected a TEAL thresholds file (kind 'teal-thresholds'), got {md.get('kind')!r}")
            q = f.get_tensor("quantiles")
        return cls(q, json.loads(md.get("meta", "{}")))

    def check_matches(self, model_config, source: str) -> None:
        n = model_config.num_hidden_layers
        if self.n_layers != n:
            raise ValueError(f"{source}: TEAL thresholds for {self.n_layers} layers, the model has {n}")


def thresholds_from(acts: Activations, meta: dict | None = None, progress: bool = True) -> Thresholds:
    """|x| quantiles at LEVELS for every layer and site of `acts` (all four sites required)."""
    missing = [s for s in SITES if s not in acts.sites]
    if missing:
        raise ValueError(f"thresholds_from: activations lack site(s) {missing}")
    n_layers = len(acts.sites["mlp_in"])
    out = torch.zeros(n_layers, len(SITES), len(LEVELS))
    gen = torch.Generator().manual_seed(0)
    for i in tqdm(range(n_layers), desc="TEAL thresholds", disable=not progress):
        for j, s in enumerate(SITES):
            a = acts.layer(s, i).float().abs().flatten()
            if a.numel() > _MAX_QUANTILE:
                a = a[torch.randint(a.numel(), (_MAX_QUANTILE,), generator=gen).to(a.device)]
            out[i, j] = torch.quantile(a, LEVELS.float().to(a.device)).float().cpu()
    return Thresholds(out, dict(meta or {}))


def calibrate(model, tok, text: str | None = None, n_tokens: int = 4096, window: int = 1024,
              model_id: str = "", progress: bool = True) -> Thresholds:
    """Collect activations on `text` (default: the calibration essays, `sparseinfer.data.haystack_text`)
    and build the thresholds."""
    from ..data import haystack_text

    t0 = time.perf_counter()
    acts = collect(model, tok, text if text is not None else haystack_text(), n_tokens, window, progress)
    meta = {"model": model_id or getattr(model.config, "_name_or_path", ""), "n_tokens": n_tokens, "window": window,
            "text": "given" if text is not None else "sparseinfer.data.haystack_text"}
    th = thresholds_from(acts, meta, progress)
    th.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return th
