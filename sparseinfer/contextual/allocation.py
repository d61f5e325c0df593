"""Per-layer MLP sparsity, calibrated: at the same mean sparsity, layers whose MLP tolerates
sparsity take more of it and sensitive layers less (the calibrated alternative to one sparsity
for every layer; TEAL allocates per block greedily in the same spirit).

Measure: for each layer l and level s of `levels`, the mean KL(dense || sparse) of the
next-token distributions on calibration text when only layer l's MLP runs at sparsity s
(`kl [L, len(levels)]`, 0 at s = 0). Allocate: start every layer at 0 and add `step` of sparsity,
one layer at a time, to the layer whose curve (linear between the measured levels) rises least
for it, until the mean reaches the target: the layers' KLs are taken as additive, which holds
for small perturbations. The measurement costs L x len(levels) forwards (SmolLM2-135M, 30
layers x 9 levels of 512 tokens: ~6 CPU minutes per method); the allocation itself is free, so
one measurement serves every target.

    alloc = allocate(model, tok, "teal", 0.5)        # or measure(...) once, then allocation(curves, t)
    patch(model, "dense", mlp="teal", mlp_sparsity=alloc)   # an Allocation, or the path of its JSON
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("teal", "dejavu")


@dataclass
class Curves:
    """kl[l][j]: mean KL (nats per token) with only layer l's MLP at sparsity levels[j]."""

    method: str
    levels: list[float]
    kl: list[list[float]]
    meta: dict = field(default_factory=dict)

    def cost(self, layer: int, s: float) -> float:
        """Layer `layer`'s KL at sparsity s (linear between 0 -> 0 and the measured levels)."""
        if not 0.0 <= s <= self.levels[-1] + 1e-9:
            raise ValueError(f"cost: sparsity {s} outside the measured range [0, {self.levels[-1]}]")
        return float(np.interp(s, [0.0, *self.levels], [0.0, *self.kl[layer]]))


@dataclass
class Allocation:
    """Per-layer MLP sparsities (mean = target) for `method`, and the curves they came from."""

    method: str
    target: float
    sparsities: list[float]
    predicted_kl: float  # sum over layers of each layer's measured KL at its sparsity
    uniform_kl: float  # the same sum with every layer at the target
    curves: Curves
    meta: dict = field(default_factory=dict)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "mlp-allocation", **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Allocation":
        data = json.loads(Path(path).read_text())
        if data.pop("kind", None) != "mlp-allocation":
            raise ValueError(f"{path}: expected an MLP allocation file (kind 'mlp-allocation', from "
                             f"`sparseinfer allocate-mlp`)")
        data["curves"] = Curves(**data["curves"])
        return cls(**data)


def _check(method: str, levels) -> None:
    if method not in METHODS:
        raise ValueError(f"allocation: expected method in {list(METHODS)}, got {method!r}")
    lv = list(levels)
    if not lv or any(not 0.0 < a < 1.0 for a in lv) or any(b <= a for a, b in zip(lv, lv[1:])):
        raise ValueError(f"allocation: expected increasing levels in (0, 1), got {lv}")
    if method == "teal" and lv[-1] > 0.99:
        raise ValueError(f"allocation: TEAL thresholds go up to 0.99 sparsity, got level {lv[-1]}")


@torch.no_grad()
def measure(model, tok, method: str, *, levels=LEVELS, text: str | None = None, length: int = 512,
            thresholds=None, predictors=None, progress: bool = True) -> Curves:
    """The per-layer curves on `length` tokens of `text` (default: the calibration essays,
    `sparseinfer.data.haystack_text`; evaluation uses other, held-out text). thresholds /
    predictors: as for `attach` (None = the shipped ones). The masked torch reference computes
    every call (apply_to="all"), so the result does not depend on the device's kernels."""
    from ..data import haystack_text
    from .patching import attach, decoder_layers, detach

    _check(method, levels)
    n = len(decoder_layers(model))
    ids = tok(text if text is not None else haystack_text(), add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < length:
        raise ValueError(f"allocation: the text has {ids.shape[1]} tokens, need length = {length}")
    ids = ids[:, :length].to(next(model.parameters()).device)
    dense = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    t0 = time.perf_counter()
    kl = [[0.0] * len(levels) for _ in range(n)]
    bar = tqdm(total=n * len(levels), desc=f"{method}: KL per layer and level", disable=not progress)
    for layer in range(n):
        for j, s in enumerate(levels):
            sp = [0.0] * n
            sp[layer] = float(s)
            attach(model, mlp=method, mlp_sparsity=sp, apply_to="all", backend="reference", thresholds=thresholds,
                   predictors=predictors)
            try:
                lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            finally:
                detach(model)
            kl[layer][j] = float(F.kl_div(lp, dense, reduction="none", log_target=True).sum(-1).mean())
            bar.update()
    bar.close()
    meta = {"tokens": length, "text": "given" if text is not None else "sparseinfer.data.haystack_text",
            "seconds": round(time.perf_counter() - t0, 1), "model": getattr(model.config, "_name_or_path", "")}
    return Curves(method, [float(x) for x in levels], kl, meta)


def allocation(curves: Curves, target: float, step: float = 0.05) -> Allocation:
    """Greedy per-layer sparsities with mean = target (a multiple of step / L), each in
    [0, the highest measured level]."""
    n = len(curves.kl)
    top = curves.levels[-1]
    if not 0.0 < step <= top:
        raise ValueError(f"allocation: expected 0 < step <= {top}, got {step}")
    units = round(target * n / step)
    if not 0.0 < target <= top or abs(units * step / n - target) > 1e-9:
        raise ValueError(f"allocation: expected a target in (0, {top}] that is a multiple of step / layers = "
                         f"{step / n:.6g}, got {target}")
    level = [0] * n  # in units of step
    for _ in range(units):
        best, best_gain = None, None
        for l_ in range(n):
            if (level[l_] + 1) * step > top + 1e-9:
                continue
            gain = curves.cost(l_, (level[l_] + 1) * step) - curves.cost(l_, level[l_] * step)
            if best_gain is None or gain < best_gain - 1e-15:
                best, best_gain = l_, gain
        level[best] += 1
    sp = [round(v * step, 6) for v in level]
    return Allocation(curves.method, float(target), sp, sum(curves.cost(i, s) for i, s in enumerate(sp)),
                      sum(curves.cost(i, target) for i in range(n)), curves, {"step": step})


def allocate(model, tok, method: str, target: float, *, step: float = 0.05, **measure_kw) -> Allocation:
    """measure(...) then allocation(curves, target, step)."""
    return allocation(measure(model, tok, method, **measure_kw), target, step)


def per_layer(value, n: int, method: str | None):
    """`attach`'s mlp_sparsity when given an Allocation or the path of its JSON file: its
    sparsities, checked against the layer count and the MLP method; anything else unchanged."""
    if isinstance(value, (str, Path)):
        if not Path(value).is_file():
            raise ValueError(f"mlp_sparsity: expected a float, one float per layer, an Allocation or the path of an "
                             f"allocation file (`sparseinfer allocate-mlp`), got {value!r} (no such file)")
        value = Allocation.load(value)
    if not isinstance(value, Allocation):
        return value
    if len(value.sparsities) != n:
        raise ValueError(f"mlp_sparsity: the allocation has {len(value.sparsities)} layers, the model {n}")
    if method is not None and value.method != method:
        raise ValueError(f"mlp_sparsity: the allocation was measured for mlp={value.method!r}, got mlp={method!r}")
    return list(value.sparsities)
