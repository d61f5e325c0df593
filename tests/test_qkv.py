"""sparseinfer.qkv: q/k/v projections as one product over one stacked weight buffer."""
import pytest
import torch

import sparseinfer
from sparseinfer import qkv
from sparseinfer.kv import cache_kwargs


def _model(kind: str = "llama", layers: int = 2, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    model = model.to(dtype).eval()
    if kind == "qwen2":  # random biases (zero-initialised), so that a wrong bias block shows
        with torch.no_grad():
            for lay in model.model.layers:
                for lin in (lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj):
                    lin.bias.normal_()
    return model


def _generate(model, ids, steps=4):
    """Greedy pre-fill + decode steps with the model's default cache -> logits of every step [steps + 1, V]."""
    out, past, x = [], None, ids
    with torch.no_grad():
        for _ in range(steps + 1):
            r = model(input_ids=x, **cache_kwargs(model, past), use_cache=True)
            past = r.cache if hasattr(r, "cache") else r.past_key_values
            out.append(r.logits[0, -1])
            x = r.logits[:, -1:].argmax(-1)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_projections_compute_the_unfused_model(kind):
    """float64: pre-fill and decode logits of the fused model equal the unfused ones (to rounding);
    the weights are row blocks of one buffer (no copy), and unfuse gives each its own storage back
    with the same values."""
    model = _model(kind)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    want = _generate(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert qkv.fuse(model) == 2 and qkv.fused_layers(model) == 2
    for lay in model.model.layers:
        a = lay.self_attn
        w = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        assert len({t.untyped_storage().data_ptr() for t in w}) == 1
        assert w[1].data_ptr() == w[0].data_ptr() + w[0].numel() * w[0].element_size()
        if kind == "qwen2":
            assert a.q_proj.bias.untyped_storage().data_ptr() == a.v_proj.bias.untyped_storage().data_ptr()
    assert qkv.fuse(model) == 0  # already fused: left alone
    got = _generate(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    qkv.unfuse(model)
    assert qkv.fused_layers(model) == 0
    a = model.model.layers[0].self_attn
    assert a.q_proj.weight.untyped_storage().data_ptr() != a.k_proj.weight.untyped_storage().data_ptr()
    assert "forward" not in vars(a.q_proj)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(_generate(model, ids), want, rtol=0, atol=0)


def test_k_or_v_called_on_another_input_computes_its_own_projection():
    """Only k/v calls on q_proj's very input tensor read the kept product; any other input (or
    order) gets its own projection, so a caller that projects different tensors is never served
    stale values."""
    model = _model()
    a = model.model.layers[0].self_attn
    x, y = torch.randn(1, 3, 64, dtype=torch.float64), torch.randn(1, 3, 64, dtype=torch.float64)
    want = [torch.nn.functional.linear(t, lin.weight, lin.bias) for t, lin in ((x, a.q_proj), (y, a.k_proj),
                                                                              (y, a.v_proj), (x, a.k_proj))]
    qkv.fuse(model)
    got = [a.q_proj(x), a.k_proj(y), a.v_proj(y), a.k_proj(x)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert got[3].shape == (1, 3, 32) and a.v_proj(x).shape == (1, 3, 32)  # the kept product, k then v blocks
    model.to(torch.float32)  # a cast after fusing leaves the buffer behind: the call fails, never stale values
    with pytest.raises(RuntimeError):
        a.q_proj(x.float())
    qkv.unfuse(model)


def test_patch_fuses_on_request_and_unpatch_restores(tmp_path):
    """patch(fuse_qkv=True) on the CPU (the default there is off) fuses every layer and keeps the
    dense logits; save_pretrained while fused writes the same weights; a wrong fuse_qkv value is
    refused before anything changes."""
    model = _model(dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    want = _generate(model, ids)
    h = sparseinfer.patch(model, "dense")
    assert h.qkv_fused == 0 and qkv.fused_layers(model) == 0  # CPU default: off
    h = sparseinfer.patch(model, "dense", fuse_qkv=True)
    assert h.qkv_fused == 2 and qkv.fused_layers(model) == 2
    torch.testing.assert_close(_generate(model, ids), want, rtol=1e-4, atol=1e-4)
    path = tmp_path / "fused"
    model.save_pretrained(path)  # while fused: the parameters are contiguous row blocks of the buffer
    back = type(model).from_pretrained(path).eval()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    sparseinfer.unpatch(model)
    assert qkv.fused_layers(model) == 0
    with pytest.raises(ValueError, match="fuse_qkv expected None, True or False, got 'yes'"):
        sparseinfer.patch(model, "dense", fuse_qkv="yes")
    assert not hasattr(model, "_sparseinfer_patch") and qkv.fused_layers(model) == 0


def test_real_model_generates_the_same_tokens_fused(smol):
    """SmolLM2-135M (float32): greedy generation through patch(fuse_qkv=True) gives the unpatched
    model's tokens, and its step logits agree to float32 rounding."""
    model, tok = smol
    ids = tok("The essay argues that the best way to get startup ideas is", return_tensors="pt").input_ids
    want = _generate(model, ids, steps=8)
    h = sparseinfer.patch(model, "dense", fuse_qkv=True)
    try:
        assert h.qkv_fused == model.config.num_hidden_layers
        got = _generate(model, ids, steps=8)
    finally:
        sparseinfer.unpatch(model)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
