"""sparseinfer.ops (reference backend) against float64 dense-mask computations."""
import math

import pytest
import torch

from masks import ashape_mask, block_sparse_mask, masked_attention_f64, rel_err, vertical_slash_mask
from sparseinfer import ops
from sparseinfer.ops import reference

HEADS = [(4, 4), (6, 2), (8, 2)]  # GQA ratios 1, 3, 4


def qkv(b, hq, hkv, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, n, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, n, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128])
def test_vertical_slash_matches_mask(hq, hkv, d):
    b, n = 2, 150
    q, k, v = qkv(b, hq, hkv, n, d)
    g = torch.Generator().manual_seed(1)
    vi = torch.randint(-1, n, (b, hq, 9), generator=g)
    si = torch.randint(-1, n, (b, hq, 7), generator=g)
    out = ops.vertical_slash_attention(q, k, v, vi, si)
    ref = masked_attention_f64(q, k, v, vertical_slash_mask(n, vi, si))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [32, 64])
def test_block_sparse_matches_mask(hq, hkv, d, bs):
    b, n = 2, 150
    q, k, v = qkv(b, hq, hkv, n, d, seed=2)
    nb = math.ceil(n / bs)
    bi = torch.randint(-1, nb, (b, hq, nb, 2), generator=torch.Generator().manual_seed(3))
    out = ops.block_sparse_attention(q, k, v, bi, bs)
    assert rel_err(out, masked_attention_f64(q, k, v, block_sparse_mask(n, bi, bs))) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bs,dense_from", [(32, 3), (32, 0), (64, 2), (32, 5)])
def test_block_sparse_dense_from_sees_every_causal_key(backend, bs, dense_from):
    """dense_from: query blocks >= dense_from attend every causal key whatever their rows list (the
    kernel: one range, no tiles; 32-blocks on 64-row kernel blocks included); bad values refused."""
    b, n, hq, hkv = 2, 150, 4, 2
    q, k, v = qkv(b, hq, hkv, n, 64, seed=5)
    nb = math.ceil(n / bs)
    bi = torch.randint(-1, nb, (b, hq, nb, 2), generator=torch.Generator().manual_seed(6))
    mask = block_sparse_mask(n, bi, bs)
    mask[:, :, dense_from * bs:] = torch.ones(n, n, dtype=torch.bool).tril()[dense_from * bs:]
    out = ops.block_sparse_attention(q, k, v, bi, bs, backend=backend, dense_from=dense_from)
    assert rel_err(out, masked_attention_f64(q, k, v, mask)) < 1e-5
    for bad in (-1, nb + 1, 1.5, True):
        with pytest.raises(ValueError, match="dense_from"):
            ops.block_sparse_attention(q, k, v, bi, bs, dense_from=bad)


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("sink,window", [(4, 16), (0, 1), (0, 0), (20, 3), (200, 200)])
def test_ashape_matches_mask(hq, hkv, sink, window):
    b, n, d = 2, 150, 64
    q, k, v = qkv(b, hq, hkv, n, d, seed=4)
    out = ops.ashape_attention(q, k, v, sink, window)
    assert rel_err(out, masked_attention_f64(q, k, v, ashape_mask(n, sink, window))) < 1e-5


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_dense_matches_causal(backend):
    q, k, v = qkv(2, 6, 2, 150, 64, seed=5)
    out = ops.dense_attention(q, k, v, backend=backend)
    assert rel_err(out, masked_attention_f64(q, k, v, ashape_mask(150, 0, 150))) < 1e-5


def test_float64_is_exact_and_low_precision_keeps_dtype():
    q, k, v = qkv(1, 4, 2, 70, 64, dtype=torch.float64, seed=6)
    vi = torch.tensor([[[0, 5, 33]] * 4])
    si = torch.tensor([[[0, 1, 10]] * 4])
    out = ops.vertical_slash_attention(q, k, v, vi, si)
    assert rel_err(out, masked_attention_f64(q, k, v, vertical_slash_mask(70, vi, si))) < 1e-12
    out16 = ops.vertical_slash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), vi, si)
    assert out16.dtype == torch.bfloat16 and rel_err(out16, out) < 2e-2


def test_chunking_is_invisible(monkeypatch):
    q, k, v = qkv(2, 6, 2, 150, 64, seed=7)
    vi = torch.randint(0, 150, (2, 6, 5))
    si = torch.randint(0, 150, (2, 6, 5))
    whole = ops.vertical_slash_attention(q, k, v, vi, si)
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 6 * 2 * 150 * 7)  # 7-row chunks
    chunked = ops.vertical_slash_attention(q, k, v, vi, si)
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_self_is_always_attended():
    # no vertical, no slash: every query sees only itself, so the output is its own value
    q, k, v = qkv(1, 2, 2, 40, 64, seed=8)
    empty = torch.full((1, 2, 1), -1)
    out = ops.vertical_slash_attention(q, k, v, empty, empty)
    assert torch.allclose(out, v, atol=1e-6)
    out = ops.ashape_attention(q, k, v, 0, 0)
    assert torch.allclose(out, v, atol=1e-6)


def test_sparse_differs_from_dense():
    q, k, v = qkv(1, 2, 2, 100, 64, seed=9)
    out = ops.ashape_attention(q, k, v, 2, 4)
    assert rel_err(out, ops.dense_attention(q, k, v)) > 0.1


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: ops.dense_attention(q[0], k, v), "4 dims"),
    (lambda q, k, v: ops.dense_attention(q, k[:, :1].repeat(1, 4, 1, 1)[:, :4], v[:, :1].repeat(1, 4, 1, 1)[:, :4]), "multiple of Hkv"),
    (lambda q, k, v: ops.dense_attention(q, k.double(), v), "one dtype"),
    (lambda q, k, v: ops.dense_attention(q.long(), k, v), "floating dtype"),
    (lambda q, k, v: ops.dense_attention(q, k[:, :, :10], v[:, :, :10]), "matching q"),
    (lambda q, k, v: ops.dense_attention(q, k, v, backend="cuda"), "backend"),
    (lambda q, k, v: ops.vertical_slash_attention(q, k, v, torch.tensor([[[50]] * 6]), torch.zeros(1, 6, 1, dtype=torch.long)), r"\[0, 20\)"),
    (lambda q, k, v: ops.vertical_slash_attention(q, k, v, torch.zeros(1, 5, 1, dtype=torch.long), torch.zeros(1, 6, 1, dtype=torch.long)), "shape"),
    (lambda q, k, v: ops.vertical_slash_attention(q, k, v, torch.zeros(1, 6, 1), torch.zeros(1, 6, 1, dtype=torch.long)), "integer dtype"),
    (lambda q, k, v: ops.block_sparse_attention(q, k, v, torch.zeros(1, 6, 3, 1, dtype=torch.long), 16), r"\[1, 6, 2, \*\]"),
    (lambda q, k, v: ops.block_sparse_attention(q, k, v, torch.zeros(1, 6, 1, 1, dtype=torch.long), 0), "block_size"),
    (lambda q, k, v: ops.ashape_attention(q, k, v, -1, 4), "sink"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    q, k, v = qkv(1, 6, 3, 20, 64)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
