"""patch / unpatch on the real SmolLM2-135M model (and a tiny random model for odd cases)."""
import warnings

import pytest
import torch

import sparseinfer
from masks import rel_err

N = 640  # > default min_len, not a multiple of 64
FULL = {
    "ashape": {"sink": 1.0, "window": 1.0},
    "vertical_slash": {"vertical": 1.0, "slash": 1.0},
    "block_sparse": {"topk": 1.0},
}
SMALL = {
    "ashape": {"sink": 16, "window": 32},
    "vertical_slash": {"vertical": 16, "slash": 64},
    "block_sparse": {"topk": 1},
}


@pytest.fixture(scope="module")
def batch(smol, essay_ids):
    return torch.tensor([essay_ids[:N]])


@pytest.fixture(scope="module")
def dense_logits(smol, batch):
    model, _ = smol
    with torch.no_grad():
        return model(batch).logits


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(batch, **kw).logits


def test_dense_patch_is_exact_and_unpatch_restores(smol, batch, dense_logits):
    model, _ = smol
    handle = sparseinfer.patch(model, "dense")
    try:
        assert model.config._attn_implementation == "sparseinfer"
        assert torch.equal(_logits(model, batch), dense_logits)
        assert handle.stats.density() == 1.0
        assert len(handle.stats.records) == model.config.num_hidden_layers
    finally:
        sparseinfer.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, batch), dense_logits)


@pytest.mark.parametrize("method", list(FULL))
def test_full_budget_matches_dense(smol, batch, dense_logits, method):
    model, _ = smol
    handle = sparseinfer.patch(model, method, **FULL[method])
    try:
        out = _logits(model, batch)
    finally:
        sparseinfer.unpatch(model)
    assert rel_err(out, dense_logits) <= 1e-4
    assert abs(handle.stats.density() - 1.0) < 1e-6
    assert {r.method for r in handle.stats.records} == {method}


@pytest.mark.parametrize("method", list(SMALL))
def test_small_budget_is_finite_and_differs(smol, batch, dense_logits, method):
    model, _ = smol
    handle = sparseinfer.patch(model, method, **SMALL[method])
    try:
        out = _logits(model, batch)
    finally:
        sparseinfer.unpatch(model)
    assert torch.isfinite(out).all()
    assert rel_err(out, dense_logits) > 1e-3
    assert 0.0 < handle.stats.density() < 0.5
    assert len(handle.stats.per_layer()) == model.config.num_hidden_layers


def test_min_len_routes_short_prompts_to_dense(smol, batch, dense_logits):
    model, _ = smol
    handle = sparseinfer.patch(model, "vertical_slash", vertical=16, slash=16, min_len=N + 1)
    try:
        out = _logits(model, batch)
    finally:
        sparseinfer.unpatch(model)
    assert torch.equal(out, dense_logits)
    assert {r.method for r in handle.stats.records} == {"dense"}


def test_decoding_steps_are_dense(smol, batch):
    model, _ = smol
    handle = sparseinfer.patch(model, "ashape", sink=16, window=64)
    try:
        with torch.no_grad():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=3, do_sample=False)
    finally:
        sparseinfer.unpatch(model)
    assert out.shape[1] == N + 3
    layers = model.config.num_hidden_layers
    methods = [(r.q_len, r.method) for r in handle.stats.records]
    assert methods[:layers] == [(N, "ashape")] * layers
    assert set(methods[layers:]) == {(1, "dense")}


def test_padded_batch_falls_back_to_dense_with_one_warning(smol, batch):
    model, _ = smol
    ids = batch[:, :200].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding in row 0
    want = _logits(model, ids, attention_mask=mask)
    sparseinfer.patch(model, "vertical_slash", vertical=8, slash=8, min_len=0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _logits(model, ids, attention_mask=mask)
    finally:
        sparseinfer.unpatch(model)
    assert torch.equal(got, want)
    assert sum("computed with dense attention" in str(w.message) for w in caught) == 1


def test_patch_errors(smol):
    model, _ = smol
    with pytest.raises(ValueError, match=r"unknown method 'magic'.*vertical_slash"):
        sparseinfer.patch(model, "magic")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sink'\].*vertical"):
        sparseinfer.patch(model, "vertical_slash", sink=3)
    with pytest.raises(ValueError, match="vertical: expected"):
        sparseinfer.patch(model, "vertical_slash", vertical=-2)
    with pytest.raises(ValueError, match="min_len"):
        sparseinfer.patch(model, "dense", min_len=-1)
    with pytest.raises(ValueError, match="not patched"):
        sparseinfer.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"expected a model of type \['llama'.*got 'gpt2'"):
        sparseinfer.patch(gpt2, "dense")


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3", "qwen3"])
def test_other_families_full_budget(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               sliding_window=None, use_sliding_window=False, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 64, (1, 150))
    want = _logits(model, ids)
    sparseinfer.patch(model, "vertical_slash", vertical=1.0, slash=1.0, min_len=0)
    got = _logits(model, ids)
    sparseinfer.patch(model, "vertical_slash", vertical=4, slash=4, min_len=0)
    small = _logits(model, ids)
    sparseinfer.unpatch(model)
    assert rel_err(got, want) <= 1e-4 and rel_err(small, want) > 1e-4


def _tiny_llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def test_patched_model_under_torch_compile_runs_the_sparse_prefill_outside_the_graph():
    """Every decoder layer compiled (aot_eager: dynamo's tracing and guards, no codegen): the
    pre-fill attention runs eagerly between the graphs, so its indices, output and records are
    those of the eager patched model, and calls do not recompile."""
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    handle = sparseinfer.patch(model, "vertical_slash", vertical=16, slash=32, min_len=64)
    try:
        ref = _logits(model, ids)
        handle.stats.reset()
        torch._dynamo.reset()
        for layer in model.model.layers:
            layer.compile(backend="aot_eager", dynamic=False)
        out = _logits(model, ids)
        out2 = _logits(model, ids)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out3 = _logits(model, ids)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile
    finally:
        for layer in model.model.layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()
        sparseinfer.unpatch(model)
    assert rel_err(out, ref) < 1e-5 and torch.equal(out, out2) and torch.equal(out, out3)
    recs = handle.stats.records
    assert len(recs) == 3 * 2 and {r.method for r in recs} == {"vertical_slash"}
    assert 0 < handle.stats.density() < 0.9


def test_gqa_decode_attention_equals_transformers_sdpa_path():
    """The decode-step attention with the KV heads shared inside SDPA (what `_dense` runs for one
    query row on CUDA) equals transformers' path (K/V repeated per query head), with a
    StaticCache-style mask and without one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sparseinfer.integration import gqa_decode_attention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 1, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., :31] = True
    mask[1, ..., :12] = True
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    for m in (mask, None):
        want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3)
        got = gqa_decode_attention(q, k, v, m, 0.3)
        assert got.shape == want.shape == (2, 1, 8, 16)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # the masked-out keys really are out: changing them changes nothing
    k2 = k.clone()
    k2[1, :, 12:] = 100.0
    torch.testing.assert_close(gqa_decode_attention(q, k2, v, mask, 0.3), gqa_decode_attention(q, k, v, mask, 0.3))
