"""Collect a Llama-family model's per-layer activations on real text (calibration data for
TEAL thresholds and Deja Vu predictors).

Sites per decoder layer (N = tokens collected, H = hidden, I = intermediate, Hq = query heads):
    attn_in  [N, H]    the attention input (input_layernorm output) = input of q/k/v_proj
    o_in     [N, Hq*D] the input of o_proj (attention output, heads concatenated)
    mlp_in   [N, H]    the MLP input (post_attention_layernorm output) = input of gate/up_proj
    down_in  [N, I]    the input of down_proj, SiLU(gate) * up  (stored in float16)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

SITES = ("attn_in", "o_in", "mlp_in", "down_in")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a Llama-family model (each with self_attn.{q,k,v,o}_proj and
    mlp.{gate,up,down}_proj); ValueError for anything else."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"contextual sparsity: expected a model with .model.layers, got {type(model).__name__}")
    for i, layer in enumerate(layers):
        mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if mlp is None or attn is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) \
                or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not hasattr(layer, "input_layernorm"):
            raise ValueError(f"contextual sparsity: layer {i} ({type(layer).__name__}) is not a SwiGLU/GQA Llama-family "
                             f"layer (expected mlp.gate/up/down_proj, self_attn.q/k/v/o_proj, input_layernorm)")
    return list(layers)


@dataclass
class Activations:
    """Per-layer activations: site -> list over layers of [N, width] tensors."""

    sites: dict[str, list[torch.Tensor]]
    n_tokens: int

    def layer(self, site: str, i: int) -> torch.Tensor:
        return self.sites[site][i]


@torch.no_grad()
def collect(model, tok, text, n_tokens: int = 4096, window: int = 1024, progress: bool = True,
            sites: tuple[str, ...] = SITES) -> Activations:
    """Run `model` densely over the first `n_tokens` tokens of `text` (a string, tokenized with
    `tok`, or a 1-D tensor of token ids), in independent windows of `window` tokens, and record
    `sites` of every layer (see the module docstring)."""
    bad = sorted(set(sites) - set(SITES))
    if bad:
        raise ValueError(f"collect: unknown site(s) {bad}; expected any of {list(SITES)}")
    if isinstance(text, torch.Tensor):
        if text.dim() != 1:
            raise ValueError(f"collect: expected 1-D token ids, got shape {tuple(text.shape)}")
        ids = text
    else:
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"collect: expected text of at least {n_tokens} tokens, got {ids.numel()}")
    layers = decoder_layers(model)
    store: dict[str, list[list[torch.Tensor]]] = {s: [[] for _ in layers] for s in sites}
    handles = []

    def keep(site, i, t):
        if site in store:
            t = t.detach().reshape(-1, t.shape[-1])
            store[site][i].append(t.to(torch.float16) if site == "down_in" else t.float().clone())

    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: keep("attn_in", i, o)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(lambda m, a, o, i=i: keep("mlp_in", i, o)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: keep("o_in", i, a[0])))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: keep("down_in", i, a[0])))
    dev = next(model.parameters()).device
    try:
        starts = range(0, n_tokens, window)
        for s in tqdm(starts, desc="collecting activations", disable=not progress):
            chunk = ids[s:min(s + window, n_tokens)][None].to(dev)
            model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return Activations({s: [torch.cat(parts) for parts in v] for s, v in store.items()}, n_tokens)
