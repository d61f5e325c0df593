"""Fused Deja Vu selection (sparseinfer.kernels.predict, Triton interpreter on the CPU) and the
blocked selection rule (sparseinfer.contextual.dejavu.blocked_top_mask), against float64 and
brute-force references."""
import pytest
import torch
import torch.nn.functional as F

from sparseinfer.contextual.dejavu import _unpack, blocked_top_indices, blocked_top_mask, quantized
from sparseinfer.kernels.predict import dejavu_select, dejavu_select_int4


def _brute_force(scores: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Per row, per block: Python's sorted() on (score desc, position asc); kb by the floor formula."""
    n = scores.shape[-1]
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for s0 in range(0, n, block):
            e0 = min(s0 + block, n)
            kb = k * e0 // n - k * s0 // n
            order = sorted(range(s0, e0), key=lambda i: (-float(scores[r, i]), i))
            out[r, order[:kb]] = True
    return out


def test_blocked_rule_matches_brute_force_and_global_top_k():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 100, generator=g, dtype=torch.float64)
    s[0, 10:20] = 0.5  # ties: the lower positions go first
    for k, block in [(37, 16), (50, 32), (99, 7), (1, 64), (100, 8)]:
        m = blocked_top_mask(s, k, block)
        assert torch.equal(m, _brute_force(s, k, block))
        assert (m.sum(-1) == k).all()
        idx = blocked_top_indices(s, k, block)
        assert idx.dtype == torch.int32 and (idx.diff(dim=-1) > 0).all() and m.gather(1, idx.long()).all()
    want = _brute_force(s, 30, 100)
    assert torch.equal(want[2], torch.zeros(100, dtype=torch.bool).scatter_(0, s[2].topk(30).indices, True))
    assert torch.equal(blocked_top_mask(s, 30, None), want)  # one block: the global top-k
    assert torch.equal(blocked_top_mask(s, 30, 512), want)
    nan = s.clone()
    nan[1, :40] = float("nan")  # NaN ranks last
    assert not blocked_top_mask(nan, 50, None)[1, :40].any()
    with pytest.raises(ValueError, match="expected an int k"):
        blocked_top_mask(s, 0, 16)
    with pytest.raises(ValueError, match="block None or a positive int"):
        blocked_top_mask(s, 5, 0)


@pytest.mark.parametrize("rows,hid,rank,inter,k,block,glu,dtype", [
    (1, 96, 24, 200, 90, 64, True, torch.float32),      # blocks of 64, last block partial
    (3, 70, 16, 130, 77, 32, False, torch.float32),     # linear kind with bias, odd sizes
    (2, 64, 32, 100, 37, 256, True, torch.bfloat16),    # block >= I: the global top-k
    (9, 48, 8, 64, 20, 16, False, torch.float16),       # more rows than one launch takes
])
def test_fused_selection_equals_the_rule_on_float64_scores(rows, hid, rank, inter, k, block, glu, dtype):
    g = torch.Generator().manual_seed(rows + 10)
    x = torch.randn(rows, hid, generator=g).to(dtype)
    A = (torch.randn(rank, hid, generator=g) * 0.2).to(dtype)
    B = (torch.randn(2 * inter if glu else inter, rank, generator=g) * 0.2).to(dtype)
    b = None if glu else torch.randn(inter, generator=g).to(dtype)
    s = (x.double() @ A.double().T) @ B.double().T
    s = (F.silu(s[:, :inter]) * s[:, inter:]).abs() if glu else s + b.double()
    want = blocked_top_indices(s, k, block)
    # the kept / dropped boundary is far from a tie at the kernels' float32 precision
    blk = min(block, inter)
    for r in range(rows):
        for s0 in range(0, inter, blk):
            v = s[r, s0:s0 + blk].sort(descending=True).values
            kb = k * min(s0 + blk, inter) // inter - k * s0 // inter
            if 0 < kb < v.numel():
                assert v[kb - 1] - v[kb] > 1e-4 * v[kb - 1].abs()
    got = dejavu_select(x, A, B, b, k, block)
    assert got.dtype == torch.int32 and got.shape == (rows, k)
    assert torch.equal(got, want)
    out = torch.full((rows, k), -1, dtype=torch.int32)
    from sparseinfer.kernels.predict import _launch

    assert _launch(x, A, B, b, k, block, out=out) is out and torch.equal(out, want)
    assert torch.equal(_launch(x, A, B, b, k, block, config=((1, 128, 1), (0, 1))), want)  # one rank chunk


def test_fused_selection_op_and_bad_arguments():
    x, A, B, b = torch.randn(2, 32), torch.randn(8, 32), torch.randn(96, 8), torch.randn(96)
    for bias in (b, None):  # linear / glu predictors
        torch.library.opcheck(torch.ops.sparseinfer.dejavu_select.default, (x, A, B, bias, 20, 16),
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="expected x"):
        dejavu_select(x, A[:, :16], B, b, 20, 16)
    with pytest.raises(ValueError, match=r"expected b \[96\]"):
        dejavu_select(x, A, B, b[:10], 20, 16)
    with pytest.raises(ValueError, match="needs B"):
        dejavu_select(x, A, B[:95], None, 20, 16)
    with pytest.raises(ValueError, match="int k in"):
        dejavu_select(x, A, B, b, 97, 16)
    with pytest.raises(ValueError, match="power of two"):
        dejavu_select(x, A, B, b, 20, 24)
    with pytest.raises(ValueError, match="at most 256"):
        dejavu_select(torch.randn(1, 32), A, torch.randn(600, 8), torch.randn(600), 20, 1024)


@pytest.mark.parametrize("rows", [1, 3])
def test_int4_selection_kernel_matches_the_float64_rule(rows):
    """kernels.predict.dejavu_select_int4 (Triton interpreter): per row the blocked top-K of
    |SiLU(g~) * u~| from the packed codes and scales (odd I, a partial last block, a global
    block, a k smaller than the blocks), against the rule on float64 scores of the dequantized
    weights; bad inputs are refused with what was expected."""
    g = torch.Generator().manual_seed(5)
    h, n = 256, 100
    q = quantized([(torch.randn(n, h, generator=g), torch.randn(n, h, generator=g))], bits=4, group=32).layers[0].B
    x = torch.randn(rows, h, generator=g)
    gs, us = (x.double() @ q.dequantize().double().T).chunk(2, dim=-1)
    sc = (F.silu(gs) * us).abs()
    for k, block in ((50, 32), (7, 32), (30, 128), (60, 16)):
        got = dejavu_select_int4(x, q.codes, q.scales, k, block)
        assert got.shape == (rows, k) and got.dtype == torch.int32
        assert (got[:, 1:] > got[:, :-1]).all()  # ascending
        assert torch.equal(got.long(), blocked_top_indices(sc, k, block).long()), (k, block)
    with pytest.raises(ValueError, match="codes uint8"):
        dejavu_select_int4(x, _unpack(q.codes, 32), q.scales, 10, 32)
    with pytest.raises(ValueError, match="an int k in"):
        dejavu_select_int4(x, q.codes, q.scales, 0, 32)
