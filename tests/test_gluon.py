"""The warp-specialised Gluon kernel (sparseinfer/kernels/gluon.py): which indices and calls it
serves, and that it compiles for sm_90 with the resources its configs were measured with. Gluon has
no interpreter: its numerics are checked on the GPU by benchmarks/gluon_ab.py and attention.py
against the float32 reference (results in benchmarks/results/gluon_ab*.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from sparseinfer import index as sidx  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402
from sparseinfer.kernels import gluon as kg  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _blocks(h, n, bs, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // bs)
    qb = torch.arange(nb).view(1, 1, nb, 1)
    return (torch.rand(1, h, nb, k, generator=g) * (qb + 1)).long()


def test_index_kind_serves_block_lists_and_range_launches():
    n = 1000
    assert kg.index_kind(sidx.from_block_sparse(_blocks(2, n, 64, 5), 64, n, 64, 64), 128, 64) == ("tiles", None)
    assert kg.index_kind(sidx.from_ashape(n, 16, 200, 1, 2, 128, "cpu"), 128, 128) == ("ranges", None)
    # vertical-slash's band launch with its heads' columns (exact ranges, skip words from slash_bits)
    vert = torch.tensor([[[0, 5, 300]]]).expand(1, 2, 3)
    sl = torch.cat([torch.arange(40), torch.tensor([90, 91])]).view(1, 1, 42).expand(1, 2, 42)
    band = sidx.band_index(sl, n, 128, 16, vertical_idx=vert)
    assert band.ranges_exact and band.columns is not None
    assert kg.index_kind(band, 128, 128) == ("ranges", None)
    # vertical-slash's second launch: relative 64 x 64 tiles, edges, ranges with holes, columns
    sl = torch.cat([torch.arange(40), torch.tensor([90, 91, 300, 302])]).view(1, 1, 44).expand(1, 2, 44)
    idx, band = sidx.from_vertical_slash(vert, sl, n, 64, block_n=64, band_block_m=128, band_min=16, max_tiled=64)
    assert idx.tiles_relative and idx.edges is not None and idx.slash_map is not None
    assert (idx.ranges[..., 4] == 0).any()  # a range with holes (300, 302) is served too
    assert kg.index_kind(idx, 128, 64) == ("vs", None)


@pytest.mark.parametrize("case", ["head_dim", "tiles128", "ranges64", "block_m64", "vertical_slash", "holes",
                                  "vs_head_dim", "vs_block_m128"])
def test_index_kind_refuses_what_was_not_measured(case):
    n = 1000
    if case == "head_dim":
        idx, d, bn, words = sidx.from_block_sparse(_blocks(2, n, 64, 5), 64, n, 64, 64), 64, 64, "head_dim 64"
    elif case == "tiles128":
        idx, d, bn, words = sidx.from_block_sparse(_blocks(2, n, 128, 3), 128, n, 128, 128), 128, 128, "128 x 128"
    elif case == "ranges64":
        idx, d, bn, words = sidx.from_ashape(n, 16, 200, 1, 2, 128, "cpu"), 128, 64, "128 x 64"
    elif case == "block_m64":
        idx, d, bn, words = sidx.from_ashape(n, 16, 200, 1, 2, 64, "cpu"), 128, 128, "64 x 128"
    elif case == "vertical_slash":
        vert = torch.tensor([[[0, 5, 300]]]).expand(1, 2, 3)
        sl = torch.tensor([[[0, 1, 2, 40, 41, 90]]]).expand(1, 2, 6)
        idx, d, bn, words = sidx.from_vertical_slash(vert, sl, n, 64), 128, 64, "gathered columns"
    elif case in ("vs_head_dim", "vs_block_m128"):  # the second launch, on what was not measured
        vert = torch.tensor([[[0, 5, 300]]]).expand(1, 2, 3)
        sl = torch.arange(100).view(1, 1, 100).expand(1, 2, 100)
        bm = 128 if case == "vs_block_m128" else 64
        idx = sidx.from_vertical_slash(vert, sl, n, bm, block_n=64, max_tiled=64)
        d, bn, words = (64, 64, "head_dim 64") if case == "vs_head_dim" else (128, 64, "128 x 64")
    else:  # 128-row ranges with holes: the kernel cannot test the slash map
        vert = torch.tensor([[[0, 5, 300]]]).expand(1, 2, 3)
        sl = torch.tensor([[[0, 1, 2, 40, 41, 90]]]).expand(1, 2, 6)
        idx = sidx.from_vertical_slash(vert, sl, n, 128)
        idx.columns = idx.column_count = None
        d, bn, words = 128, 128, "slash map"
    kind, why = kg.index_kind(idx, d, bn)
    assert kind is None and words in why


def test_reason_and_run_on_cpu_tensors():
    n = 256
    q = torch.randn(1, 2, n, 128)
    k = v = torch.randn(1, 1, n, 128)
    idx = sidx.from_block_sparse(_blocks(2, n, 64, 3), 64, n, 64, 64)
    assert kg.reason(q, k, v, idx, 64) == "not a CUDA tensor"
    with pytest.raises(ValueError, match="does not serve this call: not a CUDA tensor"):
        kg.run(q, k, v, idx, 0.1)
    # the library keeps CPU tensors on the interpreted Triton kernel whatever FLAGS["GLUON"] says
    assert katt.FLAGS["GLUON"] is True
    out = katt.block_sparse_attention(q, k, v, _blocks(2, n, 64, 3), 64, 0.1)
    assert out.shape == q.shape and torch.isfinite(out).all()
    # vertical-slash's band launch takes its columns only where the Gluon kernel serves it
    assert kg.band_reason(q, k, v, 128, 128) == "not a CUDA tensor"
    assert "head_dim 64" in kg.band_reason(q[..., :64], k[..., :64], v[..., :64], 128, 128)
    assert "64 x 64" in kg.band_reason(q, k, v, 64, 64)


def test_tma_ok_needs_a_contiguous_last_dim_and_aligned_strides():
    t = torch.zeros(2, 4, 64, 128, dtype=torch.bfloat16)
    assert kg._tma_ok(t) and kg._tma_ok(t.transpose(1, 2))  # 16-byte multiples in any order
    assert not kg._tma_ok(t.transpose(2, 3))  # last dim strided
    assert kg._tma_ok(t[..., :60])  # rows 256 bytes apart: a narrower box is fine
    assert not kg._tma_ok(torch.zeros(2, 4, 64, 132, dtype=torch.bfloat16)[..., :128])  # rows 264 bytes apart
    assert not kg._tma_ok(torch.zeros(t.numel() + 1, dtype=torch.bfloat16)[1:].view(t.shape))  # base 2 bytes off


def test_compiles_for_sm90_with_the_measured_resources():
    """The configs compile for sm_90 (stand-in driver, triton's ptxas), the range config also with
    the column pass: no spills, the block-list config and vertical-slash's second launch leave room
    for two programs per SM (as measured), the range config for one; the PTX
    has the register hand-over, wgmma, TMA and mbarrier waits the design relies on, and ptxas does
    not serialize the wgmma (its C7511 note, e.g. for want of registers)."""
    res = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py")], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    per_sm = 228 * 1024
    for kind, programs, warps in (("tiles", 2, 8), ("ranges", 1, 12), ("ranges+columns", 1, 12), ("vs", 2, 8),
                                  ("vs+prior-loads", 2, 8)):
        r = info[kind]
        assert r["local"] == 0, (kind, r)
        assert programs * (r["shared"] + 1024) <= per_sm, (kind, r)
        assert r["warps"] == warps, (kind, r)
        assert r["regs"] * 32 * warps * programs <= 65536, (kind, r)
        assert r["setmaxnreg"] and r["wgmma"] and r["tma"] and r["mbarrier"], (kind, r)
        assert not r["wgmma_serialized"], (kind, r)  # ptxas kept the wgmma pipeline (no C7511)
    # the second launch's default brings the band launch's rows through a TMA copy of their own (prior_tma)
    assert info["vs"]["tma_copies"] > info["vs+prior-loads"]["tma_copies"], info
