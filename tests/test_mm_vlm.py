"""patch(model, "mminference") on a tiny random-weight Qwen2-VL (CPU, nothing downloaded) and on a
tiny Llama with synthetic modality ids."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration

import sparseinfer
from masks import masked_attention_f64, rel_err
from sparseinfer import integration, vlm
from test_mm_ops import mm_mask

T, H, W = 4, 8, 8  # video grid in patches -> T * H * W / 4 = 64 video tokens, 16 per frame
FULL = {"boundary": "q", "intra": {"all": {"pattern": "vertical_slash", "vertical": 1.0, "slash": 1.0}}}
MIXED = {"boundary": "2d", "intra": {"all": {"pattern": "vertical_slash", "vertical": {"text": 6, "video": 4},
                                             "slash": 66},
                                     "video": {"pattern": "grid", "sink": 4, "window": 8}}}


@pytest.fixture(scope="module")
def vl():
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    nv = T * H * W // 4
    ids = torch.cat([torch.randint(0, 240, (1, 40), generator=g), torch.tensor([[252]]), torch.full((1, nv), 251),
                     torch.tensor([[253]]), torch.randint(0, 240, (1, 50), generator=g)], 1)
    inputs = dict(input_ids=ids, mm_token_type_ids=(ids == 251).long() * 2,
                  pixel_values_videos=torch.randn(T * H * W, 3 * 2 * 2 * 2, generator=g),
                  video_grid_thw=torch.tensor([[T, H, W]]))
    with torch.no_grad():
        dense = model(**inputs).logits
    return model, inputs, dense


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_vlm_dense_patch_is_exact(vl):
    model, inputs, dense = vl
    handle = sparseinfer.patch(model, "dense", min_len=0)
    try:
        assert model.config.text_config._attn_implementation == "sparseinfer"
        assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is untouched
        assert torch.equal(_run(model, inputs), dense)
        assert len(handle.stats.records) == 2
    finally:
        sparseinfer.unpatch(model)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_vlm_mminference_full_budget_equals_dense_and_sees_modality(vl):
    model, inputs, dense = vl
    seen = []
    handle = sparseinfer.patch(model, "mminference", head=FULL, min_len=0)
    pat = model.model.language_model.layers[0].self_attn._sparseinfer.pattern
    orig = pat.select
    pat.select = lambda q, k, s: (seen.append((handle.context.modality.clone(), handle.context.frame)), orig(q, k, s))[1]
    try:
        out = _run(model, inputs)
    finally:
        sparseinfer.unpatch(model)
    assert rel_err(out, dense) < 1e-5
    assert handle.stats.density() == pytest.approx(1.0)
    (mod, frame), = seen
    assert torch.equal(mod, inputs["mm_token_type_ids"]) and frame == (H // 2) * (W // 2)
    assert not model._forward_pre_hooks  # unpatch removed the modality hook


def test_vlm_mminference_equals_dense_under_its_mask(vl):
    """Each layer's attention output equals float64 attention under the mask its selection induces."""
    model, inputs, _ = vl
    calls = []
    orig = integration.run_selections

    def spy(parts, q, k, v, scale, backend="auto", out=None):
        out = orig(parts, q, k, v, scale, backend, out=out)
        calls.append((parts, q, k, v, scale, out))
        return out

    handle = sparseinfer.patch(model, "mminference", head=MIXED, min_len=0, strides=(4, 8, 16, 32))
    integration.run_selections = spy
    try:
        _run(model, inputs)
    finally:
        integration.run_selections = orig
        sparseinfer.unpatch(model)
    assert len(calls) == 2
    for (sel,), q, k, v, scale, out in calls:
        kw = sel.kwargs
        n = q.shape[2]
        mask = mm_mask(n, kw["modality"], kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])
        assert rel_err(out, masked_attention_f64(q, k, v, mask, scale)) < 1e-5
        assert 0.2 < float(sel.density.mean()) < 0.95  # really sparse, and consistent with the mask:
        assert torch.allclose(sel.density.double(), mask.double().sum((-1, -2)) / (n * (n + 1) / 2), atol=1e-6)
    assert handle.stats.records[0].method == "mminference"


def test_modality_from_input_ids_and_frame():
    cfg = Qwen2VLConfig(image_token_id=7, video_token_id=8)
    ids = torch.tensor([[1, 7, 7, 2, 8, 8, 8, 3]])
    assert vlm.modality_from_inputs(cfg, {"input_ids": ids}).tolist() == [[0, 1, 1, 0, 2, 2, 2, 0]]
    assert vlm.frame_from_inputs(cfg, {"video_grid_thw": torch.tensor([[3, 12, 20]])}) == 6 * 10


def _tiny_llama():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_language_model_with_synthetic_modality_ids():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    handle = sparseinfer.patch(model, "mminference", head=FULL, min_len=0)
    try:
        with pytest.raises(ValueError, match="no modality ids"):
            model(ids)
        mod = torch.zeros(1, 200, dtype=torch.long)
        mod[:, 50:150] = 2
        handle.context.set(mod, 25)
        with torch.no_grad():
            out = model(ids).logits
    finally:
        sparseinfer.unpatch(model)
    assert rel_err(out, dense) < 1e-5


@pytest.mark.parametrize("opts,match", [
    ({"head": {"boundary": "x", "intra": {}}}, "expected boundary"),
    ({"head": {"boundary": "q", "intra": {"text": {"pattern": "grid", "sink": 4}}}}, "needs"),
    ({"head": {"boundary": "none", "intra": {"video": {"pattern": "ashape", "sink": 4, "window": 4}}}}, "key 'all'"),
    ({"head": {"boundary": "q", "intra": {"all": {"pattern": "vertical_slash", "vertical": {"text": 3}, "slash": 9}}}},
     "needs boundary 'k' or '2d'"),
    ({"bogus": 1}, "unknown option"),
    ({"config": {"schema_version": 1, "layers": [[{"pattern": "ashape", "sink": 1, "window": 1}]]}}, "mminference"),
])
def test_mminference_options_validated(opts, match):
    with pytest.raises(ValueError, match=match):
        sparseinfer.patch(_tiny_llama(), "mminference", **opts)


def test_vlm_mminference_generate(vl):
    """generate(): the pre-fill runs mminference with the prompt's modality ids, decoding steps run dense."""
    model, inputs, _ = vl
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    handle = sparseinfer.patch(model, "mminference", head=FULL, min_len=0)
    try:
        with torch.no_grad():
            got = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        sparseinfer.unpatch(model)
    assert torch.equal(got, want)
    routes = [(r.method, r.reason) for r in handle.stats.records]
    assert routes[:2] == [("mminference", "")] * 2 and set(routes[2:]) == {("dense", "decode")}
