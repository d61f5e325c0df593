"""A decoder layer's q, k and v projections as one matrix product.

A decode step at batch 1 multiplies one hidden row by each projection: three GEMVs, the k / v ones
small (Llama-3-8B: [1024, 4096] against q's [4096, 4096]), and cuBLAS reads the small ones at about
half the copy bandwidth. One GEMV over the stacked weights reads the same bytes faster (H100, bf16,
CUDA graph, 32 layers of Llama-3.1-8B shapes: 20.5 vs 30.6 us per layer, fused_projections.md; the
captured compiled decode step 6.61 -> 6.32 ms, step_isolated.md; both in benchmarks/results/contextual/).
It is what fused-QKV decoders (gpt-fast, vLLM) do.

    fuse(model) -> int: every attention module with plain `q_proj` / `k_proj` / `v_proj` linears
        (same input size, dtype and device; all with a bias or none) gets its three weights stored as
        row blocks of one buffer W [Oq + Ok + Ov, H] (the parameters become views of it: no extra
        memory once the old storages are freed; biases likewise). q_proj then computes
        x [.., H] -> x W^T [.., Oq + Ok + Ov] once and keeps it; k_proj and v_proj called on the
        same input tensor return their column blocks of it; any other call computes its own
        projection from its own (view) weight, so every call order stays correct. Returns the
        number of layers fused (modules with other layouts, e.g. phi3's qkv_proj, tensor-parallel
        or quantized weights, or projections whose forward is already replaced, are left alone).
    unfuse(model): each weight (and bias) back in a storage of its own and the original forwards.

The outputs are the unfused ones up to summation order inside the matrix product (float64: equal
to rounding, tests/test_qkv.py). For inference: while fused, q_proj reads the buffer, so gradients
do not reach the three parameters; in-place writes to them (load_state_dict) reach the buffer, but
moving or casting the model (`.to`) gives the parameters new storages and leaves the buffer behind
(the next call then fails on the device / dtype mismatch): patch after moving. The parameters stay
contiguous row blocks, so `save_pretrained` while fused writes the unfused model's weights
(tests/test_qkv.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ATTR = "_sparseinfer_qkv"
_NAMES = ("q_proj", "k_proj", "v_proj")


class SharedProduct:
    """q_proj's product over a layer's stacked q/k/v weight, kept for k_proj / v_proj on the same input.

    bounds: each projection's output columns [(lo, hi), ...] in q, k, v order. `block(j, x, product)`
    -> projection j's columns of product(x) [.., hi - lo]: j == 0 computes and keeps (x, product(x));
    a later j on the very same input tensor reads the kept product (the last one drops it); None when
    nothing kept fits (the caller computes its own projection). Also serves TEAL's one q/k/v launch
    (contextual.patching)."""

    def __init__(self, bounds: list[tuple[int, int]]):
        self.bounds = bounds
        self.last: tuple | None = None

    @staticmethod
    def bounds_of(weights) -> list[tuple[int, int]]:
        """Output column ranges of weights [O_i, H] stacked in order."""
        bounds, o = [], 0
        for w in weights:
            bounds.append((o, o + w.shape[0]))
            o += w.shape[0]
        return bounds

    def block(self, j: int, x: torch.Tensor, product) -> torch.Tensor | None:
        lo, hi = self.bounds[j]
        if j == 0:
            y = product(x)
            self.last = (x, y)
            return y[..., lo:hi]
        last = self.last
        if last is None or last[0] is not x:
            return None
        if j == len(self.bounds) - 1:
            self.last = None
        return last[1][..., lo:hi]


class _Fused(SharedProduct):
    """One layer's fused state: the stacked weight / bias and the kept product."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bounds: list[tuple[int, int]]):
        super().__init__(bounds)
        self.weight, self.bias = weight, bias


def _fusable(attn) -> list[torch.nn.Linear] | None:
    lins = [getattr(attn, n, None) for n in _NAMES]
    if not all(type(lin) is torch.nn.Linear for lin in lins):
        return None
    ws = [lin.weight for lin in lins]
    if not all(type(w) is torch.nn.Parameter and w.is_floating_point() and w.device.type != "meta" for w in ws):
        return None  # tensor-parallel (DTensor), quantized or not materialised weights
    if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1:
        return None
    if len({lin.bias is None for lin in lins}) != 1:
        return None
    if any("forward" in vars(lin) or getattr(lin, "_hf_hook", None) is not None for lin in lins):
        return None  # already patched (e.g. TEAL's own q/k/v launch) or offloaded by accelerate
    return lins


def _forward(lin: torch.nn.Linear, state: _Fused, j: int):
    def forward(x):
        y = state.block(j, x, lambda t: F.linear(t, state.weight, state.bias))
        return F.linear(x, lin.weight, lin.bias) if y is None else y

    return forward


def fuse(model) -> int:
    """Stack every fusable layer's q/k/v weights into one buffer (see the module docstring)."""
    n = 0
    for attn in model.modules():
        if hasattr(attn, _ATTR):
            continue
        lins = _fusable(attn)
        if lins is None:
            continue
        with torch.no_grad():
            weight = torch.cat([lin.weight.data for lin in lins]).contiguous()
            bias = None if lins[0].bias is None else torch.cat([lin.bias.data for lin in lins]).contiguous()
        bounds = SharedProduct.bounds_of([lin.weight for lin in lins])
        for lin, (lo, hi) in zip(lins, bounds):
            lin.weight.data = weight[lo:hi]
            if bias is not None:
                lin.bias.data = bias[lo:hi]
        state = _Fused(weight, bias, bounds)
        for j, lin in enumerate(lins):
            lin.forward = _forward(lin, state, j)
        setattr(attn, _ATTR, state)
        n += 1
    return n


def unfuse(model) -> None:
    """Undo `fuse`: separate storages and the original forwards (a no-op on an unfused model)."""
    for attn in model.modules():
        state = getattr(attn, _ATTR, None)
        if state is None:
            continue
        for name in _NAMES:
            lin = getattr(attn, name)
            del lin.forward
            lin.weight.data = lin.weight.data.clone()
            if lin.bias is not None:
                lin.bias.data = lin.bias.data.clone()
        delattr(attn, _ATTR)


def fused_layers(model) -> int:
    """How many attention modules of `model` are fused."""
    return sum(hasattr(m, _ATTR) for m in model.modules())
