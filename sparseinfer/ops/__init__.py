"""Public sparse attention ops with exact semantics.

Shapes: q [B, Hq, N, D]; k, v [B, Hkv, N, D] with Hq a multiple of Hkv (GQA: query head h
reads KV head h // (Hq // Hkv)). Every op is causal, and a query always attends to itself,
so no row is empty. Output: q's shape and dtype.

``backend``: "auto" picks the fastest implementation for the tensors' device (the Triton
kernel on CUDA, the torch reference elsewhere), "reference" forces the torch reference,
"triton" forces the Triton kernel (on a CPU it runs under the Triton interpreter).
Index tensors use -1 as padding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference as ref
from ._validate import check_backend, check_budget, check_heads, check_index, check_qkv, check_sorted_rows
from .decode import dense_decode_attention, sparse_decode_attention
from .mm import mm_attention

__all__ = ["dense_attention", "vertical_slash_attention", "block_sparse_attention", "ashape_attention",
           "sparse_decode_attention", "dense_decode_attention", "mm_attention"]


def _scale(scale, d):
    return d ** -0.5 if scale is None else float(scale)


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    check_backend(backend)
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _kernels_available()


def _kernels_available() -> bool:
    try:
        from .. import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    from .. import kernels

    return kernels


def dense_attention(q, k, v, *, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention over all keys. q [B, Hq, N, D], k/v [B, Hkv, N, D] -> [B, Hq, N, D].

    "auto" uses torch's scaled_dot_product_attention (cuDNN / flash on CUDA) with native GQA.
    """
    b, hq, hkv, n, d = check_qkv(q, k, v)
    check_backend(backend)
    s = _scale(scale, d)
    if backend == "reference":
        return ref.masked_attention(q, k, v, ref.dense_rows(n, q.device), s)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s, enable_gqa=hq != hkv)


def _check_out(out, q: torch.Tensor) -> None:
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out: expected a tensor like q ({tuple(q.shape)} {q.dtype} on {q.device}, last dim "
                         f"contiguous), got {got}")


def vertical_slash_attention(
    q, k, v, vertical_idx, slash_idx, *, scale: float | None = None, backend: str = "auto", heads=None, out=None
) -> torch.Tensor:
    """Vertical-slash attention (MInference).

    vertical_idx [B, Hq, Nv]: key positions every query sees (if causal);
    slash_idx [B, Hq, Ns]: diagonal offsets (0 = main diagonal) every query sees.
    Query i attends key j iff j <= i and (j in vertical_idx or i - j in slash_idx), and j == i.
    heads (every op): None, or bool [Hq]: only these heads are computed, the others' outputs are
    zeros (the kernel does no work for them).
    out (every op): None, or a tensor like q to write the result into (returned); with heads,
    the other heads' rows of out keep their values (how a pattern's per-head selections share
    one output).
    """
    b, hq, hkv, n, d = check_qkv(q, k, v)
    check_index("vertical_idx", vertical_idx, (b, hq, None), n, q.device)
    check_index("slash_idx", slash_idx, (b, hq, None), n, q.device)
    check_heads(heads, hq, q.device)
    _check_out(out, q)
    s = _scale(scale, d)
    if _use_triton(q, backend):
        return _kernels().vertical_slash_attention(q, k, v, vertical_idx, slash_idx, s, heads=heads, out=out)
    return ref.write_heads(ref.masked_attention(q, k, v, ref.vertical_slash_rows(n, vertical_idx, slash_idx), s),
                           heads, out)


def block_sparse_attention(
    q, k, v, block_idx, block_size: int = 64, *, scale: float | None = None, backend: str = "auto", heads=None,
    out=None, sorted_blocks: bool = False, dense_from: int | None = None
) -> torch.Tensor:
    """Block-sparse attention.

    block_idx [B, Hq, ceil(N / block_size), K]: the KV blocks each query block sees.
    Query i attends key j iff j <= i and j // block_size in block_idx[.., i // block_size, :],
    and j == i.
    sorted_blocks=True promises every row ascending without repeats, its -1 padding after the
    listed blocks (as the learned gate's selection writes them): the kernel's index build then
    skips its sort. Checked on CPU tensors (like the index values); on a GPU a row breaking the
    promise is not detected.
    dense_from: query blocks >= dense_from attend every causal key whatever their rows list (a
    prompt's last blocks, e.g., without listing all their blocks: the index stays as wide as the
    widest sparse row).
    """
    b, hq, hkv, n, d = check_qkv(q, k, v)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    nb = math.ceil(n / block_size)
    check_index("block_idx", block_idx, (b, hq, nb, None), nb, q.device)
    if sorted_blocks:
        check_sorted_rows("block_idx", block_idx)
    if dense_from is not None and (isinstance(dense_from, bool) or not isinstance(dense_from, int)
                                   or not 0 <= dense_from <= nb):
        raise ValueError(f"dense_from: expected None or a query-block index in [0, {nb}], got {dense_from!r}")
    check_heads(heads, hq, q.device)
    _check_out(out, q)
    s = _scale(scale, d)
    if _use_triton(q, backend):
        return _kernels().block_sparse_attention(q, k, v, block_idx, block_size, s, heads=heads, out=out,
                                                 sorted_blocks=sorted_blocks, dense_from=dense_from)
    return ref.write_heads(ref.masked_attention(q, k, v, ref.block_sparse_rows(n, block_idx, block_size, dense_from),
                                                s), heads, out)


def ashape_attention(
    q, k, v, sink: int, window: int, *, scale: float | None = None, backend: str = "auto", heads=None, out=None
) -> torch.Tensor:
    """A-shape (StreamingLLM-style) attention: query i attends key j iff j <= i and
    (j < sink or i - window < j), and j == i."""
    b, hq, hkv, n, d = check_qkv(q, k, v)
    check_budget("sink", sink)
    check_budget("window", window)
    check_heads(heads, hq, q.device)
    _check_out(out, q)
    s = _scale(scale, d)
    if _use_triton(q, backend):
        return _kernels().ashape_attention(q, k, v, sink, window, s, heads=heads, out=out)
    return ref.write_heads(ref.masked_attention(q, k, v, ref.ashape_rows(n, sink, window, q.device), s), heads, out)
