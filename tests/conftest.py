import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import sparseinfer.models  # noqa: E402

# every load of the real model after the first is a deep copy of it (the CLI tests load it ~10 times)
sparseinfer.models.KEEP_LOADED = True


@pytest.fixture(scope="session")
def smol():
    """The real embedded model (SmolLM2-135M-Instruct, GGUF, float32) and its tokenizer."""
    from sparseinfer import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def essay_ids(smol):
    """Real essay text as token ids (first 4K tokens)."""
    from sparseinfer.data import haystack_text

    _, tok = smol
    return tok(haystack_text(), add_special_tokens=False).input_ids[:4096]
