"""CUDA-graph friendliness of the KV policies, checked on the CPU.

A CUDA graph records the device work of one decode step and replays it: Python code does not
run again, so any state kept in Python (a step counter, a length) freezes, and any host sync
(.item(), int(tensor), data-dependent shapes) breaks the capture. `make_fx` has the same two
properties: it records the tensor ops of one call (erroring on a host sync, the
aten._local_scalar_dense op), and replaying the recorded graph runs no Python. So: trace one
decode step of a whole transformers model with make_fx, replay the trace for the next steps,
and require the logits to equal eager decoding step by step.
"""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from transformers import LlamaConfig, LlamaForCausalLM

import sparseinfer
from sparseinfer.kv import SparseKVCache, cache_kwargs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    m = LlamaForCausalLM(cfg).eval()
    yield m
    sparseinfer.unpatch(m)


def _decode(model, policy, opts, prompt, tokens, traced: bool):
    """Logits of steps 2.. of a teacher-forced decode; with traced=True, step 1 is recorded by
    make_fx and steps 2.. replay the record (no Python runs, as in a CUDA graph replay)."""
    cache = sparseinfer.kv_cache(model, policy, dense_layers=0, **opts)
    n = prompt.shape[1]
    out = []

    def step(tok, pos):
        return model(input_ids=tok, position_ids=pos, cache_position=pos[0], **cache_kwargs(model, cache),
                     use_cache=True).logits

    with torch.no_grad():
        model(prompt, **cache_kwargs(model, cache), use_cache=True)
        step(tokens[:, :1], torch.full((prompt.shape[0], 1), n))  # eager warm-up (compresses the prompt)
        fn = step
        for t in range(1, tokens.shape[1]):
            args = (tokens[:, t:t + 1], torch.full((prompt.shape[0], 1), n + t))
            if traced and t == 1:
                fn = make_fx(step)(*args)  # runs step 1 once while recording it
                continue
            if t > 1:
                out.append(fn(*args))
            else:
                fn(*args)
    return out


@pytest.mark.parametrize("policy,opts", [
    ("raas", {"budget": 32, "page_size": 8}),
    ("raas", {"budget": 32, "page_size": 8, "prompt": "quest", "prompt_budget": 16}),
    ("streaming", {"sink": 4, "window": 20}),
    ("h2o", {"heavy": 10, "recent": 10}),
])
def test_recorded_decode_step_replays_like_eager(model, policy, opts):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 96, (2, 40), generator=g)
    tokens = torch.randint(1, 96, (2, 45), generator=g)  # 45 steps: past every budget, evictions included
    eager = _decode(model, policy, opts, prompt, tokens, traced=False)
    replayed = _decode(model, policy, opts, prompt, tokens, traced=True)
    assert len(eager) == len(replayed) == 43
    for t, (a, b) in enumerate(zip(eager, replayed)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"{policy}: step {t + 2} differs")


def test_quest_selection_is_static_and_sync_free():
    """Quest keeps every token (its buffers grow, so its whole step is not capturable), but its
    page selection has a static shape (budget // page_size, -1 padded) and no host sync."""
    g = torch.Generator().manual_seed(2)
    layer = SparseKVCache("quest", 1, dense_layers=0, budget=64, page_size=8).layers[0]
    k = torch.randn(1, 2, 20, 16, generator=g)  # 3 pages < 8 selected
    layer.update(k, k)
    q = torch.randn(1, 4, 1, 16, generator=g)
    sel = make_fx(lambda x: layer.select(x))(q)(q)
    assert sel.shape == (1, 2, 8)
    for row in sel.reshape(-1, 8).tolist():
        assert sorted(row) == [-1] * 5 + [0, 1, 2]
