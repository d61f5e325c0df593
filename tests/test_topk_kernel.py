"""Top-k selection without a sort (sparseinfer.kernels.topk) under the Triton interpreter,
against float64 torch.topk."""
import pytest
import torch

from sparseinfer.kernels import topk


def _kept_values(scores, idx):
    return scores.double().gather(-1, idx.long()).sort(dim=-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r,n,k", [(1, 14336, 7168), (3, 1000, 250), (2, 37, 1), (4, 33, 33), (1, 5, 4)])
def test_topk_indices_keeps_the_k_largest(dtype, r, n, k):
    g = torch.Generator().manual_seed(n + k)
    s = (torch.randn(r, n, generator=g) * 3).to(dtype)  # negative and positive; 16-bit rows have ties
    idx = topk.topk_indices(s, k)
    assert idx.dtype == torch.int32 and idx.shape == (r, k)
    assert (idx[:, 1:] > idx[:, :-1]).all() and (idx >= 0).all() and (idx < n).all()  # ascending, distinct
    want = s.double().topk(k, dim=-1).values.sort(dim=-1).values
    assert torch.equal(_kept_values(s, idx), want)
    mask = topk.topk_mask(s, k)  # the same set as a mask
    assert mask.dtype == torch.bool and torch.equal(mask, torch.zeros_like(mask).scatter_(1, idx.long(), True))


def test_topk_indices_ties_go_to_the_lower_positions():
    s = torch.tensor([[1.0, 5.0, 2.0, 5.0, 2.0, 2.0, -0.5, 2.0]])
    assert topk.topk_indices(s, 4).tolist() == [[1, 2, 3, 4]]
    assert topk.topk_indices(s.bfloat16(), 1).tolist() == [[1]]
    neg = torch.tensor([[-3.0, -1.0, -2.0, -1e-3, -7.0]])
    assert topk.topk_indices(neg, 2).tolist() == [[1, 3]]
    assert topk.topk_indices(neg.half(), 3).tolist() == [[1, 2, 3]]


def test_topk_indices_reads_strided_rows():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(3, 64, generator=g)
    s = big[:, 5:45]  # row stride 64
    want = s.topk(9, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    assert torch.equal(topk.topk_indices(s, 9), want)
    assert torch.equal(topk.topk_indices(big.t().contiguous().t()[:, :40], 9),
                       big[:, :40].topk(9, dim=-1).indices.sort(dim=-1).values.to(torch.int32))


def test_select_top_matches_torch_on_leading_dims():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 50, generator=g, dtype=torch.float64)  # float64: the torch path
    idx = topk.select_top(s, 7)
    assert idx.shape == (2, 3, 7) and idx.dtype == torch.int32
    assert torch.equal(_kept_values(s, idx), s.topk(7, dim=-1).values.sort(dim=-1).values)


def test_topk_indices_rejects_bad_input():
    with pytest.raises(ValueError, match=r"scores \[R, n\]"):
        topk.topk_indices_launch(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="float32 / float16 / bfloat16"):
        topk.topk_indices_launch(torch.randn(2, 8, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"k in \[1, 8\]"):
        topk.topk_indices_launch(torch.randn(2, 8), 9)
    with pytest.raises(ValueError, match=r"k in \[1, 8\]"):
        topk.topk_indices_launch(torch.randn(2, 8), 0)


def test_topk_indices_is_a_custom_op():
    for op in (torch.ops.sparseinfer.topk_indices.default, torch.ops.sparseinfer.topk_mask.default,
               torch.ops.sparseinfer.topk_indices_causal.default):
        torch.library.opcheck(op, (torch.randn(4 * 40, 40), 11), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,classes", [(37, 5, 4), (37, 1, 4), (37, 37, 4), (8, 3, 4), (37, 5, 256)])
def test_topk_indices_causal_keeps_each_rows_own_block_and_best_earlier_ones(monkeypatch, dtype, n, k, classes):
    """causal=True on stacked block-score matrices [3, n, n]: row i keeps its own block and its
    min(k, i + 1) - 1 best blocks j < i (values against float64 torch.topk of the masked row),
    ascending, then -1; the scores above the diagonal (here larger than any other) are never read.
    classes: topk.CAUSAL_MIN, the first row of the length classes launched apart (4: rows 0-3, 4-7,
    8-15, 16-31 and 32-36 of every matrix in five launches; 256: one launch)."""
    monkeypatch.setattr(topk, "CAUSAL_MIN", classes)
    g = torch.Generator().manual_seed(n * 10 + k)
    s = (torch.randn(3, n, n, generator=g) * 3).to(dtype)  # 16-bit rows have ties
    s = torch.where(torch.ones(n, n, dtype=torch.bool).triu(1), torch.tensor(1e4, dtype=dtype), s)
    idx = topk.topk_indices_launch(s.reshape(-1, n), k, causal=True).view(3, n, k)
    assert idx.dtype == torch.int32
    for h in range(3):
        for i in range(n):
            kept = min(k, i + 1)
            row = idx[h, i]
            assert (row[kept:] == -1).all() and (row[:kept] >= 0).all() and (row[:kept] <= i).all()
            assert (row[1:kept] > row[:kept - 1]).all() and i in row[:kept].tolist()
            masked = s[h, i].double().clone()
            masked[i + 1:] = float("-inf")
            masked[i] = float("inf")
            want = masked.topk(kept).values.sort().values
            assert torch.equal(masked[row[:kept].long()].sort().values, want), (h, i)


def test_topk_indices_causal_rejects_rows_that_are_not_square_matrices():
    with pytest.raises(ValueError, match=r"square \[\.\., 8, 8\]"):
        topk.topk_indices_launch(torch.randn(12, 8), 2, causal=True)
    with pytest.raises(ValueError, match="mask=True"):
        topk.topk_indices_launch(torch.randn(16, 8), 2, causal=True, mask=True)
