"""A scored long-decoding task: list recall (`sparseinfer eval decode`, part b).

The prompt gives a list of people and their two-digit numbers, then unrelated essay text
(`filler` tokens), then asks to repeat the list in order and shows its first two lines. The
model must generate the rest: each line needs a fact far back in the prompt (beyond a small
KV budget) and the model's own previous line (which name comes next). Scored automatically:

- accuracy: the fraction of the remaining facts (lines 3..n) listed with the right number;
- length: generated tokens before EOS (capped at `max_new`);
- repetition: the fraction of generated "Name: number" lines that repeat an earlier one
  (looping, the failure mode of evicting policies).

All cases of a run share one token length (the filler is cut per case), so they decode as one
batch without padding.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from ..kv import cache_kwargs

NAMES = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fiona", "Greg", "Hanna", "Ivan", "Julia", "Karl", "Lena", "Mario",
         "Nora", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tina", "Umar", "Vera", "Walt", "Xena", "Yuri", "Zoe",
         "Adam", "Bella", "Chris", "Diana"]
_LINE = re.compile(r"^([A-Z][a-z]+): (\d+)\s*$", re.M)


@dataclass
class RecallCases:
    ids: torch.Tensor  # [C, L] prompts of equal length
    facts: list[list[tuple[str, int]]]  # per case, in order
    max_new: int


def recall_cases(tokenizer, n_cases: int = 4, n_facts: int = 12, filler: int = 400, seed: int = 0) -> RecallCases:
    """n_cases prompts of n_facts facts each and ~`filler` tokens of essay text between the
    list and the question (all prompts cut to one length)."""
    from .. import data

    if not 3 <= n_facts <= len(NAMES):
        raise ValueError(f"recall_cases: n_facts expected in [3, {len(NAMES)}], got {n_facts}")
    if n_cases < 1 or filler < 0:
        raise ValueError(f"recall_cases: expected n_cases >= 1 and filler >= 0, got {n_cases}, {filler}")
    text = tokenizer(data.heldout_text()).input_ids
    rows, facts = [], []
    for c in range(n_cases):
        r = random.Random(seed * 1000 + c)
        f = list(zip(r.sample(NAMES, n_facts), (r.randint(10, 99) for _ in range(n_facts))))
        head = tokenizer("Remember this list of people and their numbers.\n" + "".join(f"{a}: {b}\n" for a, b in f)
                         + "\nNow some unrelated text.\n").input_ids
        tail = tokenizer("\n\nNow repeat the list of people and their numbers exactly, in the same order.\n"
                         + "".join(f"{a}: {b}\n" for a, b in f[:2])).input_ids
        start = r.randrange(0, max(1, len(text) - 2 * filler - 600))
        rows.append((head, text[start:start + filler + 600], tail))
        facts.append(f)
    length = max(len(h) + len(t) for h, _, t in rows) + filler
    ids = torch.tensor([h + m[:length - len(h) - len(t)] + t for h, m, t in rows])
    return RecallCases(ids, facts, max_new=6 * (n_facts - 2) + 8)


def score(text: str, facts: list[tuple[str, int]]) -> tuple[float, float]:
    """(accuracy on facts 3.., repetition rate) of one generated answer."""
    lines = _LINE.findall(text)
    got = {}
    for name, num in lines:
        got.setdefault(name, num)  # the first answer for a name counts
    acc = sum(got.get(a) == str(b) for a, b in facts[2:]) / (len(facts) - 2)
    seen, rep = set(), 0
    for ln in lines:
        rep += ln in seen
        seen.add(ln)
    return acc, (rep / len(lines) if lines else 0.0)


@torch.inference_mode()
def run_recall(model, tokenizer, cases: RecallCases, cache) -> dict:
    """Greedy generation under `cache` (a fresh cache, or None for transformers' DynamicCache):
    mean accuracy, length, repetition and the per-case values."""
    ids = cases.ids.to(model.device)
    eos = model.config.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                         max_new_tokens=cases.max_new, do_sample=False, pad_token_id=eos if isinstance(eos, int) else 0)
    gen = out[:, ids.shape[1]:]
    accs, lens, reps, texts = [], [], [], []
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for i, f in enumerate(cases.facts):
        toks = gen[i].tolist()
        n = next((j for j, t in enumerate(toks) if t in eos_ids), len(toks))
        text = tokenizer.decode(toks[:n])
        a, r = score(text, f)
        accs.append(a)
        lens.append(n)
        reps.append(r)
        texts.append(text)
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    return {"accuracy": mean(accs), "length": mean(lens), "repetition": mean(reps),
            "per_case": [round(a, 3) for a in accs], "sample": texts[0][:200]}
