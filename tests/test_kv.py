"""KV-cache policies (sparseinfer.kv) and sparse decode attention (sparseinfer.ops.decode)."""
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import sparseinfer
from sparseinfer.integration import KV_ATTR
from sparseinfer.kv import POLICIES, SparseKVCache, budget_options, cache_kwargs
from sparseinfer.kv.layers import RaaSLayer
from sparseinfer.ops.decode import merge_partials, page_bounds, quest_scores, sparse_decode_attention

HEADS = [(4, 4), (6, 2), (8, 2)]


# ---------------------------------------------------------------- the op, against float64


def decode_f64(q, k, v, indices, page_size, valid=None, scale=None):
    """Independent reference: one query per head, a python set of visible tokens per (b, kv head)."""
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    s = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, 1, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            toks = sorted({p * page_size + j for p in indices[bi, kh].tolist() if p >= 0
                           for j in range(page_size) if p * page_size + j < n
                           and (valid is None or bool(valid[bi, kh, p * page_size + j]))})
            if not toks:
                continue
            kk = k[bi, kh, toks].double()
            w = torch.softmax(kk @ q[bi, h, 0].double() * s, 0)
            out[bi, h, 0] = w @ v[bi, kh, toks].double()
    return out


def rand(b, hq, hkv, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, 1, d, generator=g, dtype=dtype), torch.randn(b, hkv, n, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, n, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("page_size", [1, 16, 5])
def test_decode_op_matches_f64(hq, hkv, page_size):
    b, n, d = 2, 83, 64
    q, k, v = rand(b, hq, hkv, n, d, seed=page_size)
    pages = math.ceil(n / page_size)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(-1, pages, (b, hkv, 6), generator=g)  # repeats and padding included
    idx[0, 0] = -1  # an empty row -> zeros
    valid = torch.rand(b, hkv, n, generator=g) > 0.2
    for vmask in (None, valid):
        out = sparse_decode_attention(q, k, v, idx, page_size=page_size, valid=vmask)
        ref = decode_f64(q, k, v, idx, page_size, vmask)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert out[0, : hq // hkv].abs().max() == 0


def test_decode_op_lse_merge_equals_union():
    q, k, v = rand(2, 6, 2, 64, 32, seed=3)
    a = torch.tensor([0, 2, -1]).expand(2, 2, 3).contiguous()
    c = torch.tensor([1, 3, -1]).expand(2, 2, 3).contiguous()
    oa, la = sparse_decode_attention(q, k, v, a, page_size=16, return_lse=True)
    oc, lc = sparse_decode_attention(q, k, v, c, page_size=16, return_lse=True)
    empty = torch.full((2, 2, 1), -1)
    oe, le = sparse_decode_attention(q, k, v, empty, page_size=16, return_lse=True)
    merged = merge_partials([oa, oc, oe], [la, lc, le])
    full = sparse_decode_attention(q, k, v, torch.arange(4).expand(2, 2, 4), page_size=16)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-6)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-6)


def test_decode_op_errors():
    q, k, v = rand(1, 4, 2, 32, 16)
    idx = torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"one decode step"):
        sparse_decode_attention(torch.randn(1, 4, 2, 16), k, v, idx)
    with pytest.raises(ValueError, match=r"indices: expected shape \[1, 2, \*\]"):
        sparse_decode_attention(q, k, v, torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 2\)"):
        sparse_decode_attention(q, k, v, torch.full((1, 2, 3), 2), page_size=16)
    with pytest.raises(ValueError, match="integer dtype"):
        sparse_decode_attention(q, k, v, idx.float())
    with pytest.raises(ValueError, match="page_size: expected a positive int"):
        sparse_decode_attention(q, k, v, idx, page_size=0)
    with pytest.raises(ValueError, match=r"valid: expected shape"):
        sparse_decode_attention(q, k, v, idx, valid=torch.ones(1, 2, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        sparse_decode_attention(torch.randn(1, 3, 1, 16), k, v, idx)
    with pytest.raises(ValueError, match=r"backend='triton': expected a call the decode kernel takes, got dtype"):
        sparse_decode_attention(q.double(), k.double(), v.double(), idx, backend="triton")


def test_quest_bound_and_top_pages_brute_force():
    b, hq, hkv, n, d, ps = 2, 6, 2, 70, 16, 16
    q, k, _ = rand(b, hq, hkv, n, d, seed=11)
    kmin, kmax = page_bounds(k, ps)
    score = quest_scores(q, kmin, kmax)
    pages = math.ceil(n / ps)
    g = hq // hkv
    for bi in range(b):
        for kh in range(hkv):
            for p in range(pages):
                kp = k[bi, kh, p * ps:(p + 1) * ps].double()
                lo, hi = kp.min(0).values, kp.max(0).values
                want = sum(float(torch.maximum(q[bi, h, 0].double() * hi, q[bi, h, 0].double() * lo).sum())
                           for h in range(kh * g, (kh + 1) * g))
                assert abs(float(score[bi, kh, p]) - want) < 1e-4
                for h in range(kh * g, (kh + 1) * g):  # it is an upper bound of every q.k in the page
                    per_head = torch.maximum(q[bi, h, 0] * kmax[bi, kh, p], q[bi, h, 0] * kmin[bi, kh, p]).sum()
                    assert float((kp @ q[bi, h, 0].double()).max()) <= float(per_head) + 1e-4
    # the Quest layer attends the top pages by bound plus the last one
    cache = SparseKVCache("quest", 1, dense_layers=0, budget=2 * ps, page_size=ps)
    layer = cache.layers[0]
    layer.update(k, k)
    sel = layer.select(q)
    for bi in range(b):
        for kh in range(hkv):
            s = score[bi, kh].tolist()
            best = max(range(pages - 1), key=lambda p: s[p])
            assert set(sel[bi, kh].tolist()) == {pages - 1, best}


# ---------------------------------------------------------------- policies on a tiny model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    yield model
    if hasattr(model, "_sparseinfer_patch"):
        sparseinfer.unpatch(model)


def _generate(model, ids, cache, n, mask=None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **cache_kwargs(model, cache),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores, 1)


BIG = {"dense": {}, "streaming": {"sink": 4, "window": 200}, "h2o": {"heavy": 100, "recent": 100},
       "snapkv": {"capacity": 100, "window": 8}, "quest": {"budget": 160}, "raas": {"budget": 96},
       "raas_quest": {"budget": 96, "prompt": "quest", "prompt_budget": 48}}


def test_dense_policy_equals_dynamic_cache(tiny):
    ids = torch.randint(1, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    ref_seq, ref_scores = _generate(tiny, ids, DynamicCache(), 24)
    cache = sparseinfer.kv_cache(tiny, "dense")
    seq, scores = _generate(tiny, ids, cache, 24)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)
    assert cache.get_seq_length() == 37 + 23


@pytest.mark.parametrize("name", list(BIG))
def test_full_budget_equals_dense(tiny, name):
    """A budget covering the whole generation reproduces dense decoding (batch 2, GQA 3)."""
    ids = torch.randint(1, 96, (2, 37), generator=torch.Generator().manual_seed(2))
    ref_seq, ref_scores = _generate(tiny, ids, DynamicCache(), 30)
    policy = name.split("_")[0]
    cache = sparseinfer.kv_cache(tiny, policy, dense_layers=1, **BIG[name])
    seq, scores = _generate(tiny, ids, cache, 30)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 37 + 29


def test_small_budgets_diverge_and_count_positions(tiny):
    ids = torch.randint(1, 96, (2, 37), generator=torch.Generator().manual_seed(2))
    ref_seq, _ = _generate(tiny, ids, DynamicCache(), 40)
    for policy, opts in [("streaming", {"sink": 4, "window": 8}), ("h2o", {"heavy": 8, "recent": 8}),
                         ("quest", {"budget": 16}), ("raas", {"budget": 16, "page_size": 8}),
                         ("snapkv", {"capacity": 12, "window": 4})]:
        cache = sparseinfer.kv_cache(tiny, policy, dense_layers=1, **opts)
        seq, _ = _generate(tiny, ids, cache, 40)
        assert not torch.equal(seq, ref_seq), policy  # the policy really ran
        assert cache.get_seq_length() == 37 + 39  # positions count every token seen
        if policy in ("streaming", "h2o"):
            assert cache.kv_tokens()[1:] == [12 if policy == "streaming" else 16] * 3


def test_left_padded_batch_full_budget(tiny):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    ref_seq, ref_scores = _generate(tiny, ids, DynamicCache(), 20, mask)
    for policy, opts in [("raas", {"budget": 32}), ("quest", {"budget": 64}), ("streaming", {"sink": 2, "window": 100})]:
        seq, scores = _generate(tiny, ids, sparseinfer.kv_cache(tiny, policy, **opts), 20, mask)
        assert torch.equal(seq, ref_seq), policy
        torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)


def _decode_loop(model, cache, prompt, steps):
    """Greedy decoding by hand (q_len 1 per step); yields the cache after each step."""
    with torch.no_grad():
        kw = cache_kwargs(model, cache)
        out = model(prompt, **kw, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(tok, **kw, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            yield cache


def test_raas_memory_bound_is_flat(tiny):
    prompt_len, budget, ps = 20, 32, 8
    prompt = torch.randint(1, 96, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    cache = sparseinfer.kv_cache(tiny, "raas", budget=budget, page_size=ps)
    bound = prompt_len + budget + ps
    sizes, held = [], []
    for step, c in enumerate(_decode_loop(tiny, cache, prompt, 150)):
        toks = c.kv_tokens()
        assert toks[:2] == [prompt_len + step + 1] * 2  # the dense layers grow
        assert all(t <= bound for t in toks[2:])
        sizes.append(c.kv_bytes())
        held.append(int(c.layers[2].fill.sum(-1).max()))  # generated tokens actually held
    assert c.get_seq_length() == prompt_len + 150
    assert max(held) <= budget + ps and held[-1] > budget  # evicting, within the bound
    dense_part = lambda s: 2 * 2 * 2 * 16 * 4 * 2 * (prompt_len + s + 1)  # 2 dense layers, B=2, Hkv=2, D=16, f32, K+V
    assert len({b - dense_part(s) for s, b in enumerate(sizes)}) == 1  # the policy layers' bytes never change
    # quest and dense keep growing; streaming stays flat
    q = sparseinfer.kv_cache(tiny, "quest", budget=budget, page_size=ps)
    for c in _decode_loop(tiny, q, prompt, 40):
        pass
    assert q.kv_tokens()[3] == prompt_len + 40


def test_raas_evicts_the_stalest_page():
    b, h, d, ps = 1, 2, 4, 2
    cache = SparseKVCache("raas", 1, dense_layers=0, budget=3 * ps, page_size=ps)  # 3 pages + the current one
    layer: RaaSLayer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    layer.update(torch.randn(b, h, 3, d, generator=g), torch.randn(b, h, 3, d, generator=g))
    for _ in range(4 * ps):  # fill all 4 slots (no attention call: timestamps = creation steps)
        layer.update(torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g))
    assert layer.fill.tolist() == [[[2, 2, 2, 2]] * 2]
    assert layer.ts.tolist() == [[[0.0, 2.0, 4.0, 6.0]] * 2]
    layer.ts[0, 0] = torch.tensor([5.0, 1.0, 3.0, 7.0])  # head 0: slot 1 is the stalest; head 1: slot 0
    layer.update(torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g))
    assert layer.cur.tolist() == [[1, 0]]
    assert layer.fill.tolist() == [[[2, 1, 2, 2], [1, 2, 2, 2]]]
    assert layer.ts.tolist() == [[[5.0, 8.0, 3.0, 7.0], [8.0, 2.0, 4.0, 6.0]]]
    assert layer.kv_tokens() == 3 + 4 * ps


def test_raas_refreshes_top_half_of_budget():
    b, h, d, ps = 1, 1, 4, 2
    cache = SparseKVCache("raas", 1, dense_layers=0, budget=4 * ps, page_size=ps)  # 4 pages: refresh the top 2
    layer: RaaSLayer = cache.layers[0]
    keys = torch.zeros(1, 1, 4 * ps, d)
    for p, s in enumerate([1.0, 5.0, 2.0, 4.0]):  # page p's keys point along +x with strength s
        keys[0, 0, p * ps:(p + 1) * ps, 0] = s
    layer.update(torch.zeros(b, h, 2, d), torch.zeros(b, h, 2, d))
    for t in range(4 * ps):
        layer.update(keys[:, :, t:t + 1], keys[:, :, t:t + 1])
    layer.update(torch.zeros(b, h, 1, d), torch.zeros(b, h, 1, d))  # a new current page in slot 4
    before = layer.ts.clone()
    q = torch.zeros(b, 1, 1, d)
    q[..., 0] = 1.0
    layer.decode_attention(q, 1.0)
    now = float(layer.step - 1)
    # the current page always ranks first; then page 1 (bound 5): refreshed; the rest unchanged
    assert layer.ts[0, 0, 4] == now and layer.ts[0, 0, 1] == now
    assert torch.equal(layer.ts[0, 0, [0, 2, 3]], before[0, 0, [0, 2, 3]])


def test_h2o_evicts_the_lightest_non_recent_token():
    b, h, d = 1, 2, 4
    cache = SparseKVCache("h2o", 1, dense_layers=0, heavy=2, recent=2)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    layer.update(torch.randn(b, h, 4, d, generator=g), torch.randn(b, h, 4, d, generator=g))
    layer._compress()
    layer.score = torch.tensor([[[0.5, 0.1, 0.9, 0.0], [0.2, 0.3, 0.1, 0.0]]])  # slot 3 (pos 3) is recent
    layer.update(torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g))
    assert layer.pos.tolist() == [[[0, 4, 2, 3], [0, 1, 4, 3]]]
    assert layer.kv_tokens() == 4


def test_streaming_and_h2o_keep_the_right_tokens(tiny):
    prompt = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = sparseinfer.kv_cache(tiny, "streaming", sink=3, window=5)
    for c in _decode_loop(tiny, cache, prompt, 10):
        pass
    pos = sorted(cache.layers[3].pos[0, 0].tolist())
    assert pos == [0, 1, 2] + list(range(40 - 5, 40))
    cache = sparseinfer.kv_cache(tiny, "h2o", heavy=4, recent=4)
    for c in _decode_loop(tiny, cache, prompt, 6):
        pass
    layer = cache.layers[3]
    pos = layer.pos[0, 0].tolist()
    assert sorted(pos)[-4:] == list(range(36 - 4, 36))
    # the heavy slots hold the tokens with the largest accumulated scores among the non-recent ones
    heavy = [i for i, p in enumerate(pos) if p < 32]
    assert len(heavy) == 4


def test_snapkv_keeps_window_and_votes(tiny):
    prompt = torch.randint(1, 96, (1, 60), generator=torch.Generator().manual_seed(6))
    cache = sparseinfer.kv_cache(tiny, "snapkv", capacity=20, window=8, kernel=3)
    for c in _decode_loop(tiny, cache, prompt, 5):
        pass
    pos = cache.layers[2].pos[0, 1].tolist()
    assert len(pos) == 25 and pos[-5:] == list(range(60, 65))
    assert set(range(52, 60)) <= set(pos[:20])


def test_patch_with_kv_policy(tiny):
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(8))
    ref_seq, _ = _generate(tiny, ids, None, 30)
    handle = sparseinfer.patch(tiny, "dense", kv="streaming", kv_options={"sink": 2, "window": 6, "dense_layers": 0})
    seq, _ = _generate(tiny, ids, None, 30)
    assert not torch.equal(seq, ref_seq)
    assert any(r.method == "kv" for r in handle.stats.records)
    sparseinfer.unpatch(tiny)
    assert not any(hasattr(m, KV_ATTR) for m in tiny.modules())
    assert getattr(tiny, "_sparseinfer_kv_hook", None) is None
    seq, _ = _generate(tiny, ids, None, 30)
    assert torch.equal(seq, ref_seq)


def test_stale_cache_on_modules_falls_back_to_dense(tiny):
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(9))
    sparseinfer.kv_cache(tiny, "streaming", sink=1, window=2)  # left on the modules
    ref_seq, ref_scores = _generate(tiny, ids, DynamicCache(), 10)
    sparseinfer.unpatch(tiny)
    seq, scores = _generate(tiny, ids, DynamicCache(), 10)
    assert torch.equal(seq, ref_seq) and torch.allclose(scores, ref_scores)


@pytest.mark.parametrize("policy,opts,match", [
    ("nope", {}, r"unknown policy 'nope'; expected one of"),
    ("raas", {"budget": 100}, r"'budget' expected a multiple of page_size=16, got 100"),
    ("raas", {"budget": 8}, r"'budget' expected an int >= 16, got 8"),
    ("raas", {"prompt": "all"}, r"'prompt' expected 'keep' or 'quest', got 'all'"),
    ("quest", {"budget": -1}, r"'budget' expected an int >= 16"),
    ("streaming", {"window": 0}, r"'window' expected an int >= 1, got 0"),
    ("h2o", {"heavy": 1.5}, r"'heavy' expected an int >= 0, got 1.5"),
    ("snapkv", {"capacity": 4, "window": 8}, r"'capacity' expected an int >= 8, got 4"),
    ("snapkv", {"kernel": 4}, r"'kernel' expected an odd int"),
    ("snapkv", {"pooling": "min"}, r"'pooling' expected 'avg' or 'max'"),
    ("raas", {"page": 16}, r"unknown option\(s\) \['page'\]; expected any of"),
    ("raas", {"dense_layers": 9}, r"dense_layers expected an int in \[0, 4\], got 9"),
    ("raas", {"dense_layers": [0, 7]}, r"dense_layers expected layer indices in \[0, 4\)"),
])
def test_errors(tiny, policy, opts, match):
    with pytest.raises(ValueError, match=match):
        sparseinfer.kv_cache(tiny, policy, **opts)


def test_errors_chunk_and_patch(tiny):
    cache = sparseinfer.kv_cache(tiny, "raas", budget=32)
    with torch.no_grad():
        tiny(torch.ones(1, 10, dtype=torch.long), **cache_kwargs(tiny, cache), use_cache=True)
        with pytest.raises(ValueError, match=r"expected one token per step after the prompt \(q_len 1\), got a 3-token"):
            tiny(torch.ones(1, 3, dtype=torch.long), **cache_kwargs(tiny, cache), use_cache=True)
    with pytest.raises(ValueError, match=r"'budget' expected a multiple"):
        sparseinfer.patch(tiny, "dense", kv="raas", kv_options={"budget": 20})
    with pytest.raises(ValueError, match="kv_options given without a kv policy"):
        sparseinfer.patch(tiny, "dense", kv_options={"budget": 32})
    sparseinfer.unpatch(tiny)


def test_budget_options_cover_policies():
    for p in POLICIES:
        SparseKVCache(p, 4, **budget_options(p, 64))


# ---------------------------------------------------------------- the real model, end to end


def test_smol_raas_end_to_end(smol):
    model, tok = smol
    text = "Question: Tom has 3 apples and buys 4 more. How many apples does he have? Let's think step by step."
    ids = tok(text, return_tensors="pt").input_ids
    ref_seq, ref_scores = _generate(model, ids, DynamicCache(), 12)
    try:
        cache = sparseinfer.kv_cache(model, "raas", budget=16)  # covers the 12 generated tokens
        seq, scores = _generate(model, ids, cache, 12)
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-3, atol=1e-3)
        small = sparseinfer.kv_cache(model, "raas", budget=4, page_size=2)  # evicts
        _generate(model, ids, small, 12)
        n = ids.shape[1]
        assert small.kv_tokens()[:2] == [n + 11] * 2
        assert all(t == n + 4 + 2 for t in small.kv_tokens()[2:])
        assert int(small.layers[5].fill.sum(-1).max()) <= 4 + 2
    finally:
        sparseinfer.unpatch(model)


# ---------------------------------------------------------------- eval decode (the report path, tiny model)


def test_eval_decode_replay_and_report(tiny, tmp_path):
    from sparseinfer.eval.decode import DecodeRun, _windows, dense_reference, load_runs, replay, write_report

    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(10))
    tokens, lp = dense_reference(tiny, ids, 24)
    runs = []
    for policy, opts, exact in [("dense", {}, True), ("raas", {"budget": 32}, True), ("streaming", {"sink": 2, "window": 4}, False)]:
        kl, agree, mem = replay(tiny, ids, tokens, lp, sparseinfer.kv_cache(tiny, policy, dense_layers=1, **opts), 8)
        if exact:
            assert float(kl.max()) < 1e-3 and float(agree.min()) == 1.0
        else:
            assert float(kl.mean()) > 1e-3
        runs.append(DecodeRun(policy, opts.get("budget", 0 if policy == "dense" else 6), opts, float(kl.mean()),
                              float(agree.mean()), _windows(kl, 8), _windows(agree, 8), mem))
    assert [m[0] for m in runs[0].kv_tokens] == [0, 8, 16, 23]
    info = {"prompt_tokens": 20, "gen_tokens": 24, "window": 8, "layers": 4, "dense_sample": "x"}
    md = write_report(runs, dict(info), tmp_path, "tiny", "cmd")
    assert "| raas |" in md.read_text() and (tmp_path / "decoding-top1.png").exists()
    back, info2, name = load_runs(tmp_path / "decoding.json")
    assert name == "tiny" and back[1].top1 == runs[1].top1
    sparseinfer.unpatch(tiny)


def test_num_return_sequences_repeats_policy_state(tiny):
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(tiny, DynamicCache()), max_new_tokens=8,
                            do_sample=False, num_return_sequences=2, num_beams=2, pad_token_id=0)
        for policy in ("raas", "h2o", "quest"):
            opts = {"raas": {"budget": 32}, "h2o": {"heavy": 32, "recent": 32}, "quest": {"budget": 64}}[policy]
            out = tiny.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(tiny, sparseinfer.kv_cache(tiny, policy, **opts)),
                                max_new_tokens=8, do_sample=False, num_return_sequences=2, num_beams=2, pad_token_id=0)
            assert torch.equal(out, ref), policy
    sparseinfer.unpatch(tiny)


# ---------------------------------------------------------------- the scored task and resumable eval


def test_recall_score():
    from sparseinfer.eval.decode_task import score

    facts = [("Anna", 12), ("Ben", 34), ("Carl", 56), ("Dora", 78), ("Emil", 90)]
    assert score("Carl: 56\nDora: 78\nEmil: 90\n", facts) == (1.0, 0.0)
    acc, rep = score("Carl: 56\nDora: 77\nCarl: 56\nCarl: 56\n", facts)  # wrong Dora, no Emil, a loop
    assert acc == pytest.approx(1 / 3) and rep == pytest.approx(2 / 4)
    assert score("Carl: 11\nCarl: 56\n", facts)[0] == 0.0  # the first answer for a name counts
    assert score("no list at all", facts) == (0.0, 0.0)


class _CharTok:
    """A character tokenizer for the tiny model (vocab 96)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, return_tensors=None):
        ids = [95 if c == "\n" else ord(c) - 31 if 32 <= ord(c) < 126 else 1 for c in text]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})()

    def decode(self, ids):
        return "".join("\n" if int(i) == 95 else chr(31 + int(i)) for i in ids)


def test_eval_decode_task_and_resume(tiny, tmp_path, monkeypatch):
    from sparseinfer import data
    from sparseinfer.eval import decode as ev
    from sparseinfer.eval.decode_task import recall_cases

    monkeypatch.setattr(data, "heldout_text", lambda: "Some essay text about startups and painting. " * 40)
    monkeypatch.setattr(ev, "PROMPT", "Count: 1, 2, 3")
    tok = _CharTok()
    cases = recall_cases(tok, n_cases=3, n_facts=4, filler=50)
    assert cases.ids.shape[0] == 3 and len({len(f) for f in cases.facts}) == 1
    for i, f in enumerate(cases.facts):  # the list and the two shown lines are in every prompt
        text = tok.decode(cases.ids[i].tolist())
        assert all(f"{a}: {b}\n" in text for a, b in f) and text.endswith(f"{f[0][0]}: {f[0][1]}\n{f[1][0]}: {f[1][1]}\n")
    logs = []
    kw = dict(task={"n_cases": 2, "n_facts": 4, "filler": 30}, cache_path=tmp_path / "cells.json", model_name="tiny",
              log=logs.append)
    runs, info = ev.run_decode(tiny, tok, ["dense", "raas", "streaming"], [16], gen_tokens=12, window=4, **kw)
    assert len(logs) == 1 + 2 * 3 and len(info["task_rows"]) == 3 and len(runs) == 3
    assert runs[0].top1 == 1.0 and runs[1].top1 == 1.0  # raas keeps the prompt and 16 generated tokens: exact
    assert info["task_rows"][1]["accuracy"] == info["task_rows"][0]["accuracy"]  # raas == dense here too
    logs.clear()
    runs2, info2 = ev.run_decode(tiny, tok, ["dense", "raas", "streaming"], [16], gen_tokens=12, window=4, **kw)
    assert logs == [] and [r.top1 for r in runs2] == [r.top1 for r in runs]  # every cell came from the cache
    md = ev.write_report(runs2, dict(info2), tmp_path, "tiny", "cmd").read_text()
    assert "## Scored task" in md and "| streaming |" in md and (tmp_path / "decoding-task.png").exists()
    sparseinfer.unpatch(tiny)
