"""Running a model under each method: NIAH retrieval and fidelity against dense."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import heldout_text
from ..integration import patch, unpatch
from .needle import NeedleBuilder, depths


def parse_method(spec: str, config: str | None = None) -> tuple[str, dict]:
    """'vertical_slash' or 'vertical_slash:vertical=0.1:slash=256' -> (name, options).
    `config` (a per-head config path) goes to "minference" methods that name none."""
    name, *parts = spec.split(":")
    opts: dict = {}
    for kv in filter(None, parts):
        key, eq, val = kv.partition("=")
        if not eq:
            raise ValueError(f"method options: expected key=value, got {kv!r} in {spec!r}")
        try:
            opts[key.strip()] = float(val) if "." in val else int(val)
        except ValueError:
            opts[key.strip()] = val
    name = name.strip()
    if name == "minference" and config and "config" not in opts:
        opts["config"] = config
    return name, opts


@dataclass
class NeedleResult:
    method: str
    length: int
    depth: float
    correct: bool
    answer: str
    output: str
    density: float
    seconds: float


def _generate(model, input_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([input_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@torch.inference_mode()
def run_niah(model, tokenizer, methods: list[str], lengths: list[int], n_depths: int,
             max_new_tokens: int = 24, min_len: int = 512, progress: bool = True,
             config: str | None = None) -> list[NeedleResult]:
    """Every method x length x depth; the same prompts for every method."""
    builder = NeedleBuilder(tokenizer)
    prompts = [builder.build(L, d) for L in lengths for d in depths(n_depths)]
    results = []
    bar = tqdm(total=len(methods) * len(prompts), desc="NIAH", disable=not progress)
    try:
        for spec in methods:
            name, opts = parse_method(spec, config)
            handle = patch(model, name, min_len=min_len, **opts)
            for p, L in zip(prompts, [L for L in lengths for _ in range(n_depths)]):
                bar.set_postfix_str(f"{spec} {L} tok, depth {p.depth:.2f}")
                handle.stats.reset()
                t = time.perf_counter()
                new = _generate(model, p.input_ids, max_new_tokens)
                dt = time.perf_counter() - t
                text = tokenizer.decode(new, skip_special_tokens=True)
                prefill = [r for r in handle.stats.records if r.q_len > 1]
                dens = _density(prefill)
                results.append(NeedleResult(spec, L, p.depth, p.answer in text, p.answer, text.strip(), dens, dt))
                bar.update()
            unpatch(model)
    finally:
        bar.close()
        if hasattr(model, "_sparseinfer_patch"):
            unpatch(model)
    return results


def _density(records) -> float:
    from ..integration import PatchStats

    return PatchStats(list(records)).density()


@dataclass
class FidelityResult:
    method: str
    length: int
    kl: float  # mean KL(dense || sparse) of next-token distributions over all positions, nats
    hidden_rel_err: float  # ||h_sparse - h_dense|| / ||h_dense||, final hidden states
    top1_agree: float  # share of positions where the argmax token agrees
    density: float
    seconds: float


@torch.inference_mode()
def run_fidelity(model, tokenizer, methods: list[str], lengths: list[int], min_len: int = 512,
                 progress: bool = True, config: str | None = None) -> list[FidelityResult]:
    """Sparse vs dense on the same long essay prompts (one prompt per length)."""
    ids_all = tokenizer(heldout_text(), add_special_tokens=False).input_ids
    results = []
    bar = tqdm(total=len(lengths) * (len(methods) + 1), desc="fidelity", disable=not progress)
    for L in lengths:
        ids = torch.tensor([ids_all[:L]], device=model.device)
        out = model(ids, output_hidden_states=True)
        ref_logp = F.log_softmax(out.logits.float(), -1)
        ref_h = out.hidden_states[-1].float()
        bar.update()
        for spec in methods:
            name, opts = parse_method(spec, config)
            handle = patch(model, name, min_len=min_len, **opts)
            t = time.perf_counter()
            o = model(ids, output_hidden_states=True)
            dt = time.perf_counter() - t
            unpatch(model)
            logp = F.log_softmax(o.logits.float(), -1)
            kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1).mean()
            h = o.hidden_states[-1].float()
            results.append(FidelityResult(
                spec, L, float(kl), float((h - ref_h).norm() / ref_h.norm()),
                float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()),
                handle.stats.density(), dt))
            bar.update()
    bar.close()
    return results


def as_dicts(results) -> list[dict]:
    return [asdict(r) for r in results]


@dataclass
class PerplexityResult:
    method: str
    length: int
    ppl: float  # exp(mean next-token NLL) over all positions of all windows
    windows: int
    density: float
    seconds: float  # per window


@torch.inference_mode()
def run_ppl(model, tokenizer, methods: list[str], lengths: list[int], windows: int = 2, min_len: int = 512,
            progress: bool = True, config: str | None = None) -> list[PerplexityResult]:
    """Perplexity on held-out essays (`sparseinfer.data.heldout_text`), `windows` disjoint
    windows of each length."""
    ids_all = tokenizer(heldout_text(), add_special_tokens=False).input_ids
    results = []
    bar = tqdm(total=len(lengths) * len(methods) * windows, desc="perplexity", disable=not progress)
    for L in lengths:
        if L * windows > len(ids_all):
            raise ValueError(f"ppl: {windows} windows of {L} tokens need {L * windows}, the held-out text has {len(ids_all)}")
        for spec in methods:
            name, opts = parse_method(spec, config)
            handle = patch(model, name, min_len=min_len, **opts)
            nll, count, secs = 0.0, 0, 0.0
            try:
                for w in range(windows):
                    ids = torch.tensor([ids_all[w * L:(w + 1) * L]], device=model.device)
                    t = time.perf_counter()
                    logits = model(ids).logits[0, :-1].float()
                    secs += time.perf_counter() - t
                    nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                    count += L - 1
                    bar.update()
            finally:
                unpatch(model)
            results.append(PerplexityResult(spec, L, float(torch.tensor(nll / count).exp()), windows,
                                            handle.stats.density(), secs / windows))
    bar.close()
    return results


@torch.inference_mode()
def run_recall(model, tokenizer, method: str, length: int, min_len: int = 512, config: str | None = None,
               progress: bool = True) -> torch.Tensor:
    """Attention recall of `method` per layer and head on one NIAH prompt -> [layers, Hq]."""
    from ..recall import RecallProbe

    name, opts = parse_method(method, config)
    prompt = NeedleBuilder(tokenizer, seed=7).build(length, 0.5)
    n_layers = model.config.num_hidden_layers
    out = torch.full((n_layers, model.config.num_attention_heads), float("nan"))
    plans = {}
    bar = tqdm(total=n_layers, desc=f"recall {method}", disable=not progress)

    def observe(layer, q, k, scale):
        pattern = plans[layer].pattern
        if pattern is None or q.shape[2] < min_len:
            out[layer] = 1.0
        else:
            out[layer] = RecallProbe(q, k, scale).recall(pattern.select(q, k, scale))[0].float().cpu()
        bar.update()

    patch(model, name, min_len=min_len, **opts)
    for m in model.modules():
        plan = getattr(m, "_sparseinfer", None)
        if plan is not None:
            plans[plan.layer] = plan
            plan.observer = observe
    try:
        model(torch.tensor([prompt.input_ids], device=model.device), logits_to_keep=1)
    finally:
        unpatch(model)
        bar.close()
    return out
