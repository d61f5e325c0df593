"""Input checks shared by every public op: each failure names what was expected and what came."""
from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "reference", "triton")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decode: bool = False) -> tuple[int, int, int, int, int]:
    """Validate q [B, Hq, N, D] and k/v [B, Hkv, N, D]; return (B, Hq, Hkv, N, D).
    decode=True: q is one step [B, Hq, 1, D] against k/v [B, Hkv, N, D] of any N."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name}: expected a floating dtype in {[str(d) for d in _FLOATS]}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    b, hq, n, d = q.shape
    if decode and n != 1:
        raise ValueError(f"q: expected one decode step [B, Hq, 1, D], got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, nk, dk = k.shape
    if decode:
        n = nk
    if bk != b or nk != n or dk != d:
        raise ValueError(
            f"k/v: expected shape [B={b}, Hkv, N={n}, D={d}] matching q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"heads: expected Hq a multiple of Hkv (GQA), got Hq={hq}, Hkv={hkv}")
    if n == 0:
        raise ValueError("q: expected at least one token (N >= 1), got N=0")
    return b, hq, hkv, n, d


def check_index(name: str, idx: torch.Tensor, shape: tuple, upper: int, device: torch.device) -> None:
    """idx must be an integer tensor of `shape` (None = any size) on `device`, values in
    [-1, upper) where -1 is padding."""
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name}: expected an integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64, torch.int16):
        raise ValueError(f"{name}: expected an integer dtype (int32/int64), got {idx.dtype}")
    if idx.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, idx.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {idx.device}")
    if idx.numel() and idx.device.type == "cpu":  # a device check would sync the host: CPU only
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= upper:
            raise ValueError(f"{name}: expected values in [0, {upper}) or -1 for padding, got range [{lo}, {hi}]")


def check_sorted_rows(name: str, idx: torch.Tensor) -> None:
    """CPU tensors: each row of idx [..., K] ascending without repeats, -1 padding after its entries
    (a device check would sync the host: CPU only, as `check_index`'s values)."""
    if idx.device.type != "cpu" or idx.shape[-1] < 2:
        return
    a, b = idx[..., :-1], idx[..., 1:]
    bad = (b >= 0) & ((a < 0) | (b <= a))
    if bad.any():
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: sorted_blocks=True expects each row ascending without repeats and its -1 padding "
                         f"last; row {at[:-1]} has {int(a[at])}, {int(b[at])} at positions {at[-1]}, {at[-1] + 1}")


def check_heads(heads, hq: int, device: torch.device) -> None:
    """heads: None or a bool tensor [Hq] on q's device (the heads an op computes)."""
    if heads is None:
        return
    if not isinstance(heads, torch.Tensor) or heads.dtype != torch.bool or tuple(heads.shape) != (hq,):
        got = f"{heads.dtype} {tuple(heads.shape)}" if isinstance(heads, torch.Tensor) else type(heads).__name__
        raise ValueError(f"heads: expected None or a bool tensor [Hq={hq}], got {got}")
    if heads.device != device:
        raise ValueError(f"heads: expected device {device} (that of q), got {heads.device}")


def check_budget(name: str, value, n: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
