"""Pooled block scores of the causal tiles (sparseinfer.kernels.blockscores) under the Triton
interpreter, against float64 products."""
import pytest
import torch

from sparseinfer.kernels.blockscores import causal_block_scores


@pytest.mark.parametrize("b,hq,hkv,nb,d", [(2, 4, 1, 45, 64), (1, 3, 3, 32, 32), (1, 2, 2, 1, 16), (1, 8, 2, 70, 128)])
def test_causal_block_scores_match_float64_on_and_below_the_diagonal(b, hq, hkv, nb, d):
    g = torch.Generator().manual_seed(nb + d)
    qp, kp = torch.randn(b, hq, nb, d, generator=g), torch.randn(b, hkv, nb, d, generator=g)
    s = causal_block_scores(qp, kp)
    assert s.shape == (b, hq, nb, nb) and s.dtype == torch.float32
    want = qp.double() @ kp.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2)
    low = torch.ones(nb, nb, dtype=torch.bool).tril()
    err = (s.double() - want)[..., low].abs().max() / want[..., low].abs().max()
    assert err < 1e-6


def test_causal_block_scores_read_strided_pooled_views():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 40, 2, 32, generator=g)  # [B, nb, H, D]: heads transposed out
    qp, kp = base.transpose(1, 2), base[:, :, :1].transpose(1, 2)
    s = causal_block_scores(qp, kp)
    want = qp.double() @ kp.double().expand(1, 2, 40, 32).transpose(-1, -2)
    low = torch.ones(40, 40, dtype=torch.bool).tril()
    assert torch.allclose(s.double()[..., low], want[..., low], rtol=0, atol=1e-4)


def test_causal_block_scores_reject_bad_input():
    with pytest.raises(ValueError, match="expected float32 qp"):
        causal_block_scores(torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="Hkv dividing 3"):
        causal_block_scores(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="power of 2"):
        causal_block_scores(torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24))
