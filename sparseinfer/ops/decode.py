"""Sparse decode attention: one query step against selected KV pages or slots.

q [B, Hq, 1, D]; k, v [B, Hkv, N, D] (a KV buffer: a growing cache or fixed-capacity slots);
indices [B, Hkv, K] integer page ids into the buffer (page p = tokens p*page_size ..
p*page_size + page_size - 1, cut at N), -1 = padding; page_size=1 selects single slots.
The query heads of one GQA group (h // (Hq // Hkv)) share their KV head's selection.
valid [B, Hkv, N] bool (optional) masks slots inside selected pages (free or padded slots).

Query h attends exactly the set {t : t in a selected page of its KV head, t < N, valid[t]};
a page listed twice counts once (the reference gathers, so repeated ids are removed first).
A row with no visible key returns zeros (and lse = -inf).
Softmax in float32 (float64 for float64 inputs); output in q's dtype.

``return_lse=True`` also returns the log-sum-exp of the scaled scores [B, Hq] (float32),
so partial results over disjoint KV sets merge exactly with `merge_partials`
(flash-decoding's split-KV reduction).
"""
from __future__ import annotations

import torch

from ._validate import check_backend, check_index, check_qkv

__all__ = ["sparse_decode_attention", "dense_decode_attention", "merge_partials", "page_bounds", "quest_scores"]


def _check_decode(q, k, v, indices, page_size, valid):
    b, hq, hkv, n, d = check_qkv(q, k, v, decode=True)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
    check_index("indices", indices, (b, hkv, None), -(-n // page_size), q.device)
    _check_valid(valid, (b, hkv, n), "[B={}, Hkv={}, N={}]", q.device)
    return b, hq, hkv, n, d


def _check_valid(valid, shape: tuple, names: str, device) -> None:
    """valid: None or a bool tensor of `shape` (described by `names`, formatted with it) on `device`."""
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise ValueError(f"valid: expected a bool torch.Tensor, got "
                         f"{valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__}")
    if tuple(valid.shape) != shape:
        raise ValueError(f"valid: expected shape {names.format(*shape)}, got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"valid: expected device {device} (that of q), got {valid.device}")


def _dedup(indices: torch.Tensor) -> torch.Tensor:
    """Replace repeated page ids in each row by -1 (static shape, no host sync)."""
    s, order = indices.sort(-1)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    s = torch.where(dup, torch.full_like(s, -1), s)
    return torch.empty_like(s).scatter_(-1, order, s)


def _triton_reason(q, backend: str) -> str | None:
    """None if the Triton kernel runs this call, else why not ("auto": CUDA tensors only)."""
    if backend == "reference":
        return "backend='reference'"
    if backend == "auto" and not q.is_cuda:
        return "CPU tensors"
    try:
        from ..kernels import decode as kd
    except ImportError as e:
        return f"no triton ({e})"
    return kd.supported(q)


def sparse_decode_attention(q, k, v, indices, *, page_size: int = 1, valid=None, scale: float | None = None,
                            return_lse: bool = False, backend: str = "auto", unique: bool = False):
    """One decode step over selected pages. See the module docstring for the exact semantics.

    q [B, Hq, 1, D]; k/v [B, Hkv, N, D]; indices [B, Hkv, K] (-1 = padding) -> [B, Hq, 1, D]
    (and lse [B, Hq] float32 with return_lse). backend: "auto" runs the Triton kernel
    (`sparseinfer.kernels.decode`: GQA groups share each K/V load, split over the pages,
    flash-decoding merge) for CUDA tensors in float16 / bfloat16 / float32 with head_dim in
    16..256 (a power of 2), else the torch reference (gathers the selected tokens; O(K * page_size)
    work per head, never O(N)); "triton" forces the kernel (the interpreter on a CPU), "reference"
    the torch code. unique=True promises no page id repeats in a row (e.g. top-k output) and
    skips removing repeats (a sort) before the kernel.
    """
    check_backend(backend)
    _check_decode(q, k, v, indices, page_size, valid)
    return _decode(q, k, v, indices, page_size, valid, scale, return_lse, backend, unique)


def dense_decode_attention(q, k, v, *, valid=None, scale: float | None = None, backend: str = "auto"):
    """One decode step over every slot: q [B, Hq, 1, D]; k/v [B, Hkv, N, D]; valid [B, N] bool
    (the slots every head sees, e.g. a static cache's filled ones) or None -> [B, Hq, 1, D].
    A row with no valid slot returns zeros. backend "auto": CUDA tensors the kernel takes run
    `sparseinfer::dense_decode` (`kernels.decode.dense_decode`: no index row, the GQA group's
    query heads share each K/V tile, split over N, the splits merged by a second launch), else the
    torch reference; "triton" forces the kernel (the interpreter on a CPU)."""
    check_backend(backend)
    b, _, _, n, d = check_qkv(q, k, v, decode=True)
    _check_valid(valid, (b, n), "[B={}, N={}]", q.device)
    s = d ** -0.5 if scale is None else float(scale)
    why = _triton_reason(q, backend)
    if why is None:
        from ..kernels import decode as kd

        return kd.dense_decode_op(q, k, v, valid, s)
    if backend == "triton":
        raise ValueError(f"backend='triton': expected a call the decode kernel takes, got {why}")
    hkv, ps = k.shape[1], 64
    pages = torch.arange(-(-n // ps), device=q.device).expand(b, hkv, -1)
    vm = None if valid is None else valid[:, None, :].expand(b, hkv, n)
    return _decode(q, k, v, pages, ps, vm, s, backend="reference", unique=True)


def _decode(q, k, v, indices, page_size, valid, scale, return_lse=False, backend="auto", unique=False):
    """sparse_decode_attention without the argument checks (for callers that build their own
    indices, e.g. the KV policies: no host sync, not even on a CPU)."""
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    why = _triton_reason(q, backend)
    if why is None:
        from ..kernels import decode as kd

        s = d ** -0.5 if scale is None else float(scale)
        out, lse = kd.sparse_decode(q, k, v, indices if unique else _dedup(indices), page_size, valid, s)
        return (out, lse) if return_lse else out
    if backend == "triton":
        raise ValueError(f"backend='triton': expected a call the decode kernel takes, got {why}")
    s = d ** -0.5 if scale is None else float(scale)
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    idx = _dedup(indices.long())
    kk = idx.shape[-1]
    offs = torch.arange(page_size, device=q.device)
    tok = (idx.clamp(min=0)[..., None] * page_size + offs).reshape(b, hkv, kk * page_size)  # [B, Hkv, T]
    ok = ((idx >= 0)[..., None] & (tok.view(b, hkv, kk, page_size) < n)).reshape(b, hkv, -1)
    tok = tok.clamp(max=max(n - 1, 0))
    if valid is not None:
        ok = ok & valid.gather(2, tok)
    ks = k.gather(2, tok[..., None].expand(-1, -1, -1, d)).to(acc)  # [B, Hkv, T, D]
    vs = v.gather(2, tok[..., None].expand(-1, -1, -1, d)).to(acc)
    qg = q.reshape(b, hkv, g, d).to(acc)
    sc = torch.einsum("bhgd,bhtd->bhgt", qg, ks) * s
    sc = sc.masked_fill(~ok[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(sc, -1)  # [B, Hkv, G]; -inf for empty rows
    p = torch.exp(sc - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    p = torch.where(ok[:, :, None, :], p, torch.zeros_like(p))
    out = torch.einsum("bhgt,bhtd->bhgd", p, vs).reshape(b, hq, 1, d).to(q.dtype)
    if return_lse:
        return out, lse.reshape(b, hq).float()
    return out


def _decode_multi(q, parts, scale, backend="auto"):
    """Attention over the union of disjoint KV sets, parts = [(k, v, indices, page_size, valid)]
    with unique page ids per row -> [B, Hq, 1, D]. The kernel path merges every part's splits in
    one merge kernel; the reference merges per-part results with `merge_partials`."""
    if _triton_reason(q, backend) is None:
        from ..kernels import decode as kd

        s = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return kd.sparse_decode_multi(q, parts, s)[0]
    outs, lses = [], []
    for k, v, idx, ps, valid in parts:
        o, l_ = _decode(q, k, v, idx, ps, valid, scale, return_lse=True, backend=backend, unique=True)
        outs.append(o)
        lses.append(l_)
    return merge_partials(outs, lses)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine attention results over disjoint KV sets: outs [B, Hq, 1, D], lses [B, Hq]
    (as returned with return_lse=True) -> [B, Hq, 1, D] equal to attention over the union."""
    lse = torch.stack(lses)  # [P, B, Hq]
    m = lse.max(0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # 0 for empty parts
    den = w.sum(0).clamp(min=torch.finfo(w.dtype).tiny)
    out = sum(o.float() * (wi / den)[..., None, None] for o, wi in zip(outs, w))
    return out.to(outs[0].dtype)


def page_bounds(k: torch.Tensor, page_size: int, valid: torch.Tensor | None = None):
    """Per-page element-wise min and max of keys: k [B, H, N, D] -> (kmin, kmax) [B, H, P, D]
    with P = ceil(N / page_size); invalid slots are ignored (an empty page has +inf / -inf)."""
    b, h, n, d = k.shape
    p = -(-n // page_size)
    pad = p * page_size - n
    kf = k.float()
    ok = torch.ones(b, h, n, dtype=torch.bool, device=k.device) if valid is None else valid
    ok = torch.nn.functional.pad(ok, (0, pad), value=False)[..., None]
    kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
    kmin = torch.where(ok, kf, torch.full_like(kf, float("inf"))).view(b, h, p, page_size, d).amin(3)
    kmax = torch.where(ok, kf, torch.full_like(kf, float("-inf"))).view(b, h, p, page_size, d).amax(3)
    return kmin, kmax


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Quest's upper bound on q.k per page, summed over each KV group's query heads:
    q [B, Hq, 1, D], kmin/kmax [B, Hkv, P, D] -> [B, Hkv, P] (float32);
    sum_d max(q_d * kmax_d, q_d * kmin_d), non-finite bounds counting as 0. Empty pages
    (kmin > kmax) score -inf. backend as for sparse_decode_attention (the kernel reads kmin/kmax
    in any float dtype: bfloat16 bounds halve the bytes read)."""
    if _triton_reason(q, backend) is None:
        from ..kernels import decode as kd

        return kd.quest_scores(q, kmin, kmax)
    if backend == "triton":
        raise ValueError(f"backend='triton': expected a call the decode kernel takes, got {_triton_reason(q, backend)}")
    b, hq, _, d = q.shape
    hkv = kmin.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, 1, d).float()
    lo, hi = kmin[:, :, None].float(), kmax[:, :, None].float()
    empty = (kmin[..., 0] > kmax[..., 0])  # [B, Hkv, P]
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    bound = torch.maximum(qg * hi, qg * lo).sum(-1).sum(2)  # [B, Hkv, P]
    return bound.masked_fill(empty, float("-inf"))
