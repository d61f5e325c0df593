"""The patched runs compared between one process and a tensor-parallel group (tests/test_parallel.py)."""
import torch

N = 300  # not a multiple of the 64-token blocks: tail masking is exercised too


def mixed_config(model_config) -> dict:
    """A per-head minference config where neighbouring heads (and KV groups) differ."""
    kinds = [
        {"pattern": "ashape", "sink": 16, "window": 48},
        {"pattern": "vertical_slash", "vertical": 24, "slash": 40},
        {"pattern": "block_sparse", "topk": 2, "block_size": 64},
        {"pattern": "vertical_slash", "vertical": 0.2, "slash": 0.1},
    ]
    heads, layers = model_config.num_attention_heads, model_config.num_hidden_layers
    return {"schema_version": 1, "model": "test", "layers": [
        [dict(kinds[(h + layer) % len(kinds)]) for h in range(heads)] for layer in range(layers)]}


def cases(model_config) -> dict:
    """name -> (method, options)."""
    from sparseinfer.gate import Gates

    torch.manual_seed(0)  # the same untrained gates in every process
    gates = Gates.new(model_config, block_size=64, width=8)
    return {
        "dense": ("dense", {}),
        "ashape": ("ashape", {"sink": 16, "window": 64}),
        "vertical_slash": ("vertical_slash", {"vertical": 32, "slash": 48, "last_q": 32}),
        "block_sparse": ("block_sparse", {"topk": 2, "block_size": 64}),
        "minference": ("minference", {"config": mixed_config(model_config), "last_q": 32}),
        "adaptive": ("adaptive", {"gates": gates, "density": 0.5}),
        "xattention": ("xattention", {"tau": [0.5 + 0.05 * h for h in range(model_config.num_attention_heads)],
                                      "stride": 8, "block_size": 64}),
        "flexprefill": ("flexprefill", {"gamma": 0.8, "tau": 0.1, "block_size": 64}),
    }


@torch.no_grad()
def run_cases(model, sparseinfer) -> dict:
    """Logits [1, N, V] of every case, plus 6 greedy tokens decoded with the raas KV policy."""
    vocab = model.config.vocab_size
    ids = (torch.arange(N) * 7919 % vocab)[None]
    out = {}
    for name, (method, options) in cases(model.config).items():
        sparseinfer.patch(model, method, min_len=0, **options)
        out[name] = model(ids).logits.float()
        sparseinfer.unpatch(model)
    sparseinfer.patch(model, "vertical_slash", min_len=0, vertical=32, slash=48, kv="raas",
                      kv_options={"budget": 32, "prompt": "quest", "prompt_budget": 64})
    out["raas_generate"] = model.generate(ids, max_new_tokens=6, do_sample=False)
    sparseinfer.unpatch(model)
    return out
