"""The one sparse representation every pre-filling pattern reduces to.

For each (batch, query head, query block of ``block_m`` rows) the kernel visits

* optionally a flat list of key **tiles** (start positions of ``block_n`` keys) that every row
  of the block sees whole: computed without any mask in one pipelined loop (block-sparse
  blocks strictly below the diagonal);
* a list of KV **ranges** ``(start, end, lo, hi, exact)``: keys ``j`` in ``[start, end)``
  with ``lo <= i - j <= hi`` (a diagonal band; ``lo >= 0`` keeps it causal). A block-sparse
  block is a range with band ``[0, n)``; a run of consecutive slash offsets is a band.
  ``exact = 0`` marks a range whose band has holes (several slash runs merged because their
  key spans overlap): there the kernel also tests ``slash_map[i - j]``.
* a list of gathered KV **columns** (vertical-slash only): sorted key positions; the column
  pass skips cells ``(i, c)`` whose offset ``i - c`` is a slash (a window of ``slash_bits``
  per column), so no cell is counted twice.

Vertical-slash ranges are the same for every query block (a band is a set of offsets
``i - j``), so their key tiles are the same *relative to the block's first row*: built with a
``block_n``, the exact bands become a list of **relative tiles** (unmasked, aligned to
``block_n``, shared by all query blocks) and a list of masked **edge tiles** ``(rel_start,
rel_end, lo, hi)``, both sorted nearest-first so that a query block's share is a prefix (its
length per query block is stored). The kernel then streams both lists in flat pipelined loops
with no per-range bookkeeping; only bands with holes keep a loop per range, masked through a
bitmap of the slash offsets (``slash_bits``: 64 cells per row from three 32-bit words).

Ranges of one (batch, head) never cover a cell twice. Everything is built on the tensors'
device with torch ops: no ``.item()``, no host synchronisation, no per-head Python loop; all
sizes are fixed by the arguments' shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["SparseIndex", "from_vertical_slash", "from_block_sparse", "from_ashape", "from_band", "band_index",
           "local_band_width", "split_narrow_edges", "merge_narrow_edges"]

# zero bits in front of offset 0 in ``slash_bits`` (the kernel reads up to block_m + 63 bits
# before a row's offset window; block_m <= 448) and words after the last offset
BITS_PAD = 512
_BITS_TAIL = 1024
_FAR = 1 << 30


@dataclass
class SparseIndex:
    """Ranges + columns per query block (see the module docstring).

    n: sequence length; block_m: rows per query block; nqb = ceil(n / block_m).
    ranges: int32 [B|1, H|1, nqb|1, R, 5] = (start, end, lo, hi, exact); a size-1 dim is
        broadcast (the kernel reads it with stride 0). Only the first ``range_count`` are read.
    range_count: int32 [B|1, H|1, nqb] ranges to visit per query block.
    columns: int32 [B, H, C] sorted ascending, padded with n; or None.
    column_count: int32 [B, H, nqb] columns to visit for query block q: a prefix of ``columns``,
        at most those < min(n, (q + 1) * block_m) (possibly causal for some row of the block); or None.
        (``from_vertical_slash`` leaves out the columns the head's first slash run covers for every row.)
    slash_map: uint8 [B, H, n], 1 where the offset i - j is a slash; or None (no column pass
        and all ranges exact).
    tiles: int32 [B, H, nqb|1, T] key starts of unmasked tiles of ``block_n`` keys (relative
        to the query block's first row when ``tiles_relative``, then shared: dim 2 is 1); or None.
    tile_count: int32 [B, H, nqb] tiles to visit per query block; or None.
    block_n: tile width the tiles / edges were built for (0 when there are none).
    tiles_relative: see ``tiles``.
    tile_scale: the tiles hold key starts / tile_scale (block ids when it is the block size: the
        kernel multiplies, so a sorted block list serves as tiles without a copy).
    edges: int32 [B, H, E, 4] masked tiles (rel_start, rel_end, lo, hi): keys
        ``[m0 + rel_start, m0 + min(rel_end, rel_start + block_n))`` with ``lo <= i - j <= hi``,
        m0 = the query block's first row; sorted by rel_start descending, padded with
        (-2^30, 0, 0, 0); or None. When set,
        the exact ranges are represented by ``tiles`` + ``edges`` and the kernel visits only
        the ranges with holes.
    edge_count: int32 [B, H, nqb] edges to visit per query block; or None.
    edges_narrow, edge_count_narrow: like edges / edge_count for the edges no wider than
        ``narrow_n`` keys (``rel_end - rel_start <= narrow_n``), taken out of ``edges``: a kernel
        visits them as narrow_n-key tiles (keys ``[m0 + rel_start, m0 + min(rel_end, rel_start +
        narrow_n))``); or None (``split_narrow_edges`` / ``merge_narrow_edges``).
    slash_bits: int32 [B, H, W]: bit ``BITS_PAD + o`` (word ``>> 5``, bit ``& 31``) is 1 where
        offset o is a slash (zero for o < 0); or None.
    ranges_exact: every range is exact (known when built: ``from_band``), so a kernel that
        cannot test the slash map may still serve columns that skip slash cells through
        ``slash_bits``.
    """

    n: int
    block_m: int
    ranges: torch.Tensor
    range_count: torch.Tensor
    columns: Optional[torch.Tensor] = None
    column_count: Optional[torch.Tensor] = None
    slash_map: Optional[torch.Tensor] = None
    tiles: Optional[torch.Tensor] = None
    tile_count: Optional[torch.Tensor] = None
    block_n: int = 0
    tiles_relative: bool = False
    tile_scale: int = 1
    edges: Optional[torch.Tensor] = None
    edge_count: Optional[torch.Tensor] = None
    edges_narrow: Optional[torch.Tensor] = None
    edge_count_narrow: Optional[torch.Tensor] = None
    narrow_n: int = 0
    slash_bits: Optional[torch.Tensor] = None
    ranges_exact: bool = False

    @property
    def nqb(self) -> int:
        return math.ceil(self.n / self.block_m)

    def work_fraction(self, block_n: int, samples: int = 64) -> torch.Tensor:
        """float32 [B|1, H|1]: key tiles the kernel visits (times block_m x block_n cells),
        over the causal cells, estimated on up to ``samples`` evenly spaced query blocks; on
        the index's device, no host sync. For callers that may prefer dense attention: on an
        H100 (benchmarks/NOTES_kernels.md, 2026-11-25) a visited cell cost ~1.4x a cuDNN dense
        cell for A-shape bands (0.24 -> 2.8x faster at 32K), ~2-3x for realistic vertical-slash
        (0.95x at 32K, 5.2x at 128K) and ~2.3x for scattered slashes, which merge into bands with
        holes covering most of the causal area (~1.0 -> 0.4x)."""
        n, bm = self.n, self.block_m
        dev = self.range_count.device
        nqb = self.nqb
        qs = torch.linspace(0, nqb - 1, min(samples, nqb), device=dev).round().long().unique()
        m0 = (qs * bm).view(1, 1, -1, 1)
        row_end = torch.clamp(m0 + bm, max=n)
        r = self.ranges.long()
        r = r[:, :, qs] if r.shape[2] > 1 else r
        start, end, lo, hi = r[..., 0], r[..., 1], r[..., 2], r[..., 3]
        ks = torch.clamp(torch.maximum(start, m0 - hi), min=0)
        ke = torch.minimum(torch.minimum(end, m0 + bm - lo), row_end)
        nt = torch.clamp((ke - ks + block_n - 1) // block_n, min=0)
        rc = self.range_count.long()[:, :, qs]
        valid = torch.arange(r.shape[3], device=dev).view(1, 1, 1, -1) < rc[..., None]
        if self.edges is not None:  # exact ranges are visited as tiles + edges
            valid = valid & (r[..., 4] == 0)
        tiles = (nt * valid).sum(-1)  # [B|1, H|1, S]
        if self.tiles is not None:
            tiles = tiles + self.tile_count.long()[:, :, qs]
        if self.edges is not None:
            tiles = tiles + self.edge_count.long()[:, :, qs]
        if self.edges_narrow is not None:  # narrow_n-key tiles, counted in block_n-key tiles
            tiles = tiles + self.edge_count_narrow.long()[:, :, qs] * self.narrow_n / block_n
        if self.columns is not None:
            tiles = tiles + (self.column_count.long()[:, :, qs] + block_n - 1) // block_n
        rows = (torch.clamp((qs + 1) * bm, max=n) - qs * bm).view(1, 1, -1)
        causal = (rows * (qs * bm).view(1, 1, -1) + rows * (rows + 1) // 2).sum(-1)
        return ((tiles * bm * block_n).sum(-1).float() / causal.float()).float()

    def cells(self, b: int, h: int) -> torch.Tensor:
        """bool [n, n]: the (query, key) cells this index makes the kernel compute for
        batch b, head h (tiles, ranges and columns), built the kernel's way; raises if a cell
        is covered twice. Tests only (Python loops)."""
        n, bm = self.n, self.block_m
        dev = self.ranges.device
        out = torch.zeros(n, n, dtype=torch.int32, device=dev)
        i = torch.arange(n, device=dev)[:, None]
        j = torch.arange(n, device=dev)[None, :]
        smap = self.slash_map[b, h].bool() if self.slash_map is not None else None
        off = (i - j).clamp(min=0)
        rb = min(b, self.ranges.shape[0] - 1)
        rh = min(h, self.ranges.shape[1] - 1)
        for q in range(self.nqb):
            rows = slice(q * bm, min(n, (q + 1) * bm))
            rq = min(q, self.ranges.shape[2] - 1)
            m0 = q * bm
            if self.tiles is not None:
                for t in range(int(self.tile_count[b, h, q])):
                    t0 = int(self.tiles[b, h, 0 if self.tiles_relative else q, t]) * self.tile_scale
                    t0 += m0 if self.tiles_relative else 0
                    if t0 < 0 or t0 + self.block_n > n:
                        raise AssertionError("unmasked tile outside the keys")
                    out[rows, t0:t0 + self.block_n] += 1
            for edges, count, width in ((self.edges, self.edge_count, self.block_n),
                                        (self.edges_narrow, self.edge_count_narrow, self.narrow_n)):
                if edges is None:
                    continue
                for t in range(int(count[b, h, q])):
                    rs, re, lo, hi = (int(x) for x in edges[b, h, t])
                    ks, ke = max(m0 + rs, 0), min(m0 + re, m0 + rs + width, n)
                    m = (j >= ks) & (j < ke) & (i - j >= lo) & (i - j <= hi)
                    out[rows] += m[rows].int()
            cnt = int(self.range_count[min(b, self.range_count.shape[0] - 1), min(h, self.range_count.shape[1] - 1), q])
            for r in range(cnt):
                s, e, lo, hi, ex = (int(x) for x in self.ranges[rb, rh, rq, r])
                if ex and self.edges is not None:
                    continue
                m = (j >= s) & (j < e) & (i - j >= lo) & (i - j <= hi)
                if not ex:
                    m &= smap[off]
                out[rows] += m[rows].int()
            if self.columns is not None:
                cnt = int(self.column_count[b, h, q])
                cols = self.columns[b, h, :cnt].long()
                m = torch.zeros(n, n, dtype=torch.bool, device=dev)
                m[:, cols] = True
                m &= (j <= i) & ~smap[off]
                out[rows] += m[rows].int()
        if int(out.max()) > 1:
            raise AssertionError("a cell is covered twice")
        return out.bool()


def _sorted_unique(x: torch.Tensor, big: int) -> torch.Tensor:
    """Sort the last dim ascending with duplicates replaced by ``big`` (sorted to the end).
    Entries already equal to ``big`` are padding. (Compacting the duplicates out by a prefix sum
    instead of the second sort was slower for vertical-slash indices: H100, 128K, 0.2-2 ms per
    call.)"""
    key = _narrow_int(x, big)  # radix sorts pass over fewer bits (int16 for block indices)
    s, _ = torch.sort(key, dim=-1)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    s = torch.where(dup, torch.full_like(s, big), s)
    s, _ = torch.sort(s, dim=-1)
    return s.to(x.dtype)


def _narrow_int(x: torch.Tensor, big: int) -> torch.Tensor:
    """Integer x with values in [-1, big] as the narrowest of int16 / int32 / x's dtype holding them."""
    if x.dtype in (torch.int64, torch.int32) and big < (1 << 15) - 1:
        return x.to(torch.int16)
    if x.dtype == torch.int64 and big < (1 << 31) - 1:
        return x.to(torch.int32)
    return x


def _compact(values: torch.Tensor, keep: torch.Tensor, fill: int, width: int | None = None) -> torch.Tensor:
    """Move values[keep] to the front of the last dim (order kept); the rest = fill. width: the
    output's last dim (default values'), kept entries past it dropped. values may be a broadcast
    view of keep's shape."""
    width = values.shape[-1] if width is None else width
    pos = torch.cumsum(keep.to(torch.int32), dim=-1, dtype=torch.int32) - 1
    pos = torch.where(keep & (pos < width), pos, width).long()  # the rest go to a spill slot
    out = torch.full(keep.shape[:-1] + (width + 1,), fill, dtype=values.dtype, device=values.device)
    out.scatter_(-1, pos, values.expand(keep.shape))
    return out[..., :width]


def _runs(s: torch.Tensor, big: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """s: sorted unique values padded with ``big`` -> (run_lo, run_hi, count): maximal runs
    of consecutive integers, compacted to the front (padding lo = hi = big)."""
    valid = s < big
    prev = torch.full_like(s, -2)
    prev[..., 1:] = s[..., :-1]
    nxt = torch.full_like(s, big)
    nxt[..., :-1] = s[..., 1:]
    is_start = valid & (s != prev + 1)
    is_end = valid & (nxt != s + 1)
    lo = _compact(s, is_start, big)
    hi = _compact(s, is_end, big)
    return lo, hi, is_start.sum(-1)


def device_tensor(values, device, dtype=None) -> torch.Tensor:
    """A small constant tensor on `device` without a stream synchronisation
    (``torch.tensor(..., device="cuda")`` copies with a blocking H2D copy, which waits for all
    queued GPU work and so stalls the host between kernel launches)."""
    t = torch.tensor(values, dtype=dtype)
    return t.to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def from_ashape(n: int, sink: int, window: int, batch: int, heads: int, block_m: int, device) -> SparseIndex:
    """A-shape: a sink range [0, sink) with band [0, n) and a window band [0, window - 1]
    starting at key ``sink`` (so no cell is counted twice; window 0 still keeps j == i).
    Shapes: ranges [1, 1, 1, 2, 5], range_count [1, 1, nqb] (broadcast over B, H)."""
    nqb = math.ceil(n / block_m)
    sink = min(sink, n)
    r = device_tensor([[0, sink, 0, n, 1], [sink, n, 0, max(window - 1, 0), 1]], device, torch.int32)
    ranges = r.view(1, 1, 1, 2, 5)
    count = torch.full((1, 1, nqb), 2, dtype=torch.int32, device=device)
    return SparseIndex(n=n, block_m=block_m, ranges=ranges, range_count=count)


def from_block_sparse(block_idx: torch.Tensor, block_size: int, n: int, block_m: int,
                      block_n: Optional[int] = None, sorted_blocks: bool = False,
                      dense_from: Optional[int] = None) -> SparseIndex:
    """block_idx [B, H, nb = ceil(n / block_size), K] (-1 = padding, duplicates allowed, any
    order; sorted_blocks: each row ascending without repeats, padding last, so no sort) ->
    SparseIndex; ``block_size`` must be a multiple of block_m and of block_n (default block_m).

    tiles [B, H, nqb, K * block_size / block_n]: listed blocks strictly below the query's own
    index block (sorted, deduplicated), each cut into block_n-wide tiles (no mask needed);
    tile_count [B, H, nqb]; ranges [B, H, nqb, 1, 5]: the diagonal, either the own block with
    band [0, n) when listed, or the self band [0, 0] over the query block's rows; query blocks
    in index blocks >= dense_from: no tiles, one range over every causal key.
    """
    block_n = block_m if block_n is None else block_n
    if block_size % block_m or block_size % block_n:
        raise ValueError(f"block_size {block_size} must be a multiple of block_m {block_m} and block_n {block_n}")
    b, h, nb, k = block_idx.shape
    dev = block_idx.device
    big = nb + 1
    if not sorted_blocks and block_m == block_size and block_n == block_size and _lists_kernel(block_idx):
        # rows in any order: sorted, deduplicated and split in one launch (kernels.rows.block_lists)
        from .kernels.rows import block_lists

        tiles, before, diag = block_lists(block_idx)
        return _block_index(n, block_m, block_size, tiles, before, diag, dense_from=dense_from, tile_scale=block_size)
    # int32 throughout (key offsets < 2^31 for any n the kernel takes): half the bytes of int64
    idx = block_idx.to(torch.int32)
    qb = torch.arange(nb, device=dev, dtype=torch.int32).view(1, 1, nb, 1)
    if sorted_blocks and block_m == block_size and block_n == block_size:
        # an ascending row lists its strictly-causal blocks first: they are the tiles (block ids,
        # the kernel scales them), the rest of the row is never read; on CUDA the split of each
        # row is found by bisection (no pass over [B, H, nb, K])
        before, diag = row_split(idx, sorted_blocks=True)
        return _block_index(n, block_m, block_size, idx.contiguous(), before, diag, dense_from=dense_from,
                            tile_scale=block_size)
    diag_listed = (idx == qb).any(-1)  # [B, H, nb]
    idx = torch.where((idx >= 0) & (idx < qb), idx, big)
    # strictly-causal blocks first, padding big (an ascending row keeps that order: its own
    # block, the only one dropped here besides padding, comes after the causal ones)
    s = idx if sorted_blocks else _sorted_unique(idx, big)
    cnt = (s < big).sum(-1, dtype=torch.int32)
    tpb = block_size // block_n
    tiles = torch.where(s < big, s, 0) * block_size
    if tpb > 1:
        tiles = (tiles[..., None] + torch.arange(tpb, device=dev, dtype=torch.int32) * block_n).reshape(b, h, nb, k * tpb)
    # index blocks -> kernel query blocks (the identity when they are the same blocks)
    nqb = math.ceil(n / block_m)
    if block_m != block_size:
        qmap = torch.arange(nqb, device=dev) * block_m // block_size
        tiles, cnt, diag_listed = tiles[:, :, qmap], cnt[:, :, qmap], diag_listed[:, :, qmap]
    return _block_index(n, block_m, block_size, tiles.contiguous(), cnt * tpb, diag_listed, block_n, dense_from)


def from_pairs(pairs: torch.Tensor, pair_count: torch.Tensor, n: int, block: int) -> SparseIndex:
    """pairs int32 [B, H, ceil(n / block), K] (ascending block ids below each row's own block, the
    first pair_count [B, H, ceil(n / block)] read) -> SparseIndex of query blocks of `block` rows
    visiting those key blocks as whole `block`-wide tiles and nothing else (no diagonal range: a
    query block with no pair block visits nothing; see kernels.rows.pair_split)."""
    b, h, nqb = pair_count.shape
    dev = pair_count.device
    return SparseIndex(n=n, block_m=block, ranges=torch.zeros(b, h, 1, 1, 5, dtype=torch.int32, device=dev),
                       range_count=torch.zeros(b, h, nqb, dtype=torch.int32, device=dev), tiles=pairs,
                       tile_count=pair_count, block_n=block, tile_scale=block)


def row_split(block_idx: torch.Tensor, sorted_blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """block_idx [B, H, nb, K] (-1 padding; sorted_blocks: rows ascending without repeats, else any
    order with repeats) -> (before int32 [B, H, nb]: distinct listed blocks below row q's own block q,
    diag bool [B, H, nb]: whether row q lists q). What the index build and the kept density need.
    CUDA: the bisection kernel for sorted rows, the block-list kernel for the others (rows up to
    kernels.rows.MAX_LIST); otherwise torch (a sort of each row when unordered; no [nb, nb] table)."""
    nb = block_idx.shape[2]
    qb = torch.arange(nb, device=block_idx.device).view(1, 1, nb, 1)
    if sorted_blocks:
        if block_idx.is_cuda:
            from .kernels.rows import sorted_rows_split

            return sorted_rows_split(block_idx)
        return ((block_idx >= 0) & (block_idx < qb)).sum(-1, dtype=torch.int32), (block_idx == qb).any(-1)
    if _lists_kernel(block_idx):
        from .kernels.rows import block_lists

        return block_lists(block_idx)[1:]
    big = nb + 1
    s = _sorted_unique(torch.where((block_idx >= 0) & (block_idx < qb), block_idx, big), big)
    return (s < big).sum(-1, dtype=torch.int32), (block_idx == qb).any(-1)


def _lists_kernel(block_idx: torch.Tensor) -> bool:
    """Whether from_block_sparse sorts unordered rows with kernels.rows.block_lists:
    kernels.attention.FLAGS["BS_LISTS"] "auto" = CUDA tensors, True = also the CPU (interpreter;
    tests), False = the torch sorts; rows of at most rows.MAX_LIST entries."""
    from .kernels import attention as katt
    from .kernels.rows import MAX_LIST

    mode = katt.FLAGS.get("BS_LISTS", "auto")
    on = block_idx.is_cuda if mode == "auto" else bool(mode)
    return on and 0 < block_idx.shape[-1] <= MAX_LIST and block_idx.dtype in (torch.int32, torch.int64)


def _block_index(n: int, block_m: int, block_size: int, tiles: torch.Tensor, tile_count: torch.Tensor,
                 diag_listed: torch.Tensor, block_n: Optional[int] = None,
                 dense_from: Optional[int] = None, tile_scale: int = 1) -> SparseIndex:
    """SparseIndex of block lists: tiles [B, H, nqb, T] key starts (the first tile_count [B, H, nqb]
    are read), the diagonal range per query block: the own index block with band [0, n) when
    listed (diag_listed [B, H, nqb]), else the self band [0, 0] over the query block's rows;
    query blocks in index blocks >= dense_from: no tiles, the range [0, own block end) with band [0, n)."""
    b, h, nqb = tile_count.shape
    dev = tile_count.device
    # per query block the two candidate diagonal ranges, [nqb, 5] each, then one select per row
    m0 = torch.arange(nqb, device=dev, dtype=torch.int32) * block_m
    m_end = (m0 + block_m).clamp_(max=n)
    own, own_end = m0, m_end
    if block_m != block_size:
        own = torch.div(m0, block_size, rounding_mode="floor") * block_size
        own_end = (own + block_size).clamp_(max=n)
    start = own
    if dense_from is not None:
        dense = own >= dense_from * block_size
        tile_count = torch.where(dense, 0, tile_count)
        diag_listed = diag_listed | dense
        start = torch.where(dense, 0, own)  # the range starts at key 0
    zero, one = torch.zeros_like(m0), torch.ones_like(m0)
    listed = torch.stack([start, own_end, zero, torch.full_like(m0, n), one], -1)  # own block, band [0, n)
    self_band = torch.stack([m0, m_end, zero, zero, one], -1)  # the query block's own rows, band [0, 0]
    ranges = torch.where(diag_listed[..., None], listed, self_band).unsqueeze(-2)
    return SparseIndex(
        n=n, block_m=block_m, ranges=ranges,
        range_count=torch.ones(b, h, nqb, dtype=torch.int32, device=dev),
        tiles=tiles, tile_count=tile_count, block_n=block_m if block_n is None else block_n, tile_scale=tile_scale,
    )


def _slash_bits(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted unique offsets [B, H, S] (padding >= n) -> int32 [B, H, W]: bit BITS_PAD + o set
    for every offset o (see SparseIndex). One scatter over the offsets, O(S) work per head."""
    b, h, _ = offsets.shape
    nbits = BITS_PAD + n + _BITS_TAIL
    nwords = (nbits + 31) // 32
    valid = offsets < n
    pos = torch.where(valid, offsets, 0) + BITS_PAD
    words = torch.zeros(b, h, nwords + 1, dtype=torch.int64, device=offsets.device)
    words.scatter_add_(-1, torch.where(valid, pos >> 5, nwords), valid.to(torch.int64) << (pos & 31))
    words = words[..., :nwords]  # offsets are unique: no bit is added twice
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def _expand(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts [B, H, R] >= 0 -> for positions p < total: (item r, rank k within the item, valid),
    each [B, H, total]; ``total`` bounds counts.sum(-1) (fixed shape, no host sync)."""
    b, h, r = counts.shape
    cum = torch.cumsum(counts, -1)
    p = torch.arange(total, device=counts.device).expand(b * h, total).contiguous()
    item = torch.searchsorted(cum.reshape(b * h, r).contiguous(), p, right=True).view(b, h, total)
    valid = p.view(b, h, total) < cum[..., -1:]
    item = item.clamp(max=r - 1)
    k = p.view(b, h, total) - (torch.gather(cum, -1, item) - torch.gather(counts, -1, item))
    return item, k, valid


def _relative_tiles(lo, hi, exact, n_slash: int, n: int, block_m: int, block_n: int):
    """Exact bands (lo, hi, exact) [B, H, R] (padding lo >= n) -> relative unmasked tiles
    [B, H, 1, TU] + counts [B, H, nqb] and edges [B, H, TE, 4] + counts [B, H, nqb] (see
    SparseIndex). For rows m0..m0+bm-1 a band needs keys m0 + [-hi, bm - lo); the aligned
    tiles every row sees whole are unmasked, the rest are edge tiles clipped to the band's
    head [-hi, A) and tail [B, bm - lo)."""
    bm, bn = block_m, block_n
    b, h, r = lo.shape
    dev = lo.device
    nqb = math.ceil(n / bm)
    valid = (lo < n) & (exact != 0)
    lo = torch.where(valid, lo, torch.zeros_like(lo))
    hi = torch.where(valid, hi, torch.zeros_like(hi))
    u_lo = -torch.div(-(bm - 1 - hi), bn, rounding_mode="floor") * bn  # ceil to the grid
    u_hi = torch.div(-lo - bn + 1, bn, rounding_mode="floor") * bn
    nu = torch.clamp(torch.div(u_hi - u_lo, bn, rounding_mode="floor") + 1, min=0) * valid
    a = torch.where(nu > 0, u_lo, bm - lo)
    bq = torch.where(nu > 0, u_lo + nu * bn, bm - lo)
    n_head = -torch.div(-(a + hi), bn, rounding_mode="floor") * valid
    n_tail = -torch.div(-(bm - lo - bq), bn, rounding_mode="floor") * valid
    m0 = (torch.arange(nqb, device=dev) * bm).view(1, nqb).expand(b * h, nqb).contiguous()
    # unmasked: the middle tiles of every band (sum of widths <= n_slash)
    tu = max(n_slash // bn + 1, 1)
    item, k, ok = _expand(nu, tu)
    rel = torch.gather(u_lo, -1, item) + k * bn
    rel = torch.where(ok, rel, torch.full_like(rel, -_FAR))
    rel, _ = torch.sort(rel, dim=-1, descending=True)
    tcount = torch.searchsorted((-rel).reshape(b * h, tu).contiguous(), m0, right=True).view(b, h, nqb)
    # edges: head [-hi, a) then tail [bq, bm - lo) of every band
    te = max(r * ((2 * bm + 3 * bn) // bn + 1), 1)
    ne = n_head + n_tail
    item, k, ok = _expand(ne, te)
    g = lambda x: torch.gather(x, -1, item)  # noqa: E731
    lo_e, hi_e, nh = g(lo), g(hi), g(n_head)
    head = k < nh
    start = torch.where(head, -hi_e + k * bn, g(bq) + (k - nh) * bn)
    end = torch.where(head, g(a), bm - lo_e)
    start = torch.where(ok, start, torch.full_like(start, -_FAR))
    start, order = torch.sort(start, dim=-1, descending=True)
    rest = torch.stack([torch.gather(end, -1, order), torch.gather(lo_e, -1, order), torch.gather(hi_e, -1, order)], -1)
    edges = torch.cat([start[..., None], torch.where((start == -_FAR)[..., None], 0, rest)], -1)  # padding (-FAR, 0, 0, 0)
    ecount = torch.searchsorted((-start).reshape(b * h, te).contiguous(), m0 + bn, right=False).view(b, h, nqb)
    return (rel.view(b, h, 1, tu).to(torch.int32).contiguous(), tcount.to(torch.int32),
            edges.to(torch.int32).contiguous(), ecount.to(torch.int32))


def slash_groups(slash_idx: torch.Tensor, n: int, merge_gap: int):
    """slash_idx [B, H, Ns] offsets (-1 = padding, any order) -> (s, lo, glo, ghi, exact):
    s [B, H, Ns + 1] sorted unique offsets with 0 added (n = padding); lo [B, H, R] starts of
    the runs of consecutive offsets; glo / ghi / exact [B, H, R]: the ranges the kernel visits
    (runs whose gap is at most merge_gap merged; exact = 1 for a single run, 0 for a band with
    holes), padded with n."""
    s, lo, hi = _slash_runs(slash_idx, n)
    glo, ghi, exact = _group_runs(lo, hi, merge_gap, n)
    return s, lo, glo, ghi, exact


def _slash_runs(slash_idx: torch.Tensor, n: int):
    """slash_idx [B, H, Ns] -> (s, lo, hi): s [B, H, Ns + 1] sorted unique offsets with 0 added (n =
    padding); lo / hi [B, H, Ns + 1] the runs of consecutive offsets (padding n)."""
    b, h, _ = slash_idx.shape
    s = slash_idx.to(torch.int64)
    s = torch.where((s >= 0) & (s < n), s, torch.full_like(s, n))
    s = torch.cat([torch.zeros(b, h, 1, dtype=torch.int64, device=slash_idx.device), s], dim=-1)
    s = _sorted_unique(s, n)
    lo, hi, _ = _runs(s, n)
    return s, lo, hi


def _group_runs(lo: torch.Tensor, hi: torch.Tensor, merge_gap: int, big: int):
    """Runs [lo, hi] [B, H, R] (sorted, padding lo = big) -> (glo, ghi, exact) [B, H, R]: runs
    whose gap is at most merge_gap merged into one range (exact = 0: it has holes), padded with big."""
    b, h, _ = lo.shape
    dev = lo.device
    valid = lo < big
    prev_hi = torch.full_like(hi, -(1 << 40))
    prev_hi[..., 1:] = hi[..., :-1]
    nxt_lo = torch.full_like(lo, 1 << 40)
    nxt_lo[..., :-1] = lo[..., 1:]
    g_start = valid & (lo - prev_hi - 1 > merge_gap)
    g_end = valid & ((nxt_lo - hi - 1 > merge_gap) | (nxt_lo >= big))
    glo = _compact(lo, g_start, big)
    ghi = _compact(hi, g_end, big)
    # runs per group: exact iff it holds one run
    gid = torch.cumsum(g_start.to(torch.int64), -1) - 1
    gid = torch.where(valid, gid, torch.full_like(gid, lo.shape[-1]))
    runs_per = torch.zeros(b, h, lo.shape[-1] + 1, dtype=torch.int64, device=dev)
    runs_per.scatter_add_(-1, gid, valid.to(torch.int64))
    exact = (runs_per[..., :-1] <= 1).to(torch.int64)
    return glo, ghi, exact


def vertical_slash_work(n: int, vertical_idx: torch.Tensor, slash_idx: torch.Tensor, block_m: int = 64) -> torch.Tensor:
    """float32 [B, H]: the share of the causal cells the kernel visits for these indices
    (vertical_idx [B, H, Nv], slash_idx [B, H, Ns]), estimated without building the index:
    each merged slash range [lo, hi] costs its rows (n - lo) times its key span per query block
    (hi - lo + block_m), capped by those rows' causal cells; each column its n - v cells.
    Scattered slashes merge into bands with holes whose visited area is far above the kept
    density: this is what the kernel's time follows. On the device, no host sync."""
    _, _, glo, ghi, _ = slash_groups(slash_idx, n, block_m)
    ok = glo < n
    lo = glo.double()
    hi = torch.clamp(ghi, max=n - 1).double()
    rows = n - lo
    causal = (n * (n + 1) - lo * (lo + 1)) / 2  # cells of rows >= lo
    band = torch.minimum(rows * (hi - lo + block_m), causal)
    v = vertical_idx.to(torch.int64)
    v = _sorted_unique(torch.where((v >= 0) & (v < n), v, torch.full_like(v, n)), n)
    cols = torch.where(v < n, n - v, 0).double().sum(-1)
    cells = torch.where(ok, band, 0.0).sum(-1) + cols
    return torch.clamp(cells / (n * (n + 1) / 2), max=1.0).float()


def from_vertical_slash(
    vertical_idx: torch.Tensor, slash_idx: torch.Tensor, n: int, block_m: int, merge_gap: Optional[int] = None,
    block_n: Optional[int] = None, band_block_m: Optional[int] = None, band_min: int = 1,
    band_columns: bool = False, max_tiled: Optional[int] = None, fused_runs: bool = False, narrow_n: int = 0,
):
    """vertical_idx [B, H, Nv] key positions, slash_idx [B, H, Ns] offsets i - j (-1 = padding,
    duplicates allowed, any order) -> SparseIndex with
    ranges [B, H, 1, Ns + 1, 5] (the same for every query block, sorted by lo),
    range_count [B, H, nqb], columns [B, H, Nv], column_count [B, H, nqb], slash_map [B, H, n],
    slash_bits [B, H, W].

    Offset 0 (self) is always added. Consecutive offsets become one exact band; bands whose gap
    is at most ``merge_gap`` (default block_m: their key spans per query block would overlap) merge into one range with holes (exact = 0, masked through slash_bits).
    With ``block_n`` (a divisor of block_m), the exact bands also become relative tiles + edges
    (tiles [B, H, 1, TU], edges [B, H, TE, 4], see SparseIndex) and slash_bits is built.
    With ``band_block_m``: returns (index, band index). A head's local band (its first run of
    consecutive offsets 0..w, w + 1 >= ``band_min``) is left out of the index's ranges / tiles /
    edges (the other runs are grouped without it; slash_bits keep it: columns still skip its
    cells) and is the band index's one range (query blocks of band_block_m rows), for a launch
    of its own (wider tiles) whose result is merged with the index's; heads with a shorter first
    run keep it (band range_count 0). With ``band_columns`` the columns of the heads that have a
    band go to the band index too (``band_index(..., vertical_idx=)``): the index's column_count
    is 0 for those heads. ``max_tiled``: at most that many exact bands (the nearest) become tiles
    + edges, whose lists are then sized by it rather than by Ns (the rest are visited as ranges
    with the slash-bit test). ``fused_runs``: the sort, runs, grouping and cap in one torch.sort and
    one launch (``kernels.runs.slash_runs``; the same index) when Ns < ``kernels.runs.MAX_SLASHES``,
    and with max_tiled and merge_gap >= block_m the tiles + edges in one more (``relative_tiles``).
    ``narrow_n`` (with block_n): the edges at most that many keys wide go to a list of their own
    (``split_narrow_edges``; with fused_runs the ``relative_tiles`` launch writes both lists).
    """
    if block_n is not None and (block_n <= 0 or block_m % block_n or block_n > 64):
        raise ValueError(f"block_n must divide block_m and be <= 64, got block_m={block_m}, block_n={block_n}")
    if block_m > BITS_PAD - 64:
        raise ValueError(f"block_m must be <= {BITS_PAD - 64}, got {block_m}")
    b, h, _ = slash_idx.shape
    dev = slash_idx.device
    merge_gap = block_m if merge_gap is None else merge_gap
    nqb = math.ceil(n / block_m)
    big = n
    r = slash_idx.shape[-1] + 1
    cap = max_tiled if block_n is not None and max_tiled is not None and max_tiled < r else None
    band = None
    if fused_runs:  # one torch.sort and one launch (kernels.runs) for the steps below, up to its size
        from .kernels import runs as _runs

        fused_runs = r <= _runs.MAX_SLASHES
    if fused_runs:
        s, glo, ghi, exact, t_lo, t_hi, w = _runs.slash_runs(slash_idx, n, max(band_min, 1) if band_block_m else 0,
                                                      merge_gap, cap)
        tiled = (t_lo, t_hi) if cap is not None else None
        if band_block_m is not None:
            band = (band_index(slash_idx, n, band_block_m, band_min, vertical_idx) if band_columns
                    else from_band(torch.where(w + 1 >= band_min, w, -1), n, band_block_m))
    else:
        s, glo, ghi, exact, tiled, band = _runs_grouped(slash_idx, vertical_idx, n, merge_gap, band_block_m, band_min,
                                                        band_columns, cap)
    smap = torch.zeros(b, h, n + 1, dtype=torch.uint8, device=dev)
    smap.scatter_(-1, s, 1)
    smap = smap[..., :n].contiguous()
    ranges = torch.stack(
        [torch.zeros_like(glo), torch.full_like(glo, n), glo, torch.clamp(ghi, max=n), exact], dim=-1
    ).to(torch.int32)
    last_row = (torch.arange(nqb, device=dev) * block_m + block_m - 1).clamp(max=n - 1)
    rc = torch.searchsorted(
        glo.reshape(b * h, r).contiguous(), last_row.view(1, nqb).expand(b * h, nqb).contiguous(), right=True
    ).view(b, h, nqb)
    # columns
    v = vertical_idx.to(torch.int64)
    v = torch.where((v >= 0) & (v < n), v, torch.full_like(v, big))
    cols = _sorted_unique(v, big)
    # a block visits the columns left of its last row's first run (offsets 0..w: offset 0 is always a
    # slash): the run covers every row's cells in columns c >= last row - w (or they are not causal).
    # s is sorted and unique from 0 on, so s[k] == k exactly for k <= w
    w = (s == torch.arange(s.shape[-1], device=dev)).sum(-1) - 1
    last = (torch.arange(nqb, device=dev) * block_m + block_m).clamp(max=n) - 1
    bound = last.view(1, 1, nqb) - w.unsqueeze(-1)
    cc = torch.searchsorted(cols.reshape(b * h, -1).contiguous(), bound.reshape(b * h, nqb).contiguous(),
                            right=False).view(b, h, nqb)
    if band is not None and band_columns:  # the band launch takes these heads' columns
        cc = torch.where(band.range_count[..., :1] > 0, torch.zeros_like(cc), cc)
    idx = SparseIndex(
        n=n,
        block_m=block_m,
        ranges=ranges.view(b, h, 1, r, 5),
        range_count=rc.to(torch.int32),
        columns=cols.to(torch.int32),
        column_count=cc.to(torch.int32),
        slash_map=smap,
        # the band index with columns already has the same bits (from its presence map)
        slash_bits=band.slash_bits if band is not None and band_columns else _slash_bits(s, n),
    )
    if block_n is not None and fused_runs and tiled is not None and merge_gap >= block_m:
        built = _runs.relative_tiles(tiled[0], tiled[1], s.shape[-1], n, block_m, block_n, narrow_n)
        idx.tiles, idx.tile_count, idx.edges, idx.edge_count = built[:4]
        if narrow_n:  # the narrow edges in a list of their own, from the same launch
            idx.edges_narrow, idx.edge_count_narrow, idx.narrow_n = built[4], built[5], narrow_n
        idx.tiles_relative, idx.block_n = True, block_n
    elif block_n is not None:
        t_lo, t_hi = (glo, ghi) if tiled is None else tiled
        idx.tiles, idx.tile_count, idx.edges, idx.edge_count = _relative_tiles(
            t_lo, torch.clamp(t_hi, max=n), exact if tiled is None else (t_lo < big).to(exact.dtype),
            s.shape[-1], n, block_m, block_n)
        idx.tiles_relative, idx.block_n = True, block_n
    if narrow_n and idx.edges is not None and idx.edges_narrow is None:
        idx = split_narrow_edges(idx, narrow_n)
    return idx if band is None else (idx, band)


def _edge_list(edges: torch.Tensor, keep: torch.Tensor, nqb: int, block_m: int, width: int):
    """The entries of edges [B, H, E, 4] where keep [B, H, E], sorted by rel_start descending
    (the others padding), and per query block the count of those whose width-key tile reaches
    key 0 or beyond (as ``_relative_tiles``' counts)."""
    b, h, e = keep.shape
    start = torch.where(keep, edges[..., 0], -_FAR)
    start, order = torch.sort(start, dim=-1, descending=True)
    rest = torch.gather(edges[..., 1:], 2, order[..., None].expand(b, h, e, 3))
    out = torch.cat([start[..., None], torch.where((start == -_FAR)[..., None], 0, rest)], -1)
    m0 = (torch.arange(nqb, device=edges.device) * block_m + width).view(1, nqb).expand(b * h, nqb).contiguous()
    count = torch.searchsorted((-start).reshape(b * h, e).contiguous(), m0, right=False).view(b, h, nqb)
    return out.to(torch.int32).contiguous(), count.to(torch.int32)


def split_narrow_edges(idx: SparseIndex, narrow_n: int) -> SparseIndex:
    """idx (changed in place) with its edges at most narrow_n keys wide (rel_end - rel_start <=
    narrow_n) moved to ``edges_narrow`` / ``edge_count_narrow`` (a kernel visits them as narrow_n-key tiles: the
    Gluon kernel; vertical-slash's 200-offset runs at 128K: a quarter of the edges). The same
    cells."""
    if idx.edges is None or idx.edges_narrow is not None:
        raise ValueError("split_narrow_edges: expected an index with edges and no narrow list")
    if not 0 < narrow_n < idx.block_n:
        raise ValueError(f"narrow_n must be in (0, block_n = {idx.block_n}), got {narrow_n}")
    e = idx.edges
    width = torch.minimum(e[..., 1], e[..., 0] + idx.block_n) - e[..., 0]
    real = e[..., 0] > -_FAR
    narrow = real & (width <= narrow_n)
    idx.edges, idx.edge_count = _edge_list(e, real & ~narrow, idx.nqb, idx.block_m, idx.block_n)
    idx.edges_narrow, idx.edge_count_narrow = _edge_list(e, narrow, idx.nqb, idx.block_m, narrow_n)
    idx.narrow_n = narrow_n
    return idx


def merge_narrow_edges(idx: SparseIndex) -> SparseIndex:
    """A copy of idx whose narrow edges are back in ``edges`` (block_n-key tiles clip them at
    rel_end: the same cells), for a kernel without narrow tiles."""
    import dataclasses

    if idx.edges_narrow is None:
        return idx
    both = torch.cat([idx.edges, idx.edges_narrow], 2)
    edges, count = _edge_list(both, both[..., 0] > -_FAR, idx.nqb, idx.block_m, idx.block_n)
    return dataclasses.replace(idx, edges=edges, edge_count=count, edges_narrow=None, edge_count_narrow=None,
                               narrow_n=0)


def _runs_grouped(slash_idx, vertical_idx, n: int, merge_gap: int, band_block_m, band_min: int, band_columns: bool,
                  cap):
    """The runs steps of ``from_vertical_slash`` in torch ops (what ``kernels.runs.slash_runs`` does in
    one launch, and the band index) -> (s, glo, ghi, exact, tiled, band): s [B, H, Ns + 1] sorted
    unique offsets with 0; glo / ghi / exact [B, H, Ns + 1] the grouped runs (the band's run left out
    for heads whose band launches apart); tiled: (lo, hi) [B, H, cap] of the nearest cap exact groups,
    whose exact flag stays, the farther ones' cleared (None without a cap); band: the band index or None."""
    big = n
    s, lo, hi = _slash_runs(slash_idx, n)
    band = None
    if band_block_m is not None:  # the band is the first run (it starts at offset 0, always a slash)
        band = band_index(slash_idx, n, band_block_m, band_min, vertical_idx if band_columns else None)
        own = band.range_count[..., :1] > 0

        def drop_first(x):
            return torch.where(own, torch.cat([x[..., 1:], torch.full_like(x[..., :1], big)], -1), x)

        lo, hi = drop_first(lo), drop_first(hi)
    glo, ghi, exact = _group_runs(lo, hi, merge_gap, big)
    tiled = None
    if cap is not None:
        # the nearest cap exact bands become tiles + edges (lists sized by cap, not by Ns); the farther
        # ones stay ranges, visited with the slash-bit test (their exact flag cleared)
        ex = (glo < big) & (exact != 0)
        keep = ex & (torch.cumsum(ex.to(torch.int32), -1) <= cap)
        tiled = (_compact(glo, keep, big, cap), _compact(ghi, keep, big, cap))
        exact = torch.where(ex & ~keep, torch.zeros_like(exact), exact)
    return s, glo, ghi, exact, tiled, band


def _presence(slash_idx: torch.Tensor, n: int) -> torch.Tensor:
    """slash_idx [B, H, Ns] (-1 / >= n = padding) -> uint8 [B, H, n + 2]: 1 at every slash offset
    (offset 0 always); entries n and n + 1 are 0."""
    b, h, _ = slash_idx.shape
    s = slash_idx.to(torch.int64)
    s = torch.where((s >= 0) & (s < n), s, torch.full_like(s, n + 1))
    pres = torch.zeros(b, h, n + 2, dtype=torch.uint8, device=slash_idx.device)
    pres.scatter_(-1, s, 1)
    pres[..., 0] = 1
    pres[..., n + 1] = 0
    return pres


def local_band_width(slash_idx: torch.Tensor, n: int) -> torch.Tensor:
    """slash_idx [B, H, Ns] offsets (-1 / >= n = padding) -> int64 [B, H]: the largest w such that
    every offset 0..w is a slash (offset 0 always counts), i.e. the end of the first run of
    ``from_vertical_slash`` (hi[..., 0] of its runs). A presence map and one argmin, no sort: a
    few launches, so the local band's launch can start before the rest of the index is built."""
    return torch.argmin(_presence(slash_idx, n)[..., : n + 1], dim=-1) - 1  # entry n is 0: the first absent offset


def _bits_of(pres: torch.Tensor, n: int) -> torch.Tensor:
    """Presence map uint8 [B, H, >= n] -> slash_bits int32 [B, H, W] (as ``_slash_bits``): bit
    BITS_PAD + o set where pres[..., o] is 1, o < n."""
    b, h, _ = pres.shape
    nwords = (BITS_PAD + n + _BITS_TAIL + 31) // 32
    bits = torch.zeros(b, h, nwords * 32, dtype=torch.int32, device=pres.device)
    bits[..., BITS_PAD:BITS_PAD + n] = pres[..., :n]
    shift = torch.arange(32, dtype=torch.int32, device=pres.device)
    return (bits.view(b, h, nwords, 32) << shift).sum(-1, dtype=torch.int32).contiguous()  # disjoint bits: sum = or


def band_index(slash_idx: torch.Tensor, n: int, block_m: int, band_min: int = 1,
               vertical_idx: Optional[torch.Tensor] = None) -> SparseIndex:
    """The local-band index of ``from_vertical_slash(..., band_block_m=block_m, band_min=)``: per
    head the band 0..w of ``local_band_width`` when w + 1 >= band_min, else none (``from_band``).

    With vertical_idx [B, H, Nv] (``band_columns``), the heads that have a band also take their
    gathered columns: columns [B, H, Nv] sorted unique (padded with n), column_count [B, H, nqb]
    (0 for heads without a band), and slash_map / slash_bits of all the head's slashes, so the
    column pass skips every slash cell (the band's here, the other runs' in the second launch)."""
    pres = _presence(slash_idx, n)
    w = torch.argmin(pres[..., : n + 1], dim=-1) - 1
    idx = from_band(torch.where(w + 1 >= band_min, w, -1), n, block_m)
    if vertical_idx is None:
        return idx
    b, h, _ = slash_idx.shape
    v = vertical_idx.to(torch.int64)
    cols = _sorted_unique(torch.where((v >= 0) & (v < n), v, torch.full_like(v, n)), n)
    nqb = math.ceil(n / block_m)
    bound = (torch.arange(nqb, device=cols.device) * block_m + block_m).clamp(max=n)
    cc = torch.searchsorted(cols.reshape(b * h, -1).contiguous(), bound.view(1, nqb).expand(b * h, nqb).contiguous(),
                            right=False).view(b, h, nqb)
    idx.columns = cols.to(torch.int32).contiguous()
    idx.column_count = (cc * (idx.range_count[..., :1] > 0)).to(torch.int32)
    idx.slash_map = pres[..., :n].contiguous()
    idx.slash_bits = _bits_of(pres, n)
    return idx


def from_band(width: torch.Tensor, n: int, block_m: int) -> SparseIndex:
    """width [B, H]: per head the local band of offsets 0..width (-1: none) -> SparseIndex with
    one exact range per head (ranges [B, H, 1, 1, 5], range_count [B, H, nqb]: 1, or 0 without
    a band). Fixed shapes, no host sync."""
    b, h = width.shape
    nqb = math.ceil(n / block_m)
    w = width.to(torch.int64)
    has = w >= 0
    zero = torch.zeros_like(w)
    ranges = torch.stack([zero, torch.full_like(w, n), zero, torch.where(has, w, zero), torch.ones_like(w)], -1)
    rc = has.to(torch.int32)[..., None].expand(b, h, nqb).contiguous()
    return SparseIndex(n=n, block_m=block_m, ranges=ranges.view(b, h, 1, 1, 5).to(torch.int32).contiguous(),
                       range_count=rc, ranges_exact=True)
