"""The fused RoPE-undo + block-pooling Triton kernel (learned-gate features), run by the Triton
interpreter on the CPU, against pooling of the pre-RoPE tensor in float64."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from sparseinfer.kernels.pool import supported, unrotate_pool  # noqa: E402


def rope(x, cos, sin):
    """transformers' RoPE: x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def pooled(x, bs, pooling):
    """float64 avg / max / min over blocks of bs tokens (the last block: its valid tokens)."""
    n = x.shape[2]
    out = []
    for p in pooling:
        blocks = [x[:, :, i:i + bs] for i in range(0, n, bs)]
        f = {"avg": lambda t: t.mean(2), "max": lambda t: t.amax(2), "min": lambda t: t.amin(2)}[p]
        out.append(torch.stack([f(t) for t in blocks], 2))
    return torch.cat(out, -1)


@pytest.mark.parametrize("b,h,n,d,bs,dtype,pooling,scale", [
    (2, 3, 150, 64, 64, torch.bfloat16, ("avg", "max", "min"), 1.0),
    (1, 2, 100, 32, 48, torch.float32, ("max", "avg"), 1.3),  # block not a power of 2, scaled rotary
    (2, 1, 64, 16, 16, torch.float16, ("min",), 1.0),
    (2, 10, 70, 16, 32, torch.float32, ("avg", "max", "min"), 1.0),  # 8 heads per program, then 2
])
def test_unrotate_pool_matches_pre_rope_pooling(b, h, n, d, bs, dtype, pooling, scale):
    g = torch.Generator().manual_seed(n)
    x0 = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * (10000.0 ** (-torch.arange(0, d, 2) / d))
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None] * scale
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None] * scale
    y = rope(x0, cos, sin).to(dtype)
    out = unrotate_pool(y, cos.float(), sin.float(), bs, pooling)
    assert out.shape == (b, h, math.ceil(n / bs), len(pooling) * d) and out.dtype == torch.float32
    # reference from the rounded input y (the kernel cannot undo the rounding of y)
    x_back = rope(y.double(), cos, -sin) / scale ** 2
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert (out.double() - pooled(x_back, bs, pooling)).abs().max() < 1e-5
    assert (out.double() - pooled(x0, bs, pooling)).abs().max() < tol * 4


def test_unrotate_pool_rejects_bad_input():
    x = torch.randn(1, 2, 10, 24)
    cos = torch.ones(1, 10, 24)
    assert not supported(x, cos, 8)
    with pytest.raises(ValueError, match="D a power of 2"):
        unrotate_pool(x, cos, cos, 8, ("avg",))
    x = torch.randn(1, 2, 10, 32)
    with pytest.raises(ValueError, match="cos/sin must be"):
        unrotate_pool(x, torch.ones(1, 9, 32), torch.ones(1, 9, 32), 8, ("avg",))
    with pytest.raises(ValueError, match="pooling must be"):
        unrotate_pool(x, torch.ones(1, 10, 32), torch.ones(1, 10, 32), 8, ("median",))
