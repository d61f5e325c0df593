"""Index estimation and exact density counts."""
import math

import pytest
import torch

from masks import ashape_mask, block_sparse_mask, vertical_slash_mask
from sparseinfer.patterns import PATTERNS, resolve_budget
from sparseinfer.patterns import block_sparse as bs
from sparseinfer.patterns import vertical_slash as vs
from sparseinfer.patterns.ashape import ashape_density


def _pairs(n):
    return n * (n + 1) / 2


def test_diagonal_sums_brute_force():
    g = torch.Generator().manual_seed(0)
    L, n = 6, 23
    p = torch.rand(2, 3, L, n, generator=g)
    ref = torch.zeros(2, 3, n)
    for t in range(L):
        for j in range(n):
            if (n - L + t) - j >= 0:
                ref[..., (n - L + t) - j] += p[..., t, j]
    causal = torch.arange(n)[None, :] <= torch.arange(n - L, n)[:, None]
    assert torch.allclose(vs.diagonal_sums(p * causal), ref, atol=1e-6)


def test_densities_count_the_mask_cells():
    n = 97
    g = torch.Generator().manual_seed(1)
    vi = torch.randint(-1, n, (2, 3, 11), generator=g)
    si = torch.randint(-1, n, (2, 3, 8), generator=g)
    want = vertical_slash_mask(n, vi, si).double().sum((-1, -2)) / _pairs(n)
    assert torch.allclose(vs.vertical_slash_density(n, vi, si).double(), want, atol=1e-6)
    bi = torch.randint(-1, 4, (2, 3, 4, 2), generator=g)
    want = block_sparse_mask(n, bi, 32).double().sum((-1, -2)) / _pairs(n)
    assert torch.allclose(bs.block_sparse_density(n, bi, 32).double(), want, atol=1e-6)
    for sink, window in [(0, 0), (5, 0), (3, 9), (40, 40), (200, 1)]:
        want = ashape_mask(n, sink, window).double().sum() / _pairs(n)
        assert abs(float(ashape_density(n, sink, window)) - float(want)) < 1e-6


def test_vertical_slash_estimate_finds_planted_structure():
    # keys 100 and 150 are "heavy" for every query; offset 90 is a strong diagonal
    torch.manual_seed(0)
    b, hq, hkv, n, d = 1, 4, 2, 300, 64
    q = torch.randn(b, hq, n, d) * 0.1
    k = torch.randn(b, hkv, n, d) * 0.1
    q[..., 0] = 4.0
    k[:, :, [100, 150], 0] = 4.0
    pos = torch.randn(n, d)  # query i matches key i - 90
    q[..., 1:] += 0.6 * pos[:, 1:]
    k[..., 1:] += 0.6 * torch.roll(pos, -90, dims=0)[:, 1:]
    v_idx, s_idx = vs.estimate(q, k, vertical=32, slash=66)
    assert v_idx.shape == (1, 4, 32) and s_idx.shape == (1, 4, 66)
    for h in range(hq):
        vset, sset = set(v_idx[0, h].tolist()), set(s_idx[0, h].tolist())
        assert {100, 150} <= vset and set(range(vs.INIT_TOKENS)) <= vset
        assert 90 in sset and 300 - 1 not in sset and set(range(vs.LOCAL_OFFSETS)) <= sset


def test_block_sparse_estimate_is_causal_and_keeps_diagonal():
    torch.manual_seed(1)
    q, k = torch.randn(2, 6, 200, 32), torch.randn(2, 3, 200, 32)
    idx = bs.estimate(q, k, topk=3, block_size=64)
    nb = math.ceil(200 / 64)
    assert idx.shape == (2, 6, nb, 3)
    for qb in range(nb):
        row = idx[:, :, qb]
        assert (row <= qb).all()
        assert (row == qb).any(-1).all()  # diagonal kept
        assert ((row >= 0).sum(-1) == min(3, qb + 1)).all()  # padding only where fewer causal blocks


def test_block_sparse_estimate_rejects_a_scale_that_is_not_positive():
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    for bad in (0.0, -0.25):
        with pytest.raises(ValueError, match="expected a positive scale"):
            bs.estimate(q, k, topk=2, block_size=32, scale=bad)


def test_pool_blocks_tail_mean():
    x = torch.arange(10.0).reshape(1, 1, 10, 1)
    assert bs.pool_blocks(x, 4).flatten().tolist() == [1.5, 5.5, 8.5]
    # a strided bf16 view (heads transposed out of [B, N, H, D]): float32 means of the same values
    y = torch.randn(2, 70, 3, 8).bfloat16().transpose(1, 2)
    got = bs.pool_blocks(y, 16)
    want = torch.stack([y[:, :, i:i + 16].double().mean(2) for i in range(0, 70, 16)], 2)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-6)


def test_block_sparse_estimate_triton_topk_matches_torch(monkeypatch):
    """The sort-free Triton top-k (what CUDA scores take) keeps the same blocks as torch.topk,
    padding included (rows with fewer causal blocks than topk)."""
    torch.manual_seed(2)
    q, k = torch.randn(1, 4, 700, 32), torch.randn(1, 2, 700, 32)
    sets = []
    for mode in (False, True):
        monkeypatch.setattr(bs, "TOPK_KERNEL", mode)
        idx = bs.estimate(q, k, topk=5, block_size=32)
        assert idx.shape == (1, 4, 22, 5) and idx.dtype == torch.int64
        sets.append(idx.sort(-1).values)
    assert torch.equal(sets[0], sets[1])
    assert (sets[1][0, 0, 0] == torch.tensor([-1, -1, -1, -1, 0])).all()


@pytest.mark.parametrize("value,n,want", [(10, 100, 10), (500, 100, 100), (0.05, 1000, 50), (1.0, 7, 7)])
def test_resolve_budget(value, n, want):
    assert resolve_budget("x", value, n) == want


@pytest.mark.parametrize("value", [-1, 0.0, 1.5, "10", True])
def test_resolve_budget_rejects(value):
    with pytest.raises(ValueError, match="x: expected"):
        resolve_budget("x", value, 100)


@pytest.mark.parametrize("name,opts", [("vertical_slash", {"vertical": -3}), ("vertical_slash", {"last_q": 0}),
                                       ("block_sparse", {"block_size": 0}), ("ashape", {"window": 2.0})])
def test_pattern_options_validated(name, opts):
    with pytest.raises(ValueError):
        PATTERNS[name](**opts)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_selection_density_matches_op_mask(name):
    from sparseinfer.patterns.base import combined_density

    torch.manual_seed(2)
    q, k = torch.randn(1, 4, 130, 64), torch.randn(1, 2, 130, 64)
    q[:, 2:] *= 4  # peaked heads, so flexprefill picks both of its patterns
    pat = PATTERNS[name](**{"ashape": {"sink": 8, "window": 16}, "vertical_slash": {"vertical": 10, "slash": 12},
                            "block_sparse": {"topk": 2, "block_size": 32},
                            "xattention": {"tau": 0.5, "stride": 4, "block_size": 32},
                            "flexprefill": {"gamma": 0.6, "tau": 0.3, "block_size": 32}}[name])
    parts = pat.select(q, k, 0.125)
    mask = torch.zeros(1, 4, 130, 130, dtype=torch.bool)
    for sel in parts:
        kw = sel.kwargs
        if sel.op == "ashape_attention":
            m = ashape_mask(130, kw["sink"], kw["window"]).expand(1, 4, 130, 130)
        elif sel.op == "vertical_slash_attention":
            m = vertical_slash_mask(130, kw["vertical_idx"], kw["slash_idx"])
        else:
            m = block_sparse_mask(130, kw["block_idx"], kw["block_size"])
        heads = torch.ones(4, dtype=torch.bool) if sel.heads is None else sel.heads
        mask = torch.where(heads[None, :, None, None], m, mask)
        assert sel.density.shape == (1, 4)
    want = mask.double().sum((-1, -2)) / _pairs(130)
    assert torch.allclose(combined_density(parts).double(), want, atol=1e-6)
