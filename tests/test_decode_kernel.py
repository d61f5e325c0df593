"""The Triton sparse decode kernels (sparseinfer.kernels.decode) under the Triton interpreter,
against float64 references computed independently (explicit token sets, brute-force bounds)."""
import math

import pytest
import torch

pytest.importorskip("triton")

from sparseinfer.kernels import decode as kd  # noqa: E402
from sparseinfer.ops.decode import page_bounds, quest_scores, sparse_decode_attention  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def f64_decode(q, k, v, indices, page_size, valid):
    """(out [B, Hq, 1, D], lse [B, Hq]) in float64 from the explicit set of visible tokens."""
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, 1, d, dtype=torch.float64)
    lse = torch.full((b, hq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            toks = sorted({p * page_size + j for p in indices[bi, kh].tolist() if p >= 0 for j in range(page_size)
                           if p * page_size + j < n and (valid is None or bool(valid[bi, kh, p * page_size + j]))})
            if toks:
                s = k[bi, kh, toks].double() @ q[bi, h, 0].double() * d ** -0.5
                lse[bi, h] = torch.logsumexp(s, 0)
                out[bi, h, 0] = torch.softmax(s, 0) @ v[bi, kh, toks].double()
    return out, lse


def unique_pages(b, hkv, pages, k, g):
    idx = torch.stack([torch.stack([torch.randperm(pages, generator=g)[:k] for _ in range(hkv)]) for _ in range(b)])
    idx[0, 0, 1] = -1  # padding inside a row
    idx[-1, -1] = -1  # an empty row: zeros, lse -inf
    return idx


@pytest.mark.parametrize("hq,hkv,d,ps,dtype", [
    (4, 2, 64, 16, torch.float32), (8, 2, 128, 16, torch.bfloat16), (6, 2, 64, 5, torch.float16),
    (4, 4, 64, 1, torch.float32), (32, 8, 128, 16, torch.bfloat16)])
def test_kernel_matches_f64(hq, hkv, d, ps, dtype):
    g = torch.Generator().manual_seed(hq * 100 + ps)
    b, n = 2, 150
    q, k, v = (torch.randn(b, h, m, d, generator=g).to(dtype) for h, m in ((hq, 1), (hkv, n), (hkv, n)))
    pages = math.ceil(n / ps)
    idx = unique_pages(b, hkv, pages, min(pages, 7), g)
    valid = torch.rand(b, hkv, n, generator=g) > 0.2
    for vmask in (None, valid):
        ref, ref_lse = f64_decode(q, k, v, idx, ps, vmask)
        for splits in (None, 1, 3):  # split-K partials merged by the second kernel
            out, lse = kd.sparse_decode(q, k, v, idx, ps, vmask, d ** -0.5, splits=splits)
            assert out.dtype == dtype and out.shape == q.shape
            err = (out.double() - ref).abs().max() / ref.abs().max()
            assert err < TOL[dtype], (splits, float(err))
            fin = torch.isfinite(ref_lse)
            assert torch.equal(torch.isfinite(lse), fin)
            torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=1e-4, atol=1e-4)
        assert out[-1, -(hq // hkv):].abs().max() == 0  # the empty row


def test_op_dispatch_dedups_and_strided_inputs():
    """ops.sparse_decode_attention(backend="triton"): repeated ids count once; non-contiguous
    q (a transposed view, as the model hands it) and int64 indices are accepted."""
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, n, d = 2, 6, 2, 100, 64
    q = torch.randn(b, 1, hq, d, generator=g).transpose(1, 2)
    k, v = torch.randn(2, b, hkv, n, d, generator=g)
    idx = torch.randint(-1, 7, (b, hkv, 9), generator=g)
    idx[..., 0] = idx[..., 1] = 3  # a repeat
    out, lse = sparse_decode_attention(q, k, v, idx, page_size=16, return_lse=True, backend="triton")
    ref, ref_lse = f64_decode(q, k, v, idx, 16, None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sparse_decode_attention(q, k, v, idx, page_size=16, backend="reference"), out, atol=1e-5)


@pytest.mark.parametrize("d,bound_dtype", [(64, torch.float32), (128, torch.bfloat16)])
def test_quest_score_kernel_brute_force(d, bound_dtype):
    g = torch.Generator().manual_seed(d)
    b, hq, hkv, n, ps = 2, 8, 2, 300, 16
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    valid = torch.ones(b, hkv, n, dtype=torch.bool)
    valid[0, 1, 32:48] = False  # page 2 of (0, 1) is empty -> -inf
    kmin, kmax = page_bounds(k, ps, valid)
    kmin, kmax = kmin.to(bound_dtype), kmax.to(bound_dtype)
    score = quest_scores(q, kmin, kmax, backend="triton")
    assert score.shape == (b, hkv, math.ceil(n / ps)) and score.dtype == torch.float32
    grp = hq // hkv
    for bi in range(b):
        for kh in range(hkv):
            for p in range(score.shape[-1]):
                lo, hi = kmin[bi, kh, p].double(), kmax[bi, kh, p].double()
                if bi == 0 and kh == 1 and p == 2:
                    assert score[bi, kh, p] == -math.inf
                    continue
                want = sum(float(torch.maximum(q[bi, h, 0].double() * hi, q[bi, h, 0].double() * lo).sum())
                           for h in range(kh * grp, (kh + 1) * grp))
                assert abs(float(score[bi, kh, p]) - want) < 1e-3 * (1 + abs(want))


def test_kernel_errors():
    q, k, v = torch.randn(1, 4, 1, 48), torch.randn(1, 2, 32, 48), torch.randn(1, 2, 32, 48)
    idx = torch.zeros(1, 2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"backend='triton': expected .* got head_dim 48"):
        sparse_decode_attention(q, k, v, idx, backend="triton")
    # "auto" on such shapes (or on the CPU) runs the reference instead
    assert sparse_decode_attention(q, k, v, idx).shape == q.shape


def test_multi_buffer_one_merge_matches_union():
    """sparse_decode_multi: two KV buffers (a kept prompt + a page pool), one merge kernel ==
    float64 attention over the union of their selected tokens."""
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, d = 2, 8, 2, 64
    q = torch.randn(b, hq, 1, d, generator=g)
    k1, v1 = torch.randn(2, b, hkv, 40, d, generator=g)
    k2, v2 = torch.randn(2, b, hkv, 64, d, generator=g)
    i1 = torch.arange(3, dtype=torch.int32).expand(b, hkv, 3)  # every prompt page, an expanded (stride 0) row
    i2 = unique_pages(b, hkv, 4, 3, g)
    valid2 = torch.rand(b, hkv, 64, generator=g) > 0.3
    out, lse = kd.sparse_decode_multi(q, [(k1, v1, i1, 16, None), (k2, v2, i2, 16, valid2)], d ** -0.5)
    # the union as one buffer: concatenate, shift the pool's page ids (40 tokens = 2.5 pages -> pad to 48)
    pad = torch.zeros(b, hkv, 8, d)
    kc, vc = torch.cat([k1, pad, k2], 2), torch.cat([v1, pad, v2], 2)
    vc_valid = torch.cat([torch.ones(b, hkv, 40, dtype=torch.bool), torch.zeros(b, hkv, 8, dtype=torch.bool), valid2], 2)
    ic = torch.cat([i1.long(), torch.where(i2 >= 0, i2 + 3, -1)], -1)
    ref, ref_lse = f64_decode(q, kc, vc, ic, 16, vc_valid)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_raas_layer_on_the_kernel_equals_reference(monkeypatch):
    """The RaaS layer's decode step through the kernels (forced, interpreter) equals its torch path."""
    from sparseinfer.kv import SparseKVCache
    from sparseinfer.ops import decode as opd

    g = torch.Generator().manual_seed(9)
    b, hq, hkv, d = 2, 4, 2, 64
    layer = SparseKVCache("raas", 1, dense_layers=0, budget=32, page_size=16).layers[0]
    layer.kernels = False  # the torch bookkeeping; the fused one: test_raas_bookkeeping_kernels_equal_torch_path
    kp = torch.randn(b, hkv, 37, d, generator=g)
    layer.update(kp, torch.randn(b, hkv, 37, d, generator=g))
    for _ in range(70):  # past the budget: pages evicted and refilled
        kt = torch.randn(b, hkv, 1, d, generator=g)
        layer.update(kt, torch.randn(b, hkv, 1, d, generator=g))
    q = torch.randn(b, hq, 1, d, generator=g)
    ref = layer.decode_attention(q, 0.125)
    monkeypatch.setattr(opd, "_triton_reason", lambda q, backend: None)
    out = layer.decode_attention(q, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget,ps,select", [(32, 8, None), (16, 4, 8)])
def test_raas_bookkeeping_kernels_equal_torch_path(monkeypatch, budget, ps, select):
    """RaaS's fused bookkeeping kernels (token write + eviction; refresh + selection) keep the
    same state as its torch path over many steps (pages filled, evicted, refreshed) and give the
    same attention. Both layers run the decode kernel (interpreter) for the attention itself."""
    from sparseinfer.kv import SparseKVCache
    from sparseinfer.ops import decode as opd

    monkeypatch.setattr(opd, "_triton_reason", lambda q, backend: None)
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, d = 2, 4, 2, 32
    opts = dict(budget=budget, page_size=ps) | ({"select": select} if select else {})
    fused, torch_path = (SparseKVCache("raas", 1, dense_layers=0, **opts).layers[0] for _ in range(2))
    fused.kernels, torch_path.kernels = True, False
    kp, vp = torch.randn(b, hkv, 21, d, generator=g), torch.randn(b, hkv, 21, d, generator=g)
    for lay in (fused, torch_path):
        lay.update(kp, vp)
    for step in range(budget + 3 * ps):  # past the budget: the stalest pages get evicted
        kt, vt = torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
        q = torch.randn(b, hq, 1, d, generator=g)
        outs = [lay.update(kt, vt) and lay.decode_attention(q, 0.2) for lay in (fused, torch_path)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for name in ("cur", "fill", "ts", "gk", "gv", "gmin", "gmax", "gvalid", "step"):
            assert torch.equal(getattr(fused, name), getattr(torch_path, name)), (step, name)
        valid = (torch.arange(ps) < torch_path.fill[..., None]).reshape(b, hkv, -1)
        assert torch.equal(fused.gvalid, valid), step
    assert (torch_path.ts > 0).sum() > 0 and int(torch_path.step) > budget  # evictions happened


def test_raas_select_picks_the_top_scores_exactly():
    """The bisection top-n of raas_select against torch.topk: random scores with -inf (free)
    slots, +inf (current page), negative values, near-equal floats; n from 1 to all."""
    from sparseinfer.kernels.raas import raas_select

    g = torch.Generator().manual_seed(5)
    b, h, s = 2, 3, 37
    bound = torch.randn(b, h, s, generator=g) * torch.logspace(-6, 6, s)
    bound[0, 0, :5] = float("-inf")
    bound[1, 2, 7] = float("inf")
    bound[0, 1, 3] = bound[0, 1, 4].nextafter(torch.tensor(float("inf")))  # adjacent floats
    for n_ref, n_sel in [(1, 1), (4, 9), (18, 36), (37, 37)]:
        ts = torch.zeros(b, h, s)
        step = torch.tensor(11)
        sel = raas_select(bound.contiguous(), ts, step, n_ref, n_sel)
        for i in range(b):
            for j in range(h):
                row = bound[i, j]
                finite = int((row > float("-inf")).sum())
                want = set(row.topk(min(n_sel, finite)).indices.tolist())
                got = sel[i, j].tolist()
                assert set(x for x in got if x >= 0) == want and got.count(-1) == n_sel - len(want)
                refreshed = set(torch.nonzero(ts[i, j] == 10.0).flatten().tolist())
                assert refreshed == set(row.topk(min(n_ref, finite)).indices.tolist())


def _all_pages(b, hkv, n):
    return torch.arange(n).expand(b, hkv, n)


@pytest.mark.parametrize("hq,hkv,d,dtype,n", [(6, 2, 64, torch.float16, 150), (4, 4, 128, torch.bfloat16, 37),
                                               (8, 1, 64, torch.float32, 300)])
@pytest.mark.parametrize("early_v,skip", [(False, False), (True, True)])
def test_dense_decode_kernel_matches_f64(hq, hkv, d, dtype, n, early_v, skip):
    """kernels.decode.dense_decode: every valid slot; splits of one and of several tiles, more
    splits than tiles; V loaded with K or after the scores; splits with no valid slot skipped or
    computed; a row with no valid slot is zeros."""
    g = torch.Generator().manual_seed(n + hq)
    b = 2
    q, k, v = (torch.randn(b, h, m, d, generator=g).to(dtype) for h, m in ((hq, 1), (hkv, n), (hkv, n)))
    valid = torch.rand(b, n, generator=g) > 0.3
    valid[0, 16:48] = False  # whole 16-slot tiles with no valid slot
    valid[1] = False
    for vm in (None, valid):
        ref, _ = f64_decode(q, k, v, _all_pages(b, hkv, n), 1, None if vm is None else vm[:, None].expand(b, hkv, n))
        for bn, sp in ((16, None), (16, 1), (16, 3), (32, 50), (16, 50)):  # (16, 50): splits 1, 2 of row 0 empty
            out = kd.dense_decode(q, k, v, vm, d ** -0.5, config=(bn, 4, 1, sp, early_v, skip))
            assert out.dtype == dtype and out.shape == q.shape
            err = (out.double() - ref).abs().max() / ref.abs().max()
            assert err < TOL[dtype], (bn, sp, float(err))
        if vm is not None:
            assert out[1].abs().max() == 0


def test_dense_decode_op_and_the_patched_models_decode_path():
    """ops.dense_decode_attention (kernel and reference) and integration.gqa_decode_attention with
    backend="triton" (what a patched model's dense decode step runs on CUDA) equal float64
    attention over the mask's slots: a [1, 1, 1, L] and a [B, 1, 1, L] bool mask, no mask, a
    transposed q; an additive mask stays on SDPA (same result)."""
    from sparseinfer.integration import gqa_decode_attention
    from sparseinfer.ops import dense_decode_attention

    g = torch.Generator().manual_seed(11)
    b, hq, hkv, n, d = 2, 8, 2, 70, 64
    q = torch.randn(b, 1, hq, d, generator=g).transpose(1, 2)
    k, v = torch.randn(2, b, hkv, n, d, generator=g)
    mask = torch.zeros(b, 1, 1, n, dtype=torch.bool)
    mask[0, ..., :61] = True
    mask[1, ..., :9] = True
    for m in (mask, mask[:1], None):
        vm = None if m is None else m[:, 0, 0].expand(b, n)
        ref, _ = f64_decode(q, k, v, _all_pages(b, hkv, n), 1, None if vm is None else vm[:, None].expand(b, hkv, n))
        for backend in ("triton", "reference"):
            torch.testing.assert_close(dense_decode_attention(q, k, v, valid=vm, backend=backend).double(), ref,
                                       rtol=1e-5, atol=1e-5)
        got = gqa_decode_attention(q, k, v, m, d ** -0.5, backend="triton")
        torch.testing.assert_close(got.double(), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # a mask longer than the keys is cut to them (as transformers' SDPA path does)
    longer = torch.cat([mask, torch.ones(b, 1, 1, 5, dtype=torch.bool)], -1)
    ref, _ = f64_decode(q, k, v, _all_pages(b, hkv, n), 1, mask[:, 0, 0, None].expand(b, hkv, n))
    torch.testing.assert_close(gqa_decode_attention(q, k, v, longer, d ** -0.5, backend="triton").double(),
                               ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    add = torch.where(mask, 0.0, float("-inf"))
    ref, _ = f64_decode(q, k, v, _all_pages(b, hkv, n), 1, mask[:, 0, 0, None].expand(b, hkv, n))
    torch.testing.assert_close(gqa_decode_attention(q, k, v, add, d ** -0.5, backend="triton").double(),
                               ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_dense_decode_errors():
    from sparseinfer.ops import dense_decode_attention

    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 32, 64), torch.randn(2, 2, 32, 64)
    with pytest.raises(ValueError, match=r"valid: expected shape \[B=2, N=32\], got \(2, 2, 32\)"):
        dense_decode_attention(q, k, v, valid=torch.ones(2, 2, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid: expected a bool torch.Tensor, got torch.float32"):
        dense_decode_attention(q, k, v, valid=torch.ones(2, 32))
    with pytest.raises(ValueError, match=r"q: expected one decode step"):
        dense_decode_attention(torch.randn(2, 4, 3, 64), k, v)
    with pytest.raises(ValueError, match=r"backend='triton': expected .* got head_dim 48"):
        dense_decode_attention(torch.randn(2, 4, 1, 48), k[..., :48], v[..., :48], backend="triton")


def test_dense_decode_more_splits_than_one_merge_chunk():
    """69 splits: the merge kernel walks its 64-split chunks."""
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, n, d = 1, 4, 1, 1100, 64
    q, k, v = (torch.randn(b, h, m, d, generator=g) for h, m in ((hq, 1), (hkv, n), (hkv, n)))
    valid = torch.rand(b, n, generator=g) > 0.5
    ref, _ = f64_decode(q, k, v, _all_pages(b, hkv, n), 1, valid[:, None].expand(b, hkv, n))
    out = kd.dense_decode(q, k, v, valid, d ** -0.5, config=(16, 4, 1, 100, False, False))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
