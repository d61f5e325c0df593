"""The Triton kernel (run by the Triton interpreter on the CPU) against the float64 dense-mask
references of tests/masks.py, and the index converters against the same masks."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from masks import (  # noqa: E402
    ashape_mask,
    block_sparse_mask,
    masked_attention_f64,
    rel_err,
    vertical_slash_mask,
)

pytest.importorskip("triton")

from sparseinfer import index as sidx  # noqa: E402
from sparseinfer import kernels, ops  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def qkv(b, hq, hkv, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def vs_indices(b, h, n, nv, ns, seed):
    """Verticals with padding and duplicates; slashes mixing runs (exact bands), scattered
    offsets (merged bands with holes), padding and duplicates."""
    g = torch.Generator().manual_seed(seed)
    vert = torch.randint(-1, n, (b, h, nv), generator=g)
    vert[..., 0] = vert[..., 1]  # duplicate
    runs = torch.randint(0, n, (b, h, 2), generator=g)
    run = (runs[..., :, None] + torch.arange(20)).reshape(b, h, 40).clamp(max=n - 1)
    scat = torch.randint(-1, n, (b, h, ns), generator=g)
    sl = torch.cat([run, scat, torch.arange(3).expand(b, h, 3)], -1)
    return vert, sl[..., torch.randperm(sl.shape[-1], generator=g)]


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


@pytest.mark.parametrize(
    "hq,hkv,d,n,dtype",
    [(2, 2, 64, 150, torch.float32), (4, 1, 128, 203, torch.float16), (8, 1, 64, 257, torch.float16),
     (8, 2, 128, 131, torch.float32), (4, 2, 64, 190, torch.bfloat16)],
)
def test_vertical_slash(hq, hkv, d, n, dtype):
    q, k, v = qkv(2, hq, hkv, n, d, dtype, seed=n)
    vert, sl = vs_indices(2, hq, n, 9, 12, seed=n + 1)
    out = ops.vertical_slash_attention(q, k, v, vert, sl, backend="triton")
    check(out, masked_attention_f64(q, k, v, vertical_slash_mask(n, vert, sl)), dtype)


@pytest.mark.parametrize("bs,n,hq,hkv,d,dtype", [(64, 300, 4, 1, 64, torch.float32), (32, 200, 8, 1, 128, torch.float16),
                                                  (16, 150, 2, 2, 64, torch.float16), (48, 170, 4, 4, 64, torch.float32),
                                                  (128, 290, 4, 2, 64, torch.float16), (20, 90, 2, 1, 64, torch.float32),
                                                  (64, 140, 4, 2, 128, torch.bfloat16)])
def test_block_sparse(bs, n, hq, hkv, d, dtype):
    q, k, v = qkv(2, hq, hkv, n, d, dtype, seed=bs)
    nb = math.ceil(n / bs)
    g = torch.Generator().manual_seed(bs + 7)
    bi = torch.randint(-1, nb, (2, hq, nb, 3), generator=g)
    bi[0, 0, :, 0] = torch.arange(nb)  # some query blocks list their own block, others not
    out = ops.block_sparse_attention(q, k, v, bi, bs, backend="triton")
    check(out, masked_attention_f64(q, k, v, block_sparse_mask(n, bi, bs)), dtype)


@pytest.mark.parametrize("sink,window,n", [(4, 30, 201), (0, 1, 150), (0, 0, 150), (10, 500, 170), (200, 64, 257)])
def test_ashape(sink, window, n):
    q, k, v = qkv(2, 4, 1, n, 64, torch.float16, seed=window)
    out = ops.ashape_attention(q, k, v, sink, window, backend="triton")
    check(out, masked_attention_f64(q, k, v, ashape_mask(n, sink, window)), torch.float16)


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4])
def test_small_tiles_loop_structures(split):
    """Small tiles: many tiles per range, unmasked middles, merged holey bands; every loop
    structure of the kernel (split 0: one masked loop per range, 1: head/middle/tail loops,
    2: one flat loop over all exact ranges, 3: flat loop over masked edges + middles,
    4: vertical-slash bands as relative tiles + edges)."""
    n, hq, hkv = 190, 4, 1
    q, k, v = qkv(2, hq, hkv, n, 128 if split % 2 else 64, torch.float32, seed=3 + split)
    vert, sl = vs_indices(2, hq, n, 7, 10, seed=4 + split)
    sl[1, :, :40] = torch.arange(40)  # a local band wide enough for unmasked middles
    s = q.shape[-1] ** -0.5
    for bm, bn in ((32, 16), (16, 32) if split != 4 else (16, 16)):  # edges need block_n | block_m
        out = kernels.vertical_slash_attention(q, k, v, vert, sl, s, config=(bm, bn, 4, 1, 1, split))
        check(out, masked_attention_f64(q, k, v, vertical_slash_mask(n, vert, sl)), torch.float32)
    out = kernels.ashape_attention(q, k, v, 5, 40, s, config=(16, 32, 4, 1, 1, split))
    check(out, masked_attention_f64(q, k, v, ashape_mask(n, 5, 40)), torch.float32)
    out = kernels.ashape_attention(q, k, v, 0, 1, s, config=(32, 16, 4, 1, 1, split))
    check(out, masked_attention_f64(q, k, v, ashape_mask(n, 0, 1)), torch.float32)
    nb = math.ceil(n / 32)
    bi = torch.randint(-1, nb, (2, hq, nb, 4), generator=torch.Generator().manual_seed(5))
    out = kernels.block_sparse_attention(q, k, v, bi, 32, s, config=(16, 16, 4, 1, 1, split))
    check(out, masked_attention_f64(q, k, v, block_sparse_mask(n, bi, 32)), torch.float32)


def test_vertical_slash_band_and_runs(monkeypatch):
    """The benchmark's shape of indices, small: sinks + scattered columns, a local band and
    distant runs of consecutive offsets (exact bands with unmasked middles); the column pass
    with its keys through TMA or gathered, its skip words tabulated or built per tile."""
    from sparseinfer.kernels import attention as katt

    n = 700
    q, k, v = qkv(1, 4, 1, n, 64, torch.float16, seed=11)
    g = torch.Generator().manual_seed(12)
    vert = torch.cat([torch.arange(5).expand(1, 4, 5), torch.randint(0, n, (1, 4, 20), generator=g)], -1)
    runs = torch.randint(150, n - 40, (1, 4, 3), generator=g)
    sl = torch.cat([torch.arange(150).expand(1, 4, 150), (runs[..., None] + torch.arange(40)).reshape(1, 4, 120)], -1)
    ref = masked_attention_f64(q, k, v, vertical_slash_mask(n, vert, sl))
    out = ops.vertical_slash_attention(q, k, v, vert, sl, backend="triton")
    check(out, ref, torch.float16)
    for bm, bn in ((64, 32), (32, 32)):  # relative tiles + edges (split 4)
        idx = sidx.from_vertical_slash(vert, sl, n, bm, block_n=bn)
        assert int(idx.tile_count.max()) > 0 and int(idx.edge_count.max()) > 0
        out = kernels.vertical_slash_attention(q, k, v, vert, sl, 64 ** -0.5, config=(bm, bn, 4, 1, 1, 4))
        check(out, ref, torch.float16)
    # an index with narrow edges (16-key tiles here; the Gluon kernel's are 32) runs on the Triton kernel merged back
    idx = sidx.from_vertical_slash(vert, sl, n, 64, block_n=32, narrow_n=16)
    assert int(idx.edge_count_narrow.max()) > 0
    check(katt.run_index(q, k, v, idx, 64 ** -0.5, 32, 4, 1, 1, 4), ref, torch.float16)
    # the column pass's keys through TMA over per-head copies (heads with fewer distinct columns,
    # duplicates or padding, than others read the next head's rows, masked) or gathered; the skip
    # words from the table per distance (128-row blocks read two words per column)
    vert2 = vert.clone()
    vert2[0, 1, 10:] = -1
    vert2[0, 2, 5:] = vert2[0, 2, 4]
    ref2 = masked_attention_f64(q, k, v, vertical_slash_mask(n, vert2, sl))
    for col_tma in (True, False):
        monkeypatch.setitem(katt.FLAGS, "VS_COL_TMA", col_tma)
        check(ops.vertical_slash_attention(q, k, v, vert2, sl, backend="triton"), ref2, torch.float16)
        for cfg in ((32, 32, 4, 1, 1, 4), (128, 64, 4, 1, 1, 3)):
            check(kernels.vertical_slash_attention(q, k, v, vert2, sl, 64 ** -0.5, config=cfg), ref2, torch.float16)
    for split in (3, 4):  # 128-row blocks: two 64-bit slash windows per gathered column
        out = kernels.vertical_slash_attention(q, k, v, vert, sl, 64 ** -0.5, config=(128, 64, 4, 1, 1, split))
        check(out, ref, torch.float16)
    with pytest.raises(ValueError, match="block_m <= 128"):
        kernels.vertical_slash_attention(q, k, v, vert, sl, 64 ** -0.5, config=(256, 64, 4, 1, 1, 3))


def test_vertical_slash_tiled_runs_cap(monkeypatch):
    """Only the nearest max_tiled exact bands become relative tiles + edges (lists sized by the cap,
    not by the number of slashes); the farther exact bands stay ranges with their exact flag cleared:
    every cell of the float64 mask still covered once, and the kernel's output unchanged."""
    from sparseinfer.kernels import attention as katt

    n, h = 400, 3
    g = torch.Generator().manual_seed(5)
    vert = torch.randint(-1, n, (2, h, 10), generator=g)
    runs = torch.cat([torch.arange(30), torch.arange(100, 120), torch.arange(200, 205), torch.arange(300, 340)])
    sl = runs.view(1, 1, -1).expand(2, h, -1).clone()
    sl[:, 2, :20] = torch.randint(0, n, (2, 20), generator=g)  # scattered: holes and short runs
    mask = vertical_slash_mask(n, vert, sl)
    full = sidx.from_vertical_slash(vert, sl, n, 64, block_n=32)
    for cap in (1, 2):
        idx = sidx.from_vertical_slash(vert, sl, n, 64, block_n=32, max_tiled=cap)
        assert idx.edges.shape[2] == cap * full.edges.shape[2] // full.ranges.shape[3]
        assert idx.ranges[0, 0, 0, :4, 4].tolist() == [1] * cap + [0] * (4 - cap)
        for b in range(2):
            for hh in range(h):
                assert torch.equal(idx.cells(b, hh), mask[b, hh]), (cap, b, hh)
    q, k, v = qkv(2, h, 1, n, 64, torch.float32, seed=6)
    ref = masked_attention_f64(q, k, v, mask)
    monkeypatch.setitem(katt.FLAGS, "VS_TILED_RUNS", 1)
    check(kernels.vertical_slash_attention(q, k, v, vert, sl, 0.125), ref, torch.float32)


def test_vertical_slash_fused_runs():
    """kernels.runs.slash_runs (one torch.sort + one launch, here interpreted) and, with a tile cap,
    kernels.runs.relative_tiles (one launch, no sort) build the same vertical-slash index as the
    torch ops, field by field and dtype by dtype: unsorted offsets with
    duplicates, padding (-1, >= n), no offset 0, runs merged into ranges with holes, a run reaching
    n - 1; int16 offsets; with and without the local band's launch, the tile cap, the band's columns,
    narrow edges. More offsets than the kernel holds take the torch ops."""
    from sparseinfer.kernels.runs import MAX_SLASHES, slash_runs

    n, h = 700, 3
    g = torch.Generator().manual_seed(1)
    vert = torch.randint(-1, n, (2, h, 20), generator=g)
    runs = torch.cat([torch.arange(100), torch.arange(150, 180), torch.arange(300, 310), torch.arange(400, 460),
                      torch.tensor([520, 520, 700, 9999]), torch.arange(660, 700)])
    pad = lambda t: torch.cat([t, torch.full((260 - t.numel(),), -1)])  # noqa: E731
    sl = torch.stack([pad(runs[torch.randperm(runs.numel(), generator=g)]), pad(torch.arange(1, 8)),
                      torch.randint(-1, n, (260,), generator=g)]).view(1, h, 260).expand(2, h, 260).clone()
    for kw in (dict(block_n=32, max_tiled=1), dict(block_n=64, max_tiled=3), dict(block_n=64, max_tiled=3, narrow_n=32),
               dict(block_n=32, band_block_m=64, band_min=16, max_tiled=2),
               dict(block_n=32, band_block_m=64, band_min=16, band_columns=True)):
        a = sidx.from_vertical_slash(vert, sl, n, 64, **kw)
        b = sidx.from_vertical_slash(vert, sl if "band_columns" in kw else sl.to(torch.int16), n, 64, fused_runs=True,
                                     **kw)
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            for name, u in vars(x).items():
                w = getattr(y, name)
                assert (u.dtype == w.dtype and torch.equal(u, w)) if isinstance(u, torch.Tensor) else u == w, (kw, name)
    big = torch.randint(-1, n, (1, 1, MAX_SLASHES), generator=g)
    assert torch.equal(sidx.from_vertical_slash(vert[:1, :1], big, n, 64, fused_runs=True).ranges,
                       sidx.from_vertical_slash(vert[:1, :1], big, n, 64).ranges)
    with pytest.raises(ValueError, match="at most"):
        slash_runs(big, n, 0, 64, None)
    with pytest.raises(ValueError, match="int16 / int32 / int64 slash_idx"):
        slash_runs(sl.float(), n, 0, 64, None)


def test_vertical_slash_local_band_launch(monkeypatch):
    """The local band of offsets 0..w as a launch of its own (wider tiles), merged into the
    launch over the rest: the index pair covers every cell once; a band that the one-launch
    index merges with a nearby run (a range with holes) leaves alone, the run stays; a short
    band stays; the result equals the one-launch result and the float64 reference, heads= /
    out= included (out strided as transformers' [B, N, H, D] layout too)."""
    from sparseinfer.kernels import attention as katt

    n, h = 300, 4
    q, k, v = qkv(2, h, 2, n, 64, torch.float16, seed=21)
    g = torch.Generator().manual_seed(22)
    vert = torch.randint(-1, n, (2, h, 10), generator=g)
    wide = torch.cat([torch.arange(100), torch.tensor([180, 181, 182])])  # band 0..99 + a distant run
    holey = torch.cat([torch.arange(100), torch.tensor([105, 106])])  # merges with 0..99 (gap < 64)
    short = torch.cat([torch.arange(10), torch.tensor([200])])  # band 0..9
    pad = lambda t: torch.cat([t, torch.full((120 - t.numel(),), -1)])  # noqa: E731
    sl = torch.stack([pad(wide), pad(holey), pad(short), pad(torch.randint(0, n, (40,), generator=g))])
    sl = sl.expand(2, h, 120).clone()
    mask = vertical_slash_mask(n, vert, sl)
    idx, band = sidx.from_vertical_slash(vert, sl, n, 64, block_n=32, band_block_m=32, band_min=16)
    widths = band.ranges[..., 0, 0, 3].tolist()
    own = band.range_count[..., 0].tolist()
    assert own[0][:3] == [1, 1, 0] and widths[0][:2] == [99, 99]  # the short band stays
    # the sort-free band width (the GPU launcher's band index, built before the rest) agrees
    w = sidx.local_band_width(sl, n)
    assert w[0].tolist() == [99, 99, 9, int(sidx._slash_runs(sl, n)[2][0, 3, 0])]
    for t in (sl[:1, :2], torch.arange(n).view(1, 1, n), torch.full((1, 1, 5), -1), torch.tensor([[[1, 2, n, n + 5]]])):
        assert torch.equal(sidx.local_band_width(t, n), sidx._slash_runs(t, n)[2][..., 0].clamp(max=n - 1)), t
    assert sidx.local_band_width(torch.arange(n).view(1, 1, n), n).item() == n - 1
    assert sidx.from_vertical_slash(vert, sl, n, 64).ranges[0, 1, 0, 0, 4] == 0  # one launch: 0..106 with holes
    assert idx.ranges[0, 1, 0, 0, 2:].tolist() == [105, 106, 1]  # the run left of the band: exact
    for b in range(2):
        for hh in range(h):
            a, c = idx.cells(b, hh), band.cells(b, hh)
            assert not (a & c).any() and torch.equal(a | c, mask[b, hh]), (b, hh)
    # the band launch with its heads' columns (FLAGS["VS_BAND_COLS"]): the second launch keeps the
    # columns of the heads without a band only; the bits from the presence map are _slash_bits'
    idx2, band2 = sidx.from_vertical_slash(vert, sl, n, 64, block_n=32, band_block_m=32, band_min=16,
                                           band_columns=True)
    assert torch.equal(band2.slash_bits, sidx._slash_bits(sidx._slash_runs(sl, n)[0], n))
    assert band2.column_count[0, 2].sum() == 0 and idx2.column_count[0, :2].sum() == 0
    assert idx2.column_count[0, 2].sum() > 0 and band2.column_count[0, :2].sum() > 0
    for b in range(2):
        for hh in range(h):
            a, c = idx2.cells(b, hh), band2.cells(b, hh)
            assert not (a & c).any() and torch.equal(a | c, mask[b, hh]), (b, hh)
    ref = masked_attention_f64(q, k, v, mask)
    for flag, cols in ((True, True), (True, False), (False, True)):
        monkeypatch.setitem(katt.FLAGS, "VS_BAND", flag)
        monkeypatch.setitem(katt.FLAGS, "VS_BAND_COLS", cols)
        out = ops.vertical_slash_attention(q, k, v, vert, sl, backend="triton")
        check(out, ref, torch.float16)
        # query blocks of 32 rows against the band launch's 64
        check(kernels.vertical_slash_attention(q, k, v, vert, sl, 0.125, config=(32, 32, 4, 1, 1, 4)), ref, torch.float16)
        heads = torch.tensor([True, False, True, False])
        base = torch.randn_like(q)
        got = ops.vertical_slash_attention(q, k, v, vert, sl, backend="triton", heads=heads, out=base.clone())
        check(got[:, heads], ref[:, heads], torch.float16)
        assert torch.equal(got[:, ~heads], base[:, ~heads])
        # out in transformers' [B, N, H, D] layout seen as [B, H, N, D] (the integration's DIRECT_OUT)
        bnhd = torch.full((2, n, h, 64), float("nan"), dtype=q.dtype)
        got = ops.vertical_slash_attention(q, k, v, vert, sl, backend="triton", out=bnhd.transpose(1, 2))
        check(bnhd.transpose(1, 2), ref, torch.float16)
        assert got.data_ptr() == bnhd.data_ptr()
    lse = torch.empty(2, h, n)
    with pytest.raises(ValueError, match="cannot be combined"):
        katt.run_index(q, k, v, band, 0.125, 32, lse_out=lse, prior=(q, lse, band.range_count[..., 0]))
    with pytest.raises(ValueError, match="lse_out: expected a contiguous float32"):
        katt.run_index(q, k, v, band, 0.125, 32, lse_out=lse[:, :, :10])


def test_noncontiguous_and_batch1():
    n = 140
    base = torch.randn(1, n, 3, 4, 64, dtype=torch.float16)  # fused-projection style views
    q = base[:, :, 0].transpose(1, 2)
    k = base[:, :, 1, :2].transpose(1, 2)
    v = base[:, :, 2, :2].transpose(1, 2)
    out = ops.ashape_attention(q, k, v, 3, 20, backend="triton")
    check(out, masked_attention_f64(q, k, v, ashape_mask(n, 3, 20)), torch.float16)


@pytest.mark.parametrize("order,tma", [(0, 0), (1, 0), (1, 1), (0, 2), (1, "auto")])
def test_program_order_and_tma(monkeypatch, order, tma):
    """Every program order and key-load path (pointer loads, 2-D TMA descriptors whose tail
    tiles read the next head's rows, 4-D descriptors on a [B, N, Hkv, D] layout) gives the
    reference's output: B=2, GQA 2, N not a multiple of any tile."""
    from sparseinfer.kernels import attention as katt

    monkeypatch.setitem(katt.FLAGS, "ORDER", order)
    monkeypatch.setitem(katt.FLAGS, "TMA", tma)
    n, hq, hkv = 150, 4, 2
    q, k, v = qkv(2, hq, hkv, n, 64, torch.float32, seed=21)
    if tma in (2, "auto"):  # the layout transformers' projections leave
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    assert katt._tma_mode(q, k, v, None) == (2 if tma == "auto" else tma)
    s = 64 ** -0.5
    vert, sl = vs_indices(2, hq, n, 7, 10, seed=22)
    sl[0, :, :40] = torch.arange(40)
    out = kernels.vertical_slash_attention(q, k, v, vert, sl, s, config=(32, 16, 4, 1, 1, 4))
    check(out, masked_attention_f64(q, k, v, vertical_slash_mask(n, vert, sl)), torch.float32)
    out = kernels.ashape_attention(q, k, v, 5, 40, s, config=(32, 32, 4, 1, 1, 1))
    check(out, masked_attention_f64(q, k, v, ashape_mask(n, 5, 40)), torch.float32)
    bi = torch.randint(-1, 5, (2, hq, 5, 3), generator=torch.Generator().manual_seed(23))
    out = kernels.block_sparse_attention(q, k, v, bi, 32, s)
    check(out, masked_attention_f64(q, k, v, block_sparse_mask(n, bi, 32)), torch.float32)


@pytest.mark.parametrize("tma", [0, "auto"])
def test_block_list_one_step_ahead(monkeypatch, tma):
    """FLAGS["PF"]: the block-sparse tile loop loads the next tile's start one step ahead (the
    last step's look-ahead masked), up to FLAGS["PF_MAX_N"] only: lists with padding and duplicates (tile
    counts 0..3) against the float64 reference, on and off; the index's rows sorted by the
    block_lists kernel (block ids as tiles, scaled in the kernel) or by torch."""
    from sparseinfer.kernels import attention as katt

    monkeypatch.setitem(katt.FLAGS, "TMA", tma)
    n, hq, hkv = 420, 4, 2
    q, k, v = qkv(2, hq, hkv, n, 64, torch.float16, seed=31)
    bi = torch.randint(-1, 14, (2, hq, 14, 3), generator=torch.Generator().manual_seed(32))
    bi[0, 0, 5] = -1  # a query block with no listed block
    bi[1, 1, 9] = 4  # the same block three times
    ref = masked_attention_f64(q, k, v, block_sparse_mask(n, bi, 32))
    for (pf, limit), lists in itertools.product(((True, 1 << 20), (True, 100), (False, 1 << 20)), (True, False)):
        monkeypatch.setitem(katt.FLAGS, "PF", pf)
        monkeypatch.setitem(katt.FLAGS, "PF_MAX_N", limit)
        monkeypatch.setitem(katt.FLAGS, "BS_LISTS", lists)  # the rows sorted by kernels.rows.block_lists or by torch
        check(kernels.block_sparse_attention(q, k, v, bi, 32, 0.125), ref, torch.float16)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_heads_option_computes_only_those_heads(backend):
    """heads=: the listed heads equal the reference, the others are zeros (the kernel visits
    nothing for them); bad values are refused."""
    n, hq, hkv = 150, 4, 2
    q, k, v = qkv(2, hq, hkv, n, 64, torch.float32, seed=31)
    on = torch.tensor([True, False, False, True])
    vert, sl = vs_indices(2, hq, n, 7, 10, seed=32)
    bi = torch.randint(-1, 3, (2, hq, 3, 2), generator=torch.Generator().manual_seed(33))
    cases = [(ops.vertical_slash_attention, (vert, sl), vertical_slash_mask(n, vert, sl)),
             (ops.block_sparse_attention, (bi, 64), block_sparse_mask(n, bi, 64)),
             (ops.ashape_attention, (4, 30), ashape_mask(n, 4, 30))]
    for op, args, mask in cases:
        out = op(q, k, v, *args, backend=backend, heads=on)
        ref = masked_attention_f64(q, k, v, mask)
        check(out[:, on], ref[:, on], torch.float32)
        assert (out[:, ~on] == 0).all()
    for bad in (torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.int64), [True] * 4):
        with pytest.raises(ValueError, match="heads"):
            ops.ashape_attention(q, k, v, 4, 30, backend=backend, heads=bad)
    # out= with heads: two selections sharing one output, each writing only its heads
    for dtype in (torch.float32, torch.float64):
        q2, k2, v2 = (t.to(dtype) for t in (q, k, v))
        first = ops.vertical_slash_attention(q2, k2, v2, vert, sl, backend=backend, heads=on)
        got = ops.block_sparse_attention(q2, k2, v2, bi, 64, backend=backend, heads=~on, out=first)
        assert got is first and got.dtype == dtype
        assert rel_err(got[:, on], masked_attention_f64(q, k, v, vertical_slash_mask(n, vert, sl))[:, on]) < 1e-4
        assert rel_err(got[:, ~on], masked_attention_f64(q, k, v, block_sparse_mask(n, bi, 64))[:, ~on]) < 1e-4
    with pytest.raises(ValueError, match="out: expected a tensor like q"):
        ops.ashape_attention(q, k, v, 4, 30, backend=backend, heads=on, out=torch.zeros(2, hq, n, 32))


def test_tma_mode_choice():
    from sparseinfer.kernels import attention as katt

    q, k, v = qkv(1, 4, 2, 64, 64, torch.float16, seed=1)
    assert katt._tma_mode(q, k, v, None) == 1  # contiguous: 2-D descriptors
    rows = torch.zeros(1, 1, 64, dtype=torch.int32)
    assert katt._tma_mode(q, k, v, rows) == 0  # gathered query rows: pointer loads
    odd = torch.randn(1, 2, 64, 65, dtype=torch.float16)[..., :64]  # rows 130 bytes apart
    assert katt._tma_mode(q, odd, odd, None) == 0
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    katt.FLAGS["TMA"] = 1
    try:
        with pytest.raises(ValueError, match="TMA mode 1"):
            katt._tma_mode(q, kt, kt, None)
        with pytest.raises(ValueError, match="q_rows"):
            katt._tma_mode(q, k, v, rows)
    finally:
        katt.FLAGS["TMA"] = "auto"


# ---------------------------------------------------------------- index converters
def _cells_equal(idx, mask):
    b, h = mask.shape[:2] if mask.dim() == 4 else (1, 1)
    for bi in range(b):
        for hi in range(h):
            m = mask[bi, hi] if mask.dim() == 4 else mask
            assert torch.equal(idx.cells(bi, hi), m), (bi, hi)


@pytest.mark.parametrize("block_m", [16, 64])
def test_index_vertical_slash(block_m):
    n = 133
    vert, sl = vs_indices(2, 3, n, 8, 15, seed=block_m)
    idx = sidx.from_vertical_slash(vert, sl, n, block_m)
    assert idx.ranges.shape == (2, 3, 1, sl.shape[-1] + 1, 5) and idx.ranges.dtype == torch.int32
    assert idx.range_count.shape == (2, 3, math.ceil(n / block_m))
    _cells_equal(idx, vertical_slash_mask(n, vert, sl))


@pytest.mark.parametrize("n,block_m,block_n,merge_gap", [(133, 16, 16, None), (133, 32, 16, 1), (190, 64, 32, None),
                                                         (300, 128, 64, 1), (257, 64, 64, None)])
def test_index_vertical_slash_relative_tiles(n, block_m, block_n, merge_gap):
    """Exact bands as relative unmasked tiles + edges (a wide local band has unmasked middles):
    the same cells, each once, and the tiles stay inside [0, n)."""
    vert, sl = vs_indices(2, 3, n, 8, 15, seed=n + block_m)
    sl[1, :, :50] = torch.arange(50) + 3
    idx = sidx.from_vertical_slash(vert, sl, n, block_m, merge_gap=merge_gap, block_n=block_n)
    assert idx.tiles_relative and idx.tiles.shape[:3] == (2, 3, 1) and idx.edges.shape[-1] == 4
    mask = vertical_slash_mask(n, vert, sl)
    _cells_equal(idx, mask)
    # the edges at most block_n / 2 keys wide in a list of their own (narrow tiles), and back
    narrow = sidx.from_vertical_slash(vert, sl, n, block_m, merge_gap=merge_gap, block_n=block_n,
                                      narrow_n=block_n // 2)
    real = narrow.edges_narrow[..., 0] > -2 ** 30
    assert bool(((narrow.edges_narrow[..., 1] - narrow.edges_narrow[..., 0]) <= block_n // 2)[real].all())
    if merge_gap == 1:  # exact runs: some edges are narrow, and blocks visit them
        assert narrow.edge_count_narrow.sum() > 0 and narrow.edge_count.sum() < idx.edge_count.sum()
    _cells_equal(narrow, mask)
    merged = sidx.merge_narrow_edges(narrow)
    assert merged.edges_narrow is None
    _cells_equal(merged, mask)
    with pytest.raises(ValueError, match="narrow_n must be in"):
        sidx.split_narrow_edges(sidx.from_vertical_slash(vert, sl, n, block_m, block_n=block_n), block_n)
    with pytest.raises(ValueError, match="block_n must divide block_m"):
        sidx.from_vertical_slash(vert, sl, n, 64, block_n=48)


@pytest.mark.parametrize("block_n,narrow_n", [(64, 32), (32, 16), (64, 0)])
def test_relative_tiles_kernel_lists(block_n, narrow_n):
    """kernels.runs.relative_tiles (interpreted): runs taken 64 at a time and query blocks 64 per
    program give index._relative_tiles' lists and counts, and with narrow_n split_narrow_edges'
    (its sorts left out), entry by entry: ~70 runs of 1-100 offsets (and padding) over 141 query blocks."""
    from sparseinfer.kernels import runs as kruns

    n, bm = 9000, 64
    g = torch.Generator().manual_seed(7)
    gaps = torch.randint(bm + 1, bm + 20, (2, 80), generator=g)
    width = torch.randint(0, 100, (2, 80), generator=g)
    lo = 100 + torch.cumsum(gaps + width, -1) - width  # runs > bm offsets apart, some past n
    hi = lo + width
    lo, hi = (torch.where(lo < n, x, torch.full_like(x, n)).view(1, 2, 80) for x in (lo, hi))
    assert bool((lo == n).any()) and bool(((lo < n).sum(-1) > 64).all())
    ns = 6000  # sizes the unmasked list like a head of ns - 1 slashes
    got = kruns.relative_tiles(lo, hi, ns, n, bm, block_n, narrow_n)
    ref = sidx.SparseIndex(n=n, block_m=bm, ranges=torch.zeros(1, 2, 1, 1, 5, dtype=torch.int32),
                           range_count=torch.zeros(1, 2, 141, dtype=torch.int32))
    ref.tiles, ref.tile_count, ref.edges, ref.edge_count = sidx._relative_tiles(
        lo, torch.clamp(hi, max=n), (lo < n).long(), ns, n, bm, block_n)
    ref.block_n = block_n
    want = [ref.tiles, ref.tile_count, ref.edges, ref.edge_count]
    if narrow_n:
        sidx.split_narrow_edges(ref, narrow_n)
        want = [ref.tiles, ref.tile_count, ref.edges, ref.edge_count, ref.edges_narrow, ref.edge_count_narrow]
        assert int(ref.edge_count_narrow.sum()) > 0
    assert len(got) == len(want)
    for name, x, y in zip(("tiles", "tile_count", "edges", "edge_count", "edges_narrow", "edge_count_narrow"), got, want):
        assert x.dtype == y.dtype and torch.equal(x, y), name
    with pytest.raises(ValueError, match="narrow_n must be in"):
        kruns.relative_tiles(lo, hi, ns, n, bm, block_n, block_n)


def test_index_vertical_slash_columns_under_the_first_run():
    """A query block does not visit the columns that the head's first slash run (offsets 0..w)
    covers for all its rows (c >= last row - w); the cells stay those of the dense mask."""
    n, bm = 300, 32
    vert, sl = vs_indices(2, 2, n, 40, 25, seed=5)
    sl[0, 0, :60] = torch.arange(60)  # head (0, 0): first run 0..59 at least
    idx = sidx.from_vertical_slash(vert, sl, n, bm)
    _cells_equal(idx, vertical_slash_mask(n, vert, sl))
    bound = (torch.arange(idx.column_count.shape[-1]) * bm + bm).clamp(max=n)
    causal = torch.stack([torch.searchsorted(idx.columns[b, h].contiguous(), bound.int()) for b in range(2)
                          for h in range(2)]).view(2, 2, -1)
    assert (idx.column_count <= causal).all()
    assert (idx.column_count[0, 0] <= causal[0, 0] - 2).sum() >= 3  # the wide first run drops columns


def test_index_vertical_slash_runs():
    """Consecutive offsets become one exact band; far-apart runs stay separate."""
    n = 1000
    sl = torch.tensor([[[5, 3, 4, 500, 501, 502, -1, 4]]])
    vert = torch.tensor([[[-1, 7]]])
    idx = sidx.from_vertical_slash(vert, sl, n, 64, merge_gap=1)
    r = idx.ranges[0, 0, 0]
    assert r[:3, 2:].tolist() == [[0, 0, 1], [3, 5, 1], [500, 502, 1]]
    assert idx.range_count[0, 0].tolist()[:8] == [2] * 7 + [3]
    assert idx.columns[0, 0].tolist() == [7, n]
    # default: bands closer than block_m merge into one band with holes (exact = 0)
    idx = sidx.from_vertical_slash(vert, sl, n, 64)
    assert idx.ranges[0, 0, 0, :2, 2:].tolist() == [[0, 5, 0], [500, 502, 1]]



@pytest.mark.parametrize("bs,block_m,block_n", [(32, 32, 32), (64, 16, 32), (48, 16, 16)])
def test_index_block_sparse(bs, block_m, block_n):
    n = 170
    nb = math.ceil(n / bs)
    bi = torch.randint(-1, nb, (2, 2, nb, 4), generator=torch.Generator().manual_seed(bs))
    idx = sidx.from_block_sparse(bi, bs, n, block_m, block_n)
    _cells_equal(idx, block_sparse_mask(n, bi, bs))


@pytest.mark.parametrize("sink,window", [(3, 17), (0, 0), (50, 200)])
def test_index_ashape(sink, window):
    n = 150
    idx = sidx.from_ashape(n, sink, window, 1, 1, 32, "cpu")
    _cells_equal(idx, ashape_mask(n, sink, window))


def test_import_error_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "try:\n    import sparseinfer.kernels\nexcept ImportError:\n    print('ImportError')\n"
        "import torch; from sparseinfer import ops\n"
        "q = torch.randn(1, 2, 40, 16)\n"
        "o = ops.ashape_attention(q, q, q, 2, 8)\n"
        "print(tuple(o.shape))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert "ImportError" in r.stdout and "(1, 2, 40, 16)" in r.stdout, r.stdout + r.stderr


def test_work_fraction():
    n = 4096
    g = torch.Generator().manual_seed(0)
    band = torch.arange(256).expand(1, 2, 256)
    vert = torch.randint(0, n, (1, 2, 50), generator=g)
    near = sidx.from_vertical_slash(vert, band, n, 64).work_fraction(64)
    scattered = sidx.from_vertical_slash(vert, torch.randint(0, n, (1, 2, 256), generator=g), n, 64).work_fraction(64)
    assert near.shape == (1, 2) and (near > 0.05).all() and (near < 0.3).all()
    assert (scattered > 0.8).all()
    full = torch.arange(n // 64).expand(1, 1, n // 64, n // 64)
    dense = sidx.from_block_sparse(full, 64, n, 64).work_fraction(64, samples=1000)
    assert abs(float(dense) - 1.0) < 0.05


def test_sorted_rows_split_equals_the_passes_it_replaces():
    """kernels.rows.sorted_rows_split (bisection per row, interpreter here) on ascending rows with
    -1 padding: rows with and without their own block, empty rows, full rows, entries past the
    own block; equal to the torch passes of index.from_block_sparse; bad input refused."""
    from sparseinfer.kernels.rows import sorted_rows_split

    g = torch.Generator().manual_seed(5)
    b, h, nb, k = 2, 3, 37, 9
    rows = []
    for _ in range(b * h):
        for q in range(nb):
            pool = torch.randperm(nb, generator=g)[: int(torch.randint(0, k + 1, (1,), generator=g))]
            if q % 3 == 0:  # own block listed
                pool = torch.cat([pool[pool != q][: k - 1], torch.tensor([q])])
            s = sorted(set(pool.tolist()))[:k]
            rows.append(s + [-1] * (k - len(s)))
    idx = torch.tensor(rows, dtype=torch.int32).view(b, h, nb, k)
    qb = torch.arange(nb, dtype=torch.int32).view(1, 1, nb, 1)
    before, diag = sorted_rows_split(idx)
    assert torch.equal(before, ((idx >= 0) & (idx < qb)).sum(-1, dtype=torch.int32))
    assert torch.equal(diag, (idx == qb).any(-1))
    assert int(diag.sum()) >= b * h * 12 and int((before == 0).sum()) > 0  # the cases occur
    assert all(torch.equal(x, y) for x, y in zip(sorted_rows_split(idx.long()), (before, diag)))  # int64 rows too
    with pytest.raises(ValueError, match="sorted_rows_split"):
        sorted_rows_split(idx.float())


@pytest.mark.parametrize("k", [7, 16, 100])
def test_block_lists_equals_sorted_unique(monkeypatch, k):
    """kernels.rows.block_lists (a bitonic sort per row in registers, repeats dropped, interpreter
    here) against index._sorted_unique's torch sorts: rows in any order with -1 padding, repeats,
    blocks past the row's own, rows with nothing causal; and from_block_sparse built either way
    visits the same cells."""
    from sparseinfer import index as sidx
    from sparseinfer.kernels import attention as katt
    from sparseinfer.kernels.rows import block_lists

    g = torch.Generator().manual_seed(k)
    b, h, nb = 2, 3, 40
    idx = torch.randint(-1, nb, (b, h, nb, k), generator=g)
    idx[0, 0, 7] = -1  # nothing listed
    idx[1, 2, 30] = 5  # one block, many times
    idx[0, 1, 12, : min(k, 3)] = 12  # the own block only
    tiles, before, diag = block_lists(idx)
    qb = torch.arange(nb).view(1, 1, nb, 1)
    big = nb + 1
    want = sidx._sorted_unique(torch.where((idx >= 0) & (idx < qb), idx, big).to(torch.int32), big)
    assert torch.equal(before, (want < big).sum(-1, dtype=torch.int32))
    assert torch.equal(diag, (idx == qb).any(-1))
    for r in range(b * h * nb):
        c = int(before.view(-1)[r])
        assert torch.equal(tiles.view(-1, k)[r, :c], want.view(-1, k)[r, :c])
    with pytest.raises(ValueError, match="block_lists"):
        block_lists(idx.float())
    splits = []  # index.row_split (what the kept density counts) both ways, and on sorted rows
    for lists in (True, False):
        monkeypatch.setitem(katt.FLAGS, "BS_LISTS", lists)
        splits.append(sidx.row_split(idx))
    srt = torch.where(torch.arange(k).view(1, 1, 1, k) < before[..., None], tiles, -1)
    srt = torch.where((torch.arange(k) == before[..., None]) & diag[..., None], qb.expand_as(srt).int(), srt)
    splits.append(sidx.row_split(srt, sorted_blocks=True))
    for got in splits:
        assert torch.equal(got[0], before) and torch.equal(got[1], diag)
    n = nb * 16 - 5
    built = []
    for lists in (True, False):
        monkeypatch.setitem(katt.FLAGS, "BS_LISTS", lists)
        built.append(sidx.from_block_sparse(idx, 16, n, 16, 16))
    assert built[0].tile_scale == 16 and built[1].tile_scale == 1
    assert torch.equal(built[0].tile_count, built[1].tile_count) and torch.equal(built[0].ranges, built[1].ranges)
    for bb, hh in ((0, 0), (1, 2)):
        assert torch.equal(built[0].cells(bb, hh), built[1].cells(bb, hh))


def _sorted_lists(b, h, nb, k, dens, seed):
    """Ascending rows (-1 padding) of a random causal keep map in which neighbouring query rows and
    key blocks often agree (so pair blocks occur), own block listed, cut to k entries."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, h, nb, nb, generator=g) < dens
    keep[:, :, 1::2] |= keep[:, :, 0:nb - 1:2] & (torch.rand(b, h, nb // 2, nb, generator=g) < 0.9)
    keep[..., 1::2] |= keep[..., 0::2][..., :nb // 2] & (torch.rand(b, h, nb, nb // 2, generator=g) < 0.9)
    keep &= torch.ones(nb, nb, dtype=torch.bool).tril()
    keep |= torch.eye(nb, dtype=torch.bool)
    idx = torch.full((b, h, nb, k), -1, dtype=torch.int64)
    for bi, hi, r in itertools.product(range(b), range(h), range(nb)):
        v = keep[bi, hi, r].nonzero().flatten()[:k]
        idx[bi, hi, r, :len(v)] = v
    return idx


@pytest.mark.parametrize("nb,k,dtype,dense_from", [(9, 6, torch.int64, None), (16, 16, torch.int32, None),
                                                   (33, 40, torch.int32, 20), (7, 1, torch.int64, None)])
def test_pair_split_equals_set_reference(nb, k, dtype, dense_from):
    """kernels.rows.pair_split (bisection into the partner row, interpreter here) against a set
    reference: pair J of query pair I iff J < I, both rows list 2J and 2J + 1 (a missing odd last
    row counts as listing them), both rows below dense_from; each row's rest = its entries below
    its own block minus the pair blocks'; -1 after the pairs."""
    from sparseinfer.kernels.rows import pair_split, sorted_rows_split

    idx = _sorted_lists(2, 3, nb, k, 0.6, seed=nb).to(dtype)
    before, _ = sorted_rows_split(idx)
    pairs, pc, rest, rc = pair_split(idx, before, dense_from)
    limit = nb if dense_from is None else dense_from
    found = 0
    for bi, hi in itertools.product(range(2), range(3)):
        sets = [{int(x) for x in idx[bi, hi, q] if 0 <= x < q} for q in range(nb)]
        for q in range(nb):
            p = q ^ 1 if q ^ 1 < nb else q
            want = [j for j in range(q // 2) if max(q, p) < limit and {2 * j, 2 * j + 1} <= sets[q] & sets[p]]
            if q % 2 == 0:
                c = int(pc[bi, hi, q // 2])
                assert pairs[bi, hi, q // 2, :c].tolist() == want
                assert (pairs[bi, hi, q // 2, c:] == -1).all()
                found += c
            covered = {x for j in want for x in (2 * j, 2 * j + 1)}
            assert rest[bi, hi, q, :int(rc[bi, hi, q])].tolist() == sorted(sets[q] - covered)
    assert found > 0 or k == 1
    with pytest.raises(ValueError, match="pair_split"):
        pair_split(idx.float(), before)


@pytest.mark.parametrize("n,hq,hkv,d,dtype,dense_from,heads", [
    (300, 2, 1, 64, torch.float32, None, None), (517, 4, 2, 64, torch.bfloat16, 5, None),
    (640, 4, 1, 128, torch.float16, None, (True, False, True, True))])
def test_block_pairs_two_launches(monkeypatch, n, hq, hkv, d, dtype, dense_from, heads):
    """FLAGS["BS_PAIRS"]: sorted 64-block lists as pair blocks (128 x 128 tiles, query pairs) plus
    the rest (64 x 64 tiles) merging the first launch's rows, against the float64 reference, with
    a dense tail, GQA, heads (the others zeros, or kept in a given out); off = the one-launch path."""
    from sparseinfer.kernels import attention as katt
    from sparseinfer.kernels import rows as krows

    q, k, v = qkv(2 if dtype == torch.bfloat16 else 1, hq, hkv, n, d, dtype, seed=n)
    nb = math.ceil(n / 64)
    idx = _sorted_lists(q.shape[0], hq, nb, nb, 0.5, seed=n + 1)
    on = None if heads is None else torch.tensor(heads)
    mask = block_sparse_mask(n, idx, 64)
    if dense_from is not None:
        mask = mask | ((torch.arange(n) // 64 >= dense_from).view(n, 1) & torch.ones(n, n, dtype=torch.bool).tril())
    ref = masked_attention_f64(q, k, v, mask)
    seen = []
    split = krows.pair_split
    monkeypatch.setattr(krows, "pair_split", lambda *a: seen.append(split(*a)) or seen[-1])
    for pairs in (True, False):
        monkeypatch.setitem(katt.FLAGS, "BS_PAIRS", pairs)
        out = ops.block_sparse_attention(q, k, v, idx, 64, backend="triton", sorted_blocks=True,
                                         dense_from=dense_from, heads=on)
        if on is None:
            check(out, ref, dtype)
        else:
            check(out[:, on], ref[:, on], dtype)
            assert (out[:, ~on] == 0).all()
            keep = torch.full_like(q, 7.0)
            got = ops.block_sparse_attention(q, k, v, idx, 64, backend="triton", sorted_blocks=True, heads=on, out=keep)
            assert got is keep and (keep[:, ~on] == 7.0).all()
            check(keep[:, on], ref[:, on], dtype)
    assert len(seen) == (2 if on is not None else 1) and int(seen[0][1].sum()) > 0  # pair blocks ran
    if on is None:  # into transformers' [B, N, H, D] layout seen as [B, H, N, D] (integration.DIRECT_OUT)
        monkeypatch.setitem(katt.FLAGS, "BS_PAIRS", True)
        buf = torch.full((q.shape[0], n, hq, d), float("nan"), dtype=dtype)
        got = ops.block_sparse_attention(q, k, v, idx, 64, backend="triton", sorted_blocks=True,
                                         dense_from=dense_from, out=buf.transpose(1, 2))
        check(buf.transpose(1, 2), ref, dtype)
        assert got.data_ptr() == buf.data_ptr()
    # unordered rows (shuffled, repeats, -1 among them): sorted by kernels.rows.block_lists first
    monkeypatch.setitem(katt.FLAGS, "BS_PAIRS", True)
    monkeypatch.setitem(katt.FLAGS, "BS_LISTS", True)
    g = torch.Generator().manual_seed(n + 2)
    mixed = torch.cat([idx, idx[..., :3], torch.full_like(idx[..., :2], -1)], -1)
    mixed = mixed[..., torch.randperm(mixed.shape[-1], generator=g)]
    seen.clear()
    out = ops.block_sparse_attention(q, k, v, mixed, 64, backend="triton", dense_from=dense_from, heads=on)
    check(out if on is None else out[:, on], ref if on is None else ref[:, on], dtype)
    assert len(seen) == 1 and int(seen[0][1].sum()) > 0
