"""Needle-in-a-haystack prompts built from the real essays, sized in model tokens."""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import haystack_text

QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."


@dataclass
class NeedlePrompt:
    input_ids: list[int]
    answer: str
    depth: float  # where the needle sits, as a share of the haystack
    length: int  # tokens in input_ids


def parse_length(text: str) -> int:
    """'4k' -> 4096, '1500' -> 1500."""
    t = text.strip().lower()
    try:
        return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"length: expected a token count like 4096 or 4k, got {text!r}") from None


def depths(count: int) -> list[float]:
    """`count` needle depths evenly spread over [0, 1] (0 = start of the haystack)."""
    if count < 1:
        raise ValueError(f"depths: expected at least 1, got {count}")
    return [0.5] if count == 1 else [round(i / (count - 1), 3) for i in range(count)]


class NeedleBuilder:
    """Tokenises the haystack once; builds chat prompts of an exact-ish token length."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tok = tokenizer
        self.hay = tokenizer(haystack_text(), add_special_tokens=False).input_ids
        self.rng = random.Random(seed)

    def _wrap(self, context: str) -> list[int]:
        msgs = [{"role": "user", "content": f"{context}\n\n{QUESTION}"}]
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self.tok(f"{context}\n\n{QUESTION}\nAnswer:").input_ids

    def build(self, length: int, depth: float) -> NeedlePrompt:
        answer = str(self.rng.randint(10000, 99999))
        needle = f" The special magic number is {answer}. "
        overhead = len(self._wrap(needle))
        ctx = length - overhead
        if ctx <= 0 or ctx > len(self.hay):
            raise ValueError(f"length: expected {overhead + 1}..{len(self.hay) + overhead} tokens, got {length}")
        hay = self.hay[:ctx]
        cut = int(depth * ctx)
        before = self.tok.decode(hay[:cut])
        after = self.tok.decode(hay[cut:])
        if depth < 1.0:  # move the needle back to a sentence end
            dot = before.rfind(". ")
            if dot > 0:
                before, after = before[: dot + 1], before[dot + 1 :] + after
        ids = self._wrap(before + needle + after)
        return NeedlePrompt(ids, answer, depth, len(ids))
