"""Modality-aware sparse attention (MMInference) in the original token order.

One op, ``mm_attention``, serves every MMInference head type: each query row uses the
vertical-slash index of *its own modality slot* (Q-boundary / 2D-boundary: one index per query
modality; No-/K-boundary heads simply repeat one index in every slot), and a list of
"dense rows" (the grid's horizontal lines) attend to every causal key.

Semantics, for batch b, query head h, query i of modality a = modality[b, i]:
    i attends key j  iff  j <= i and (j in vertical_idx[b, h, a] or i - j in slash_idx[b, h, a]
                                      or i in dense_rows[b, h]),  plus j == i.

Lowering onto the kernel (`sparseinfer.index.SparseIndex`): for each modality slot a, the
slot's vertical-slash index is built as usual, every query block that holds no row of modality
a gets zero ranges and zero columns (the kernel skips it), and the launch writes only the rows
of modality a into the shared output (the kernel's modality filter). Blocks that straddle a
modality boundary are computed once per modality they hold. Dense rows run through the
kernel's query-side indirection: the rows are gathered into tiles of 64 (ascending original
positions), attend one causal range [0, N) with causality by their original positions, and
overwrite their rows (a dense row's key set contains every other choice). See
docs/mminference.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference as ref
from ._validate import check_index, check_qkv

__all__ = ["mm_attention", "mm_rows", "mm_density"]

def _check_modality(modality, b: int, n: int, slots: int, device) -> None:
    if not isinstance(modality, torch.Tensor) or modality.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(f"modality: expected an integer tensor [B, N], got {type(modality).__name__} "
                         f"{getattr(modality, 'dtype', '')}")
    if tuple(modality.shape) != (b, n):
        raise ValueError(f"modality: expected shape [B={b}, N={n}], got {tuple(modality.shape)}")
    if modality.device != device:
        raise ValueError(f"modality: expected device {device} (that of q), got {modality.device}")
    if modality.device.type == "cpu" and modality.numel():
        lo, hi = int(modality.min()), int(modality.max())
        if lo < 0 or hi >= slots:
            raise ValueError(f"modality: expected ids in [0, {slots}) (one index slot each), got range [{lo}, {hi}]")


def mm_rows(n: int, modality: torch.Tensor, vertical_idx: torch.Tensor, slash_idx: torch.Tensor,
            dense_rows: torch.Tensor | None) -> ref.RowMask:
    """Row-mask builder of `mm_attention` for `sparseinfer.ops.reference.masked_attention`.
    modality [B, N]; vertical_idx [B, H, A, Nv]; slash_idx [B, H, A, Ns]; dense_rows [B, H, Nd] or None."""
    b, h, slots = vertical_idx.shape[:3]
    dev = vertical_idx.device
    per_slot = [ref.vertical_slash_rows(n, vertical_idx[:, :, a], slash_idx[:, :, a]) for a in range(slots)]
    drow = None
    if dense_rows is not None and dense_rows.shape[-1]:
        drow = torch.zeros(b, h, n + 1, dtype=torch.bool, device=dev)
        drow.scatter_(2, torch.where(dense_rows < 0, n, dense_rows).long(), True)
        drow = drow[..., :n]
    mod = modality.long()

    def rows(i0, i1):
        m = None
        for a, fn in enumerate(per_slot):
            sel = (mod[:, i0:i1] == a)[:, None, :, None]  # [B, 1, c, 1]
            part = fn(i0, i1) & sel
            m = part if m is None else m | part
        if drow is not None:
            m = m | drow[:, :, i0:i1, None]
        return m

    return rows


def _row_counts(n: int, vertical_idx: torch.Tensor, slash_idx: torch.Tensor) -> torch.Tensor:
    """Keys seen by each query row under vertical-slash indices [B, H, Nv] / [B, H, Ns] -> float64
    [B, H, N]: #verticals <= i + #slashes <= i - #(v, s) with v + s = i (a convolution, exact
    through a float64 FFT for N up to ~10^6) + 1 when i is neither (the self cell)."""
    b, h = vertical_idx.shape[:2]
    dev = vertical_idx.device
    vm = torch.zeros(b, h, n + 1, device=dev, dtype=torch.float64)
    vm.scatter_(2, torch.where(vertical_idx < 0, n, vertical_idx).long(), 1.0)
    sm = torch.zeros(b, h, n + 1, device=dev, dtype=torch.float64)
    sm.scatter_(2, torch.where(slash_idx < 0, n, slash_idx).long(), 1.0)
    vm, sm = vm[..., :n], sm[..., :n]
    size = 1 << math.ceil(math.log2(2 * n))
    both = torch.fft.irfft(torch.fft.rfft(vm, size) * torch.fft.rfft(sm, size), size)[..., :n].round()
    self_cell = (1 - vm) * (1 - sm[..., :1])  # i itself when i is no vertical and 0 no slash
    return vm.cumsum(-1) + sm.cumsum(-1) - both + self_cell


def mm_density(n: int, modality: torch.Tensor, vertical_idx: torch.Tensor, slash_idx: torch.Tensor,
               dense_rows: torch.Tensor | None, slots=None) -> torch.Tensor:
    """Exact share of the N (N + 1) / 2 causal pairs `mm_attention` computes -> [B, H] float32.
    slots: the modality slots present in `modality` (None = all; absent ones are skipped)."""
    b, h, nslots = vertical_idx.shape[:3]
    dev = vertical_idx.device
    mod = modality.long()[:, None, :]
    cells = torch.zeros(b, h, n, device=dev, dtype=torch.float64)
    for a in (range(nslots) if slots is None else slots):
        cells = torch.where(mod == a, _row_counts(n, vertical_idx[:, :, a], slash_idx[:, :, a]), cells)
    if dense_rows is not None and dense_rows.shape[-1]:
        drow = torch.zeros(b, h, n + 1, dtype=torch.bool, device=dev)
        drow.scatter_(2, torch.where(dense_rows < 0, n, dense_rows).long(), True)
        full = torch.arange(1, n + 1, device=dev, dtype=torch.float64)
        cells = torch.where(drow[..., :n], full, cells)
    return (cells.sum(-1) / (n * (n + 1) / 2)).float()


def _block_has(modality: torch.Tensor, slots: int, block_m: int) -> torch.Tensor:
    """modality [B, N] -> bool [A, B, nqb]: query block q holds a row of modality a."""
    b, n = modality.shape
    nqb = math.ceil(n / block_m)
    m = F.pad(modality.long(), (0, nqb * block_m - n), value=-1).view(b, nqb, block_m)
    return torch.stack([(m == a).any(-1) for a in range(slots)])


def _dense_rows_launch(rows: torch.Tensor, n: int, block_m: int):
    """Dense rows [B, Hq, Nd] (-1 padding) -> (q_rows int32 [B, Hq, T * block_m]: the rows
    ascending, -1 padding last; a SparseIndex with one causal range [0, n) per tile)."""
    from .. import index as _index

    nd = rows.shape[-1]
    t = max(1, math.ceil(nd / block_m))
    r = torch.where(rows < 0, n, rows.long()).sort(-1).values
    r = F.pad(r, (0, t * block_m - nd), value=n)
    q_rows = torch.where(r >= n, -1, r).to(torch.int32)
    dev = rows.device
    ranges = _index.device_tensor([0, n, 0, n, 1], dev, torch.int32).view(1, 1, 1, 1, 5)
    idx = _index.SparseIndex(n=n, block_m=block_m, ranges=ranges,
                             range_count=torch.ones(1, 1, t, dtype=torch.int32, device=dev))
    return q_rows, idx


_ROWS_CONFIG = {"cuda": (64, 64, 4, 3), "cpu": (64, 64, 4, 1)}  # dense-row tiles: block_m, block_n, warps, stages


def _triton(q, k, v, modality, vertical_idx, slash_idx, dense_rows, scale, slots=None):
    """One kernel launch per modality slot, each writing only its own rows into one output
    (query blocks holding no row of the slot get empty lists), then one launch over the dense
    rows (gathered query rows, causality by original positions) writing those rows."""
    from .. import index as _index
    from ..kernels import attention as _ka

    b, hq, n, d = q.shape
    present = slots
    slots = vertical_idx.shape[2]
    orig = q.dtype
    if orig == torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    bm, bn, *rest = _ka._config("vs", d, q.device, None)
    has = _block_has(modality, slots, bm)
    mod = modality.contiguous()
    out = torch.empty_like(q)
    for a in range(slots) if present is None else present:
        idx = _index.from_vertical_slash(vertical_idx[:, :, a], slash_idx[:, :, a], n, bm,
                                         block_n=bn if rest[3] == 4 else None)
        keep = has[a][:, None, :]  # [B, 1, nqb]
        for name in ("range_count", "column_count", "tile_count", "edge_count"):
            if getattr(idx, name) is not None:
                setattr(idx, name, torch.where(keep, getattr(idx, name), 0).to(torch.int32))
        _ka.run_index(q, k, v, idx, scale, bn, *rest, modality=mod, slot=a, out=out)
    if dense_rows is not None and dense_rows.shape[-1]:
        rbm, rbn, warps, stages = _ROWS_CONFIG["cuda" if q.is_cuda else "cpu"]
        q_rows, idx = _dense_rows_launch(dense_rows, n, rbm)
        _ka.run_index(q, k, v, idx, scale, rbn, warps, stages, q_rows=q_rows, out=out)
    return out if out.dtype == orig else out.to(orig)


def mm_attention(q, k, v, modality, vertical_idx, slash_idx, dense_rows=None, *, scale: float | None = None,
                 backend: str = "auto", slots=None) -> torch.Tensor:
    """Modality-aware vertical-slash attention with dense rows (see the module docstring).

    q [B, Hq, N, D], k/v [B, Hkv, N, D]; modality [B, N] ints in [0, A); vertical_idx
    [B, Hq, A, Nv] key positions and slash_idx [B, Hq, A, Ns] offsets per modality slot;
    dense_rows [B, Hq, Nd] query positions attending all causal keys, or None; -1 = padding.
    slots: the modality ids that occur in `modality` (None = assume all): the kernel path
    launches only those slots (rows of other ids would be left unwritten; checked on the CPU).
    Returns q's shape and dtype.
    """
    from . import _scale, _use_triton

    present = slots
    b, hq, hkv, n, d = check_qkv(q, k, v)
    if not isinstance(vertical_idx, torch.Tensor) or vertical_idx.dim() != 4:
        raise ValueError(f"vertical_idx: expected [B, Hq, A, Nv], got {getattr(vertical_idx, 'shape', vertical_idx)}")
    slots = vertical_idx.shape[2]
    check_index("vertical_idx", vertical_idx, (b, hq, slots, None), n, q.device)
    check_index("slash_idx", slash_idx, (b, hq, slots, None), n, q.device)
    _check_modality(modality, b, n, slots, q.device)
    if dense_rows is not None:
        check_index("dense_rows", dense_rows, (b, hq, None), n, q.device)
    if present is not None:
        present = sorted({int(a) for a in present})
        if any(a < 0 or a >= slots for a in present):
            raise ValueError(f"slots: expected modality ids in [0, {slots}), got {present}")
        if modality.device.type == "cpu" and modality.numel():
            missing = sorted(set(torch.unique(modality).tolist()) - set(present))
            if missing:
                raise ValueError(f"slots: modality holds ids {missing} that are not in slots={present}")
    s = _scale(scale, d)
    if _use_triton(q, backend):
        return _triton(q, k, v, modality, vertical_idx, slash_idx, dense_rows, s, present)
    return ref.masked_attention(q, k, v, mm_rows(n, modality, vertical_idx, slash_idx, dense_rows), s)
