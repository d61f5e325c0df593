"""Shadow mode: `patch(..., shadow=0.05)` runs dense attention as well on a sampled share of
calls and records how far the sparse result is from it, without changing what the model returns.

Two measurements, each on its own deterministic sample (random.Random(shadow_seed)):
* per attention call (sparse calls only): relative error ||o_sparse - o_dense|| / ||o_dense||
  of the layer's attention output, both computed from the same (sparse-model) q, k, v;
* per model forward (pre-fills, i.e. forwards whose input holds >= min_len tokens): the model
  is run again with every layer dense (a forward hook; a KV cache passed in is deep-copied
  before the forward so the replay does not write into it) and KL(dense || sparse) of the
  final logits, mean over the positions returned, is recorded.
Records land in `handle.stats.shadow` (see ShadowRecord); values are tensors read lazily.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv import cache_key


@dataclass
class ShadowRecord:
    kind: str  # "attention" (one layer's output) or "logits" (the model's final logits)
    layer: int  # -1 for "logits"
    q_len: int
    value: torch.Tensor  # 0-dim: relative error ("attention") or mean KL in nats ("logits")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "q_len": self.q_len, "value": float(self.value)}


def check_shadow(rate, seed) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"patch: shadow expected a share of calls in [0, 1], got {rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"patch: shadow_seed expected an int, got {seed!r}")


class Shadow:
    """Shared by the layer plans of one patch. `forcing` is True while the dense replay runs."""

    def __init__(self, rate: float, seed: int, records: list, min_len: int):
        self.rate = rate
        self.records = records
        self.min_len = min_len
        self._attn_rng = random.Random(seed)
        self._model_rng = random.Random(seed + 1)
        self.forcing = False
        self._saved = None
        self._armed = False
        self._hooks = []

    def sample_call(self) -> bool:
        return self.rate > 0 and self._attn_rng.random() < self.rate

    def attention(self, layer: int, out: torch.Tensor, dense_out: torch.Tensor) -> None:
        """out, dense_out: the same layer's outputs (any equal shapes)."""
        o, d = out.detach().float(), dense_out.detach().float()
        err = (o - d).norm() / d.norm().clamp_min(1e-30)
        self.records.append(ShadowRecord("attention", layer, out.shape[1], err))

    # ------------------------------------------------------------ model-level logits KL
    def attach(self, model) -> None:
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       model.register_forward_hook(self._post, with_kwargs=True)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def _length(args, kwargs) -> int:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        return int(x.shape[1]) if torch.is_tensor(x) and x.dim() >= 2 else 0

    def _pre(self, module, args, kwargs):
        self._saved, self._armed = None, False
        if self.forcing or self.rate <= 0 or self._length(args, kwargs) < max(2, self.min_len):
            return None
        if self._model_rng.random() >= self.rate:
            return None
        cache = kwargs.get(cache_key(kwargs))
        self._saved = copy.deepcopy(cache) if cache is not None else None
        self._armed = True
        return None

    def _post(self, module, args, kwargs, output):
        if self.forcing or not self._armed:
            return None
        self._armed = False
        saved, self._saved = self._saved, None
        logits = getattr(output, "logits", None)
        if logits is None:
            return None
        kw = dict(kwargs)
        if saved is not None:
            kw[cache_key(kwargs)] = saved
        self.forcing = True
        try:
            with torch.no_grad():
                ref = module.forward(*args, **kw).logits
        finally:
            self.forcing = False
        lp = F.log_softmax(logits.detach().float(), -1)
        lr = F.log_softmax(ref.float(), -1)
        kl = F.kl_div(lp, lr, log_target=True, reduction="none").sum(-1).mean()
        self.records.append(ShadowRecord("logits", -1, self._length(args, kwargs), kl))
        return None


def summary(records: list[ShadowRecord]) -> dict:
    """{"attention": {layer: mean rel. error}, "logits_kl": mean KL or None, "calls": counts}."""
    att: dict[int, list[float]] = {}
    kls = []
    for r in records:
        if r.kind == "attention":
            att.setdefault(r.layer, []).append(float(r.value))
        else:
            kls.append(float(r.value))
    return {"attention": {k: sum(v) / len(v) for k, v in sorted(att.items())},
            "logits_kl": sum(kls) / len(kls) if kls else None,
            "calls": {"attention": sum(len(v) for v in att.values()), "logits": len(kls)}}
