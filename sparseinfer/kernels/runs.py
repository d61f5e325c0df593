"""Vertical-slash index construction in two launches (``_runs_kernel.py``; ``index.from_vertical_slash``'s
``fused_runs``).

    slash_runs(slash_idx [B, H, Ns], n, band_min, merge_gap, max_tiled)
        -> (s, glo, ghi, exact) int64 [B, H, Ns + 1], (tlo, thi) int64 [B, H, T], w int64 [B, H]
    relative_tiles(tlo, thi, Ns + 1, n, block_m, block_n, narrow_n=0)
        -> tiles [B, H, 1, TU], tile_count [B, H, nqb], edges [B, H, TE, 4], edge_count [B, H, nqb]
           (+ edges_narrow [B, H, TE, 4], edge_count_narrow [B, H, nqb] with narrow_n)
           (``index._relative_tiles`` of the capped runs, no sort)

``slash_runs`` computes what ``index.from_vertical_slash`` otherwise builds from ~120 small torch
launches (two sorts and a dozen prefix-sum compactions in ``index._slash_runs`` / ``_group_runs`` and
the max_tiled cap), here one torch.sort and one launch: s the sorted unique offsets with 0 added
(padding n); w the end of each head's first run (its local band 0..w, at most n - 1); glo / ghi / exact
the runs after it (all runs when band_min is 0 or w + 1 < band_min) grouped where gaps are <= merge_gap,
exact = 1 for a group of one run (and for padding), padding n; tlo / thi the first T =
min(max_tiled, Ns + 1) exact groups (padding n), whose exact flag stays 1, the later exact groups'
cleared. One program per head, static shapes, no host sync.
``relative_tiles`` needs consecutive runs more than block_m offsets apart (merge_gap >= block_m). The
torch ops stay the CPU path and the reference (tests: the same index field by field). CUDA tensors
run the compiled kernels, CPU tensors the interpreter.
"""
from __future__ import annotations

import torch

from ..index import _narrow_int
from ._loader import kernel_module
from .decode import _next_pow2

# heads of up to this many slash offsets (+ 1): one program holds them in registers
MAX_SLASHES = 1 << 15


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def slash_runs(slash_idx: torch.Tensor, n: int, band_min: int, merge_gap: int, max_tiled: int | None,
               num_warps: int | None = None):
    """See the module docstring. band_min 0: no band is split off."""
    if slash_idx.dim() != 3 or slash_idx.dtype not in (torch.int64, torch.int32, torch.int16):
        raise ValueError(f"slash_runs: expected int16 / int32 / int64 slash_idx [B, H, Ns], got {slash_idx.dtype} "
                         f"{tuple(slash_idx.shape)}")
    b, h, ns = slash_idx.shape
    r = ns + 1
    if r > MAX_SLASHES:
        raise ValueError(f"slash_runs: at most {MAX_SLASHES - 1} slash offsets per head, got {ns}")
    block = _next_pow2(r)
    cap = r if max_tiled is None else max(1, min(int(max_tiled), r))
    dev = slash_idx.device
    s, glo, ghi, ex = (torch.empty(b, h, r, dtype=torch.int64, device=dev) for _ in range(4))
    lo, hi = (torch.empty(b * h, block, dtype=torch.int32, device=dev) for _ in range(2))
    tlo, thi = (torch.empty(b, h, cap, dtype=torch.int64, device=dev) for _ in range(2))
    w = torch.empty(b, h, dtype=torch.int64, device=dev)
    srt, _ = torch.sort(_narrow_int(slash_idx, n), dim=-1)
    kernel_module("_runs_kernel.py", dev.type != "cuda").slash_runs_kernel[(b * h,)](
        srt, s, lo, hi, glo, ghi, ex, tlo, thi, w,
        srt.stride(0), srt.stride(1), srt.stride(2), ns, n, h, int(band_min), int(merge_gap), cap,
        BLOCK=block, num_warps=num_warps or _warps(block))
    return s, glo, ghi, ex, tlo, thi, w


def relative_tiles(t_lo: torch.Tensor, t_hi: torch.Tensor, n_slash: int, n: int, block_m: int, block_n: int,
                   narrow_n: int = 0):
    """``index._relative_tiles`` of exact runs t_lo / t_hi int64 [B, H, T] (sorted, padding n;
    consecutive runs more than block_m offsets apart, as groups merged with merge_gap >= block_m are)
    in one launch, no sort -> tiles int32 [B, H, 1, TU], tile_count [B, H, nqb], edges [B, H, TE, 4]
    (padding (-FAR, 0, 0, 0)), edge_count [B, H, nqb]; with narrow_n (0 < narrow_n < block_n) also
    edges_narrow [B, H, TE, 4], edge_count_narrow [B, H, nqb], the edges at most narrow_n keys wide
    taken out of edges (``index.split_narrow_edges``' lists, without its sorts)."""
    from ..index import _FAR

    if narrow_n and not 0 < narrow_n < block_n:
        raise ValueError(f"narrow_n must be in (0, block_n = {block_n}), got {narrow_n}")
    b, h, cap = t_lo.shape
    nqb = -(-n // block_m)
    tu = max(n_slash // block_n + 1, 1)
    per_run = (2 * block_m + 3 * block_n) // block_n + 1  # edges of one run, at most
    te = max(cap * per_run, 1)
    dev = t_lo.device
    tiles = torch.empty(b, h, 1, tu, dtype=torch.int32, device=dev)
    edges = torch.empty(b, h, te, 4, dtype=torch.int32, device=dev)
    tc, ec = (torch.empty(b, h, nqb, dtype=torch.int32, device=dev) for _ in range(2))
    en, nc = ((torch.empty(b, h, te, 4, dtype=torch.int32, device=dev), torch.empty_like(tc)) if narrow_n
              else (edges, ec))
    qb = 64
    kernel_module("_runs_kernel.py", dev.type != "cuda").relative_tiles_kernel[(b * h, -(-nqb // qb))](
        t_lo.contiguous(), t_hi.contiguous(), tiles, tc, edges, ec, en, nc, n, nqb, cap, tu, te, _FAR,
        BM=block_m, BN=block_n, NW=int(narrow_n), RB=min(64, _next_pow2(cap)), RC=min(16, _next_pow2(cap)), KT=8,
        KE=_next_pow2(per_run), KB=256, QB=qb, num_warps=4)
    return (tiles, tc, edges, ec) + ((en, nc) if narrow_n else ())
