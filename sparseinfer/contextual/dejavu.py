"""Deja Vu predictors for SwiGLU / GQA models, per layer:

    MLP, kind "glu" (default): [g~ | u~] = (x @ A.T) @ B.T, A [r, H], B [2I, r];
           scores [.., I] = |SiLU(g~) * u~|  (a rank-r model of the gate and up projections)
    MLP, kind "linear":        scores [.., I] = (x @ A.T) @ B.T + b, B [I, r]  (Deja Vu's form)
    MLP, kind "int4" (b bits): [g~ | u~] = x @ B.T, B = [W_gate; W_up] rounded to b bits (symmetric,
           one scale per `group` input channels; A is None), scores as "glu": a training-free
           predictor that reads b/16 of the gate and up weights' bf16 bytes (`quantized`)
    heads: scores [.., Hq] = a @ Wh.T + bh           Wh [Hq, H]

"glu" is fitted in closed form: reduced-rank ridge regression of the layer's gate and up
pre-activations (W_gate m, W_up m for the MLP input m) on the predictor input x. For x = m this
is the rank-r approximation of [W_gate; W_up] that is best on the calibration inputs (an SVD
weighted by their covariance, not the weights' plain SVD). A linear score cannot rank
|SiLU(gate) * up| (|up| is symmetric in its sign); on SmolLM2 at 50% kept, rank 128 finds 0.72
of the true top-K neurons (mean over layers) and keeps 0.92-0.99 of sum(h^2); the linear rank-128
predictor ~0.58 and 0.60-0.77 (docs/contextual.md). The closed form weighs every neuron's gate / up
error alike; `finetune_glu` (the default of `train`, 200 Adam steps per layer) then tunes A, B for
the selection itself: a BCE on the blocked top-K labels at 60% and 50% kept, weighted by how much
activation energy a swap across each block's threshold costs. On SmolLM2 (16384 calibration tokens,
1024 held-out tokens, every token sparse) it cuts perplexity vs dense at 25 / 40 / 50% MLP sparsity
from +19.3 / +40.3 / +65.0% to +17.3 / +29.4 / +51.7% at rank 128, and from +9.0 / +16.4 / +24.7%
to +6.8 / +13.4 / +22.6% at rank 256 (benchmarks/results/contextual/dejavu_finetune.md).

x = the MLP input (post_attention_layernorm output; source="mlp_in", the default) or the
layer's attention input (source="attn_in": look-ahead, the selection overlaps the attention,
`contextual.lookahead`; on SmolLM2, glu rank 128, recall 0.70 vs 0.71 at 50% kept, the linear
kind 0.65 vs 0.8); a = the attention input. `train` defaults to "linear" (it has no model to
read W_gate / W_up from); `train_for_model` and `sparseinfer train-predictors` to "glu".

"linear" and the head predictors are trained with weighted BCE on labels = the top `label_frac`
share of neurons by |SiLU(gate) * up| (resp. of query heads by the norm of their attention
output). At inference the top-K scores are kept (fixed K per layer: static shapes).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .activations import Activations


@dataclass
class QuantRows:
    """B of the int4 kind: an [O, H] matrix as b-bit codes with one float16 scale per `group` inputs.

    codes: uint8 [O, H / 2] for bits <= 4 (two codes per byte: in each group, byte t holds input t
    in the low nibble and input t + group / 2 in the high one, two's complement), else int8 [O, H];
    scales: float16 [O, H / group]; value = code * scale. The GPU selection (`kernels.predict.dejavu_select_int4`) reads the packed
    codes; the reference path dequantizes them per call (`dequantize`)."""
    codes: torch.Tensor
    scales: torch.Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        o, c = self.codes.shape
        return (o, 2 * c if self.packed else c)

    @property
    def packed(self) -> bool:
        return self.codes.dtype == torch.uint8

    @property
    def group(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """-> float32 [O, H]"""
        return _dequantize(_unpack(self.codes, self.group) if self.packed else self.codes, self.scales)

    def to(self, device=None, dtype=None) -> "QuantRows":
        """Moves the codes and scales (dtype is ignored: codes stay codes)."""
        return QuantRows(self.codes.to(device), self.scales.to(device), self.bits)


@dataclass
class LayerPredictor:
    A: torch.Tensor | None  # [r, H]; None (kind "int4"): the identity, B reads x itself
    B: "torch.Tensor | QuantRows"  # [I, r] (linear) or [2I, r] (glu: gate rows, then up rows); int4: QuantRows [2I, H]
    b: torch.Tensor | None  # [I] (linear); None (glu)
    Wh: torch.Tensor | None = None  # [Hq, H]
    bh: torch.Tensor | None = None  # [Hq]

    @property
    def glu(self) -> bool:
        return self.b is None

    def mlp_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., H] -> [.., I]"""
        B = self.B.dequantize() if isinstance(self.B, QuantRows) else self.B
        if self.glu:
            z = x if self.A is None else F.linear(x, self.A.to(x.dtype))
            g, u = F.linear(z, B.to(x.dtype)).chunk(2, dim=-1)
            return (F.silu(g) * u).abs()
        return F.linear(F.linear(x, self.A.to(x.dtype)), B.to(x.dtype), self.b.to(x.dtype))

    def head_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., H] -> [.., Hq]"""
        if self.Wh is None:
            raise ValueError("this predictor file has no head predictors")
        return F.linear(x, self.Wh.to(x.dtype), self.bh.to(x.dtype))

    def to(self, device, dtype: torch.dtype | None = None) -> "LayerPredictor":
        return LayerPredictor(*(None if t is None else t.to(device=device, dtype=dtype or getattr(t, "dtype", None))
                                for t in (self.A, self.B, self.b, self.Wh, self.bh)))


@dataclass
class Predictors:
    layers: list[LayerPredictor]
    meta: dict = field(default_factory=dict)

    def save(self, path, dtype: torch.dtype = torch.float16) -> Path:
        """Weights stored in `dtype` (float16 halves the file; scores only rank neurons)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        quant = self.meta.get("kind") == "int4"
        for i, p in enumerate(self.layers):
            for name in ("A", "B", "b", "Wh", "bh"):
                t = getattr(p, name)
                if t is None:
                    continue
                if name == "B" and quant:  # the codes (packed two per byte at <= 4 bits) + the float16 scales
                    tensors[f"{i}.Bq"], tensors[f"{i}.Bs"] = t.codes.contiguous(), t.scales.contiguous()
                else:
                    tensors[f"{i}.{name}"] = t.to(dtype).contiguous()
        save_file(tensors, str(path), metadata={"kind": "dejavu-predictors", "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path) -> "Predictors":
        """A file written by `save` (kind "glu" predictors have no MLP bias)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("kind") != "dejavu-predictors":
                raise ValueError(f"{path}: expected a Deja Vu predictor file (kind 'dejavu-predictors'), got {md.get('kind')!r}")
            keys = set(f.keys())
            meta = json.loads(md.get("meta", "{}"))
            n = 1 + max(int(k.split(".")[0]) for k in keys)
            layers = [LayerPredictor(*(f.get_tensor(f"{i}.{k}").float() if f"{i}.{k}" in keys else None
                                       for k in ("A", "B", "b", "Wh", "bh"))) for i in range(n)]
            for i, p in enumerate(layers):
                if f"{i}.Bq" in keys:  # kind "int4": the codes (int8 unpacked in files of <= 4 bits: packed here)
                    codes, bits = f.get_tensor(f"{i}.Bq"), int(meta.get("bits", 4))
                    scales = f.get_tensor(f"{i}.Bs")
                    p.B = QuantRows(_pack(codes, codes.shape[1] // scales.shape[1])
                                    if codes.dtype == torch.int8 and bits <= 4 else codes, scales, bits)
        return cls(layers, meta)

    def check_matches(self, model_config, source: str, heads: bool) -> None:
        n, inter, hid = model_config.num_hidden_layers, model_config.intermediate_size, model_config.hidden_size
        if len(self.layers) != n:
            raise ValueError(f"{source}: predictors for {len(self.layers)} layers, the model has {n}")
        p = self.layers[0]
        p_hid = p.B.shape[1] if p.A is None else p.A.shape[1]
        if p_hid != hid or p.B.shape[0] not in (inter, 2 * inter):
            raise ValueError(f"{source}: predictors for hidden {p_hid} / intermediate {p.B.shape[0]}, "
                             f"the model has {hid} / {inter}")
        if heads and p.Wh is None:
            raise ValueError(f"{source}: heads='dejavu' needs head predictors; this file has none")
        if p.B.shape[0] != inter * (2 if p.glu else 1):
            raise ValueError(f"{source}: {'glu' if p.glu else 'linear'} predictor B has {p.B.shape[0]} rows, expected "
                             f"{inter * (2 if p.glu else 1)}")


def _quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, H] -> (int8 codes [O, H] in [-2^(b-1), 2^(b-1) - 1], float16 scales [O, H / group]):
    symmetric round-to-nearest, scale = the group's largest |w| / (2^(b-1) - 1)."""
    o, h = w.shape
    if h % group:
        raise ValueError(f"int4 predictors: hidden size {h} is not a multiple of the group {group}")
    wg = w.float().reshape(o, h // group, group)
    qmax = 2 ** (bits - 1) - 1
    scale = (wg.abs().amax(-1) / qmax).clamp_min(1e-12).half()
    codes = (wg / scale.float()[..., None]).round().clamp(-qmax - 1, qmax).to(torch.int8).reshape(o, h)
    return codes.contiguous(), scale.contiguous()


def _pack(codes: torch.Tensor, group: int) -> torch.Tensor:
    """int8 codes [O, H] in [-8, 7] -> uint8 [O, H / 2]: in each group of `group` inputs, byte t
    holds input t (low nibble) and input t + group / 2 (high nibble), two's complement (the
    kernel then reads x's two halves of a group as contiguous slices)."""
    o, h = codes.shape
    if h % group or group % 2:
        raise ValueError(f"int4 predictors: packing needs an even group dividing the hidden size, got {group} for {h}")
    c = (codes.to(torch.int16) & 15).reshape(o, h // group, 2, group // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(o, h // 2).to(torch.uint8)


def _unpack(packed: torch.Tensor, group: int) -> torch.Tensor:
    """`_pack`'s output -> int8 codes [O, H] (nibbles sign-extended)."""
    p = packed.to(torch.int16).reshape(packed.shape[0], -1, 1, group // 2)
    lo, hi = ((p & 15) ^ 8) - 8, (((p >> 4) & 15) ^ 8) - 8
    return torch.cat([lo, hi], dim=2).reshape(packed.shape[0], -1).to(torch.int8)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_quantize`'s output -> float32 [O, H]."""
    o, h = codes.shape
    return (codes.float().view(o, scale.shape[1], -1) * scale.float()[..., None]).reshape(o, h)


def quantized(weights: list, bits: int = 4, group: int = 64, meta: dict | None = None) -> Predictors:
    """Kind "int4" (any `bits` in 2..8): per layer (W_gate [I, H], W_up [I, H]) -> a predictor
    whose B is [W_gate; W_up] rounded to `bits` bits (a `QuantRows`: codes packed two per byte at
    <= 4 bits, float16 scales; what `save` stores and `load` reads back), no A (the predictor
    input is the MLP input itself), no head predictors (`train(kind="int4")` adds them).
    Training-free; on SmolLM2 at 40% MLP sparsity +2.5% perplexity vs dense, KL 0.028, with the
    blocked selection (the true top-K: +1.1%; rank-256 glu: +13.4%; docs/contextual.md,
    benchmarks/results/contextual/dejavu_ceiling_block32.md). Bytes read per token: bits/16 of
    the gate and up weights' bf16 (1/6 of the MLP at 4 bits; a rank-r glu reads
    r (H + 2I) / (3 H I) of it: 35% at rank 256 on SmolLM2, 4.8% on Llama-3-8B)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"quantized: expected bits in 2..8, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or group % 2:
        raise ValueError(f"quantized: expected an even group >= 2 (two codes per byte share a scale), got {group!r}")
    layers = []
    for wg, wu in weights:
        codes, scales = _quantize(torch.cat([wg, wu]).float(), bits, group)
        layers.append(LayerPredictor(None, QuantRows(_pack(codes, group) if bits <= 4 else codes, scales, bits), None))
    return Predictors(layers, dict(meta or {}, kind="int4", bits=bits, group=group, mlp_input="mlp_in", rank=None))


def gate_up_weights(model) -> list:
    """[(W_gate [I, H], W_up [I, H]) per decoder layer], float32 on the CPU (`quantized`'s input)."""
    from .activations import decoder_layers

    return [(lay.mlp.gate_proj.weight.detach().float().cpu(), lay.mlp.up_proj.weight.detach().float().cpu())
            for lay in decoder_layers(model)]


SELECT_BLOCK = 32  # neurons per selection block (blocked_top_mask); None = one global top-k


def blocked_top_mask(scores: torch.Tensor, k: int, block: int | None) -> torch.Tensor:
    """The Deja Vu selection rule: bool [.., I], k kept neurons per row. block None (or >= I):
    the k largest scores. Otherwise the I neurons are cut into blocks of `block` and block j keeps
    its kb_j largest, kb_j = floor(k * end_j / I) - floor(k * start_j / I) (k in total, in
    proportion to the block's size); ties go to the lower position, NaN ranks last. The blocked
    rule needs no global top-k (kernels.predict picks each block's neurons in the program that
    scores it); on SmolLM2 it costs no accuracy (benchmarks/results/contextual/blocked_select_quality.md)."""
    n = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"blocked_top_mask: expected an int k in [1, {n}], got {k!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"blocked_top_mask: expected block None or a positive int, got {block!r}")
    block = n if block is None else min(block, n)
    nb = -(-n // block)
    edges = torch.arange(nb + 1, device=scores.device) * block
    edges[-1] = n
    kb = torch.div(k * edges, n, rounding_mode="floor").diff().repeat_interleave(block)[:n]
    s = _as_blocks(scores.nan_to_num(nan=float("-inf")), block, float("-inf"))
    rank = s.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # rank inside the block
    return rank.reshape(*scores.shape[:-1], nb * block)[..., :n] < kb


def _as_blocks(x: torch.Tensor, block: int, fill: float) -> torch.Tensor:
    """x [.., I] -> [.., ceil(I / block), block], the last block padded with `fill`."""
    n = x.shape[-1]
    nb = -(-n // block)
    return F.pad(x, (0, nb * block - n), value=fill).reshape(*x.shape[:-1], nb, block)


def blocked_top_indices(scores: torch.Tensor, k: int, block: int | None) -> torch.Tensor:
    """[.., I] -> [.., k] int32 ascending positions kept by `blocked_top_mask`."""
    keep = blocked_top_mask(scores, k, block)
    pos = torch.arange(scores.shape[-1], device=scores.device).expand_as(keep)
    return pos[keep].reshape(*scores.shape[:-1], k).to(torch.int32)


def top_labels(mag: torch.Tensor, frac: float) -> torch.Tensor:
    """mag [N, M] -> bool [N, M]: the top ceil(frac * M) entries of each row."""
    k = max(1, round(frac * mag.shape[1]))
    return torch.zeros_like(mag, dtype=torch.bool).scatter_(1, mag.topk(k, dim=1).indices, True)


def _fit(x: torch.Tensor, y: torch.Tensor, rank: int | None, steps: int, lr: float, batch: int, gen) -> tuple:
    """A (low-rank) linear classifier x [N, H] -> y [N, M] bool: initialised by ridge least squares
    on the centred labels (truncated to `rank` by an SVD of the solution), then `steps` Adam steps
    of weighted BCE (positives weighted by the negative/positive ratio)."""
    n, h = x.shape
    m = y.shape[1]
    yf = y.float()
    pos = yf.mean().clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - pos) / pos).expand(m)
    mu, sd = x.mean(0), x.std(0) + 1e-6  # train on standardised inputs, fold back afterwards
    xs = (x - mu) / sd
    gram = xs.T @ xs + 1e-2 * n * torch.eye(h)
    w_ls = torch.linalg.solve(gram, xs.T @ (yf - yf.mean(0)))  # [H, M]
    w_ls = w_ls * (4.0 / (xs @ w_ls).std().clamp_min(1e-6))  # logits of a useful scale for BCE
    bias = torch.logit(yf.mean(0).clamp(1e-3, 1 - 1e-3)).requires_grad_()
    if rank is None:
        W = w_ls.T.contiguous().requires_grad_()  # [M, H]
        params = [W]
    else:
        U, S, Vh = torch.linalg.svd(w_ls, full_matrices=False)  # w_ls = U S Vh, U [H, k]
        r = min(rank, S.numel())
        A = U[:, :r].T.contiguous().requires_grad_()  # [r, H]
        B = (Vh[:r].T * S[:r]).contiguous().requires_grad_()  # [M, r]
        params = [A, B]
    opt = torch.optim.Adam(params + [bias], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),), generator=gen)
        xb = xs[idx]
        logits = (xb @ W.T if rank is None else (xb @ A.T) @ B.T) + bias
        loss = F.binary_cross_entropy_with_logits(logits, yf[idx], pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        # scores(x) = f((x - mu) / sd): fold the standardisation into the first layer and the bias
        first = (W if rank is None else A).detach() / sd
        shift = -(first @ mu)  # [r] or [M]
        if rank is None:
            return first, bias.detach() + shift
        return first, B.detach(), bias.detach() + B.detach() @ shift


def fit_glu(x: torch.Tensor, y: torch.Tensor, rank: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank ridge regression y [N, M] ~ x [N, H] A.T B.T, A [r, H], B [M, r] (float64
    inside): the ridge solution W [H, M], then the rank-r subspace of its fitted values
    (right singular vectors of L.T W with L L.T = x.T x / N + ridge * mean diag * I):
    B = V_r, A = (W V_r).T. With y = x W0.T exactly this is the rank-r approximation of W0
    that is best on these x."""
    xd, yd = x.double(), y.double()
    n, h = xd.shape
    gram = xd.T @ xd / n
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(h, dtype=torch.float64)
    w = torch.linalg.solve(gram, xd.T @ yd / n)  # [H, M]
    chol = torch.linalg.cholesky(gram)
    _, _, vh = torch.linalg.svd(chol.T @ w, full_matrices=False)  # fitted values' right singular vectors
    v = vh[:min(rank, vh.shape[0])].T  # [M, r]
    return (w @ v).T.float().contiguous(), v.float().contiguous()


def _block_thresholds(mag: torch.Tensor, keep: float, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """mag [N, M] >= 0 -> (labels bool [N, M]: the neurons `blocked_top_mask` keeps at this kept share,
    t [N, M]: per neuron, its block's threshold, the geometric mean of the smallest kept and the
    largest dropped magnitude of that block)."""
    m = mag.shape[1]
    lab = blocked_top_mask(mag, max(1, round(keep * m)), block)
    blk = m if block is None else min(block, m)
    hi = _as_blocks(mag.masked_fill(~lab, float("inf")), blk, float("inf")).amin(-1)
    lo = _as_blocks(mag.masked_fill(lab, 0.0), blk, 0.0).amax(-1)
    hi = torch.where(torch.isinf(hi), 2 * lo + 1e-6, hi)  # a block that keeps nothing
    lo = torch.where(lo <= 0, hi / 2, lo)  # a block that keeps everything
    t = (hi * lo).sqrt().clamp_min(1e-8).repeat_interleave(blk, dim=1)[:, :m]
    return lab, t


def finetune_glu(x: torch.Tensor, mag: torch.Tensor, A: torch.Tensor, B: torch.Tensor, steps: int = 200,
                 keeps: tuple[float, ...] = (0.6, 0.5), lr: float = 3e-4, batch: int = 1024, temperature: float = 0.5,
                 block: int | None = SELECT_BLOCK, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient fine-tuning of a glu predictor (A [r, H], B [2I, r], e.g. `fit_glu`'s) for the
    selection it makes: x [N, H] the predictor input, mag [N, I] the true |SiLU(gate) * up|.
    Per kept share in `keeps`, each neuron is labelled by the selection rule (`blocked_top_mask`
    with `block`) and gets the logit (s / t - 1) / temperature, s = |SiLU(g~) u~| its score, t its
    block's threshold between the smallest kept and the largest dropped |h|; the loss is the binary
    cross-entropy weighted by |h^2 - t^2| / mean(h^2) of the token (a swap across the threshold
    costs that much of the kept activation energy). `steps` Adam steps on random batches of
    `batch` tokens, cosine-decayed `lr`. The score's form (no bias) is unchanged."""
    x, mag = x.float(), mag.float()
    with torch.no_grad():
        targets = [_block_thresholds(mag, k, block) for k in keeps]
        norm = (mag ** 2).mean(1, keepdim=True).clamp_min(1e-12)
    A = A.detach().clone().float().requires_grad_()
    B = B.detach().clone().float().requires_grad_()
    opt = torch.optim.Adam([A, B], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),), generator=gen)
        g, u = F.linear(F.linear(x[idx], A), B).chunk(2, dim=-1)
        s = (F.silu(g) * u).abs()
        e = mag[idx] ** 2
        loss = 0.0
        for lab, t in targets:
            tb = t[idx]
            w = (e - tb ** 2).abs() / norm[idx]
            bce = F.binary_cross_entropy_with_logits((s / tb - 1) / temperature, lab[idx].float(), reduction="none")
            loss = loss + (w * bce).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return A.detach().contiguous(), B.detach().contiguous()


def recall(scores: torch.Tensor, mag: torch.Tensor, keep: float) -> tuple[float, float, float]:
    """Predicted top-K vs the true top-K of `mag` (K = keep * M), rows = tokens ->
    (share of the true top-K found, share of sum(mag^2) kept by the prediction, the same for the oracle)."""
    k = max(1, round(keep * mag.shape[1]))
    pred = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    true = top_labels(mag, keep)
    e = mag.float() ** 2
    tot = e.sum(1)
    return (float((pred & true).sum(1).float().mean() / k), float(((e * pred).sum(1) / tot).mean()),
            float(((e * true).sum(1) / tot).mean()))


def train(acts: Activations, n_heads: int, rank: int = 128, label_frac: float = 0.5, steps: int = 60,
          lr: float = 3e-3, batch: int = 256, source: str = "mlp_in", val_frac: float = 0.25, heads: bool = True,
          report_keep: tuple[float, ...] = (0.75, 0.6, 0.5), progress: bool = True, meta: dict | None = None,
          kind: str = "linear", weights: list | None = None, finetune_steps: int = 200,
          finetune_keeps: tuple[float, ...] = (0.6, 0.5), bits: int = 4) -> Predictors:
    """Train one MLP (and head) predictor per layer on `acts` (sites attn_in, down_in, o_in;
    mlp_in for kind "glu"); the last `val_frac` of the tokens are held out for the recall report
    in `.meta["recall"]`: per layer and kept share, recall of the true top-K and share of |h|^2
    kept (and the oracle's). kind "glu" needs `weights`: per layer (W_gate [I, H], W_up [I, H]); its
    closed-form fit (`fit_glu`) is then fine-tuned for the selection at the kept shares
    `finetune_keeps` for `finetune_steps` Adam steps (`finetune_glu`; 0 = the closed form only).
    kind "int4" needs `weights` too: the MLP predictor is `quantized` (`bits` bits, nothing fitted;
    source must be "mlp_in"); the activations give its recall report and the head predictors."""
    if source not in ("mlp_in", "attn_in"):
        raise ValueError(f"train: expected source 'mlp_in' or 'attn_in', got {source!r}")
    if kind not in ("glu", "linear", "int4"):
        raise ValueError(f"train: expected kind 'glu', 'linear' or 'int4', got {kind!r}")
    if kind == "int4" and source != "mlp_in":
        raise ValueError("train: kind 'int4' scores the MLP input with the MLP's own weights: source must be 'mlp_in'")
    if kind in ("glu", "int4") and (weights is None or len(weights) != len(acts.sites[source])):
        raise ValueError(f"train: kind {kind!r} needs weights=[(W_gate, W_up)] for each of the "
                         f"{len(acts.sites[source])} layers, got {None if weights is None else len(weights)}")
    need = [source, "down_in"] + (["mlp_in"] if kind == "glu" else []) + (["attn_in", "o_in"] if heads else [])
    missing = [s for s in need if s not in acts.sites]
    if missing:
        raise ValueError(f"train: activations lack site(s) {missing}")
    if not 0 < label_frac < 1:
        raise ValueError(f"train: expected label_frac in (0, 1), got {label_frac}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    n = acts.n_tokens
    n_val = max(1, int(n * val_frac))
    tr, va = slice(0, n - n_val), slice(n - n_val, n)
    layers, report = [], []
    bar = tqdm(range(len(acts.sites[source])), desc="training predictors", disable=not progress)
    for i in bar:
        x = acts.layer(source, i).float()
        mag = acts.layer("down_in", i).float().abs()
        if kind == "glu":  # targets: the gate and up pre-activations of the MLP input
            wg, wu = weights[i]
            m = acts.layer("mlp_in", i)[tr].double()
            A, B = fit_glu(x[tr], torch.cat([m @ wg.double().T, m @ wu.double().T], dim=1), rank)
            if finetune_steps > 0:
                A, B = finetune_glu(x[tr], mag[tr], A, B, finetune_steps, tuple(finetune_keeps),
                                    gen=torch.Generator().manual_seed(i))
            p = LayerPredictor(A, B, None)
        elif kind == "int4":
            p = quantized([weights[i]], bits).layers[0]
        else:
            A, B, b = _fit(x[tr], top_labels(mag[tr], label_frac), rank, steps, lr, batch, gen)
            p = LayerPredictor(A, B, b)
        row = {"layer": i, "mlp": {}, "heads": {}}
        with torch.no_grad():
            s = p.mlp_scores(x[va])
            for keep in report_keep:
                r, kept, oracle = recall(s, mag[va], keep)
                row["mlp"][str(keep)] = {"recall": round(r, 4), "kept": round(kept, 4), "oracle_kept": round(oracle, 4)}
        if heads:
            o = acts.layer("o_in", i).float()
            hn = o.reshape(o.shape[0], n_heads, -1).norm(dim=-1)
            a = acts.layer("attn_in", i).float()
            p.Wh, p.bh = _fit(a[tr], top_labels(hn[tr], label_frac), None, steps, lr, batch, gen)
            with torch.no_grad():
                s = p.head_scores(a[va])
                for keep in report_keep:
                    r, kept, oracle = recall(s, hn[va], keep)
                    row["heads"][str(keep)] = {"recall": round(r, 4), "kept": round(kept, 4),
                                               "oracle_kept": round(oracle, 4)}
        layers.append(p)
        report.append(row)
        bar.set_postfix(recall=row["mlp"][str(report_keep[-1])]["recall"])
    meta = dict(meta or {}, kind=kind, rank=None if kind == "int4" else rank, label_frac=label_frac, steps=steps,
                n_tokens=n, val_tokens=n_val,
                mlp_input=source, head_input="attn_in", recall=report,
                finetune_steps=finetune_steps if kind == "glu" else 0,
                finetune_keeps=list(finetune_keeps) if kind == "glu" and finetune_steps > 0 else [],
                seconds=round(time.perf_counter() - t0, 1))
    if kind == "int4":
        meta.update(bits=bits, group=layers[0].B.group)
    return Predictors(layers, meta)


def train_for_model(model, tok, text: str | None = None, n_tokens: int = 4096, window: int = 1024,
                    model_id: str = "", progress: bool = True, **kw) -> Predictors:
    """Collect activations on `text` (default: `sparseinfer.data.haystack_text`) and train."""
    from ..data import haystack_text
    from .activations import collect

    t0 = time.perf_counter()
    heads = kw.get("heads", True)
    source = kw.get("source", "mlp_in")
    kw.setdefault("kind", "glu")
    glu = kw["kind"] == "glu"
    sites = tuple(dict.fromkeys((source, "down_in") + (("mlp_in",) if glu else ()) + (("attn_in", "o_in") if heads else ())))
    acts = collect(model, tok, text if text is not None else haystack_text(), n_tokens, window, progress, sites)
    if kw["kind"] in ("glu", "int4"):
        kw["weights"] = gate_up_weights(model)
    pred = train(acts, model.config.num_attention_heads, progress=progress,
                 meta={"model": model_id or getattr(model.config, "_name_or_path", ""), "window": window}, **kw)
    pred.meta["seconds_total"] = round(time.perf_counter() - t0, 1)
    return pred
