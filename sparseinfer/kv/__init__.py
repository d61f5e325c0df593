"""KV-cache policies for long decoding with bounded memory, as transformers `Cache` objects.

    cache = sparseinfer.kv_cache(model, "raas", budget=1024)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4096)
    # transformers >= 5.24: cache=cache (or **sparseinfer.kv.cache_kwargs(model, cache) for either)

Policies (options; budgets in tokens):
  dense      every token kept, dense decode (equals transformers' DynamicCache)
  streaming  sink=4, window=1020            (StreamingLLM: sinks + a recent window)
  h2o        heavy=512, recent=512          (accumulated attention: heavy hitters + recent)
  snapkv     capacity=1024, window=32, kernel=7, pooling="avg" | "max"
             (the last `window` prompt queries vote, pooled; the prompt is cut to `capacity`
             tokens once, generated tokens are all kept)
  quest      budget=1024, page_size=16      (all KV kept; top pages by the Quest bound)
  raas       budget=1024, page_size=16, prompt="keep" | "quest", prompt_budget=budget,
             select=budget + page_size      (prompt kept; generated pages with timestamps)
Every policy takes dense_layers (default 2: the first two layers keep every token and decode
densely; an int n = the first n layers, or a list of layer indices).

`kv_cache` patches the model with `sparseinfer.patch(model, "dense")` if it is not patched and
sets the cache on every attention module (`sparseinfer.integration.KV_ATTR`); the registered
attention function hands decode steps to `cache.decode_attention` and full pre-fills to
`cache.observe_prefill`. A module whose cache did not just see an update (e.g. generate with
another cache) falls back to dense SDPA.
"""
from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache

from .layers import DenseLayer, QuestLayer, RaaSLayer, SlotLayer

__all__ = ["kv_cache", "SparseKVCache", "POLICIES", "budget_options", "attach", "detach"]

# policy -> {option: default}
POLICIES: dict[str, dict] = {
    "dense": {},
    "streaming": {"sink": 4, "window": 1020},
    "h2o": {"heavy": 512, "recent": 512},
    "snapkv": {"capacity": 1024, "window": 32, "kernel": 7, "pooling": "avg"},
    "quest": {"budget": 1024, "page_size": 16},
    "raas": {"budget": 1024, "page_size": 16, "prompt": "keep", "prompt_budget": None, "select": None},
}


def _err(policy, msg):
    return ValueError(f"kv_cache({policy!r}): {msg}")


def _int(policy, name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _err(policy, f"option {name!r} expected an int >= {lo}, got {value!r}")


def _validate(policy: str, options: dict) -> dict:
    if policy not in POLICIES:
        raise ValueError(f"kv_cache: unknown policy {policy!r}; expected one of {list(POLICIES)}")
    spec = POLICIES[policy]
    bad = sorted(set(options) - set(spec))
    if bad:
        raise _err(policy, f"unknown option(s) {bad}; expected any of {sorted(spec) + ['dense_layers']}")
    o = dict(spec, **options)
    if policy == "streaming":
        _int(policy, "sink", o["sink"], 0)
        _int(policy, "window", o["window"], 1)
    elif policy == "h2o":
        _int(policy, "heavy", o["heavy"], 0)
        _int(policy, "recent", o["recent"], 1)
    elif policy == "snapkv":
        _int(policy, "window", o["window"], 1)
        _int(policy, "capacity", o["capacity"], o["window"])
        _int(policy, "kernel", o["kernel"], 1)
        if o["kernel"] % 2 == 0:
            raise _err(policy, f"option 'kernel' expected an odd int (centred pooling), got {o['kernel']}")
        if o["pooling"] not in ("avg", "max"):
            raise _err(policy, f"option 'pooling' expected 'avg' or 'max', got {o['pooling']!r}")
    elif policy in ("quest", "raas"):
        _int(policy, "page_size", o["page_size"], 1)
        _int(policy, "budget", o["budget"], o["page_size"])
    if policy == "raas":
        ps = o["page_size"]
        if o["budget"] % ps:
            raise _err(policy, f"option 'budget' expected a multiple of page_size={ps}, got {o['budget']}")
        if o["prompt"] not in ("keep", "quest"):
            raise _err(policy, f"option 'prompt' expected 'keep' or 'quest', got {o['prompt']!r}")
        if o["prompt_budget"] is None:
            o["prompt_budget"] = o["budget"]
        _int(policy, "prompt_budget", o["prompt_budget"], ps)
        if o["select"] is None:
            o["select"] = o["budget"] + ps
        _int(policy, "select", o["select"], 1)
    return o


def budget_options(policy: str, budget: int) -> dict:
    """One token budget mapped to each policy's options (as in the RaaS paper's comparisons)."""
    if policy == "dense":
        return {}
    if policy == "streaming":
        return {"sink": 4, "window": max(1, budget - 4)}
    if policy == "h2o":
        return {"heavy": budget // 2, "recent": max(1, budget - budget // 2)}
    if policy == "snapkv":
        w = min(32, max(1, budget // 2))
        return {"capacity": max(budget, w), "window": w}
    if policy in ("quest", "raas"):
        return {"budget": budget}
    raise ValueError(f"budget_options: unknown policy {policy!r}; expected one of {list(POLICIES)}")


def _dense_set(dense_layers, n_layers: int, policy: str) -> frozenset:
    if isinstance(dense_layers, bool):
        raise _err(policy, f"dense_layers expected an int (the first n layers) or a list of layer indices, "
                           f"got {dense_layers!r}")
    if isinstance(dense_layers, int):
        if not 0 <= dense_layers <= n_layers:
            raise _err(policy, f"dense_layers expected an int in [0, {n_layers}], got {dense_layers}")
        return frozenset(range(dense_layers))
    try:
        out = frozenset(dense_layers)
    except TypeError:
        raise _err(policy, f"dense_layers expected an int or a list of layer indices, got {dense_layers!r}") from None
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in out):
        raise _err(policy, f"dense_layers expected layer indices in [0, {n_layers}), got {sorted(out, key=str)}")
    return out


class SparseKVCache(Cache):
    """A transformers Cache whose layers follow one KV policy (dense layers excepted)."""

    def __init__(self, policy: str, n_layers: int, dense_layers=2, **options):
        o = _validate(policy, options)
        self.policy, self.options = policy, o
        self.dense_layers = _dense_set(dense_layers, n_layers, policy)
        self.attention_mask2d = None  # the 2-D padding mask of the current forward (captured by a hook)
        layers = []
        for i in range(n_layers):
            if policy == "dense" or i in self.dense_layers:
                layers.append(DenseLayer(self))
            elif policy == "streaming":
                layers.append(SlotLayer(self, "streaming", o["sink"] + o["window"], o))
            elif policy == "h2o":
                layers.append(SlotLayer(self, "h2o", o["heavy"] + o["recent"], o))
            elif policy == "snapkv":
                layers.append(SlotLayer(self, "snapkv", o["capacity"], o))
            elif policy == "quest":
                layers.append(QuestLayer(self, o["budget"], o["page_size"]))
            else:
                layers.append(RaaSLayer(self, o["budget"], o["page_size"], o["prompt"], o["prompt_budget"], o["select"]))
        super().__init__(layers=layers)

    def __repr__(self):
        return f"SparseKVCache(policy={self.policy!r}, options={self.options}, dense_layers={sorted(self.dense_layers)})"

    # ---- called by sparseinfer.integration's attention function
    def decode_attention(self, layer_idx: int, query, key, value, scale):
        """[B, Hq, 1, D] attention for one decode step, or None (dense over what update returned)."""
        layer = self.layers[layer_idx]
        if not layer.fresh:  # this cache did not just take this step's token: not ours to answer
            return None
        layer.fresh = False
        return layer.decode_attention(query, scale)

    def observe_prefill(self, layer_idx: int, query, key, scale) -> None:
        self.layers[layer_idx].observe_prefill(query, key, scale)

    # ---- memory
    def kv_tokens(self) -> list[int]:
        """KV slots allocated per layer (per sequence and KV head)."""
        return [layer.kv_tokens() for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes held by the KV tensors of every layer (keys and values, all buffers)."""
        total = 0
        for layer in self.layers:
            for name in ("keys", "values", "gk", "gv"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def cache_key(kwargs: dict) -> str:
    """The keyword a model call got its Cache under: transformers >= 5.24 names it `cache`
    (`past_key_values` before, still accepted with a deprecation warning until 5.40 / 6.0)."""
    return "cache" if "cache" in kwargs else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{keyword: cache} for `model(...)` / `model.generate(...)`: `cache` where the model's
    forward takes it (transformers >= 5.24), else `past_key_values`."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _capture_hook(module, args, kwargs):
    """Model forward pre-hook: give a SparseKVCache the 2-D padding mask of this call; with
    `patch(model, kv=...)`, replace generate's fresh empty DynamicCache by the policy's cache."""
    key = cache_key(kwargs)
    pkv = kwargs.get(key)
    spec = getattr(module, "_sparseinfer_kv_spec", None)
    if spec is not None and type(pkv).__name__ == "DynamicCache" and pkv.get_seq_length() == 0:
        pkv = kv_cache(module, spec[0], **spec[1])
        kwargs = dict(kwargs, **{key: pkv})
    if isinstance(pkv, SparseKVCache):
        m = kwargs.get("attention_mask")
        pkv.attention_mask2d = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
    return args, kwargs


def _install_hook(model) -> None:
    if getattr(model, "_sparseinfer_kv_hook", None) is None:
        model._sparseinfer_kv_hook = model.register_forward_pre_hook(_capture_hook, with_kwargs=True)


def kv_cache(model, policy: str = "raas", *, dense_layers=2, **options) -> SparseKVCache:
    """A fresh KV cache following `policy` for `model` (see the module docstring), wired into
    the model's attention modules. Pass it to `model.generate(..., past_key_values=cache)`
    (`cache=cache` on transformers >= 5.24; `cache_kwargs(model, cache)` gives the right one).
    One cache serves one generation; make a new one per call."""
    from .. import integration

    n_layers = model.config.num_hidden_layers
    cache = SparseKVCache(policy, n_layers, dense_layers=dense_layers, **options)
    if not hasattr(model, "_sparseinfer_patch"):
        integration.patch(model, "dense")
    for m in integration._attention_modules(model):
        setattr(m, integration.KV_ATTR, cache)
    _install_hook(model)
    return cache


def attach(model, policy: str, options: dict | None) -> None:
    """For `patch(model, ..., kv=policy, kv_options=...)`: every generate that starts with an
    empty DynamicCache (the default) gets a fresh `kv_cache(model, policy, **options)`."""
    options = dict(options or {})
    n_layers = model.config.num_hidden_layers
    SparseKVCache(policy, n_layers, **options)  # validate now
    model._sparseinfer_kv_spec = (policy, options)
    _install_hook(model)


def detach(model) -> None:
    """Undo `attach` / `kv_cache`: remove the hook, the spec and the caches on the modules."""
    from .. import integration

    hook = getattr(model, "_sparseinfer_kv_hook", None)
    if hook is not None:
        hook.remove()
        del model._sparseinfer_kv_hook
    if hasattr(model, "_sparseinfer_kv_spec"):
        del model._sparseinfer_kv_spec
    for m in model.modules():
        if hasattr(m, integration.KV_ATTR):
            delattr(m, integration.KV_ATTR)
