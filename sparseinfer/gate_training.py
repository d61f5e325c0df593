"""Training the learned block gates (`sparseinfer.gate`) by self-distillation, the model frozen.

1. Capture: the model runs densely on long real text (calibration essays, disjoint from the
   held-out essays that `eval ppl` / `eval fidelity` read). Through the attention-function
   registry (`patch(model, "dense")` plus a per-layer observer, no model code copied), each
   layer hands over its post-RoPE q / k; kept per layer: the gate's pooled pre-RoPE features
   and the target = dense attention probabilities max-pooled to blocks, row-normalised,
   for a strided subset of the query blocks (`row_stride`; every row of the gate is the same
   function, so sampled rows teach it as well at a fraction of the cost), computed one query
   block at a time (never an N x N of the model).
2. Train: each layer's gate alone, from the cache, full batch, Adam on
   KL(target || gate) averaged over query-block rows.
3. Held-out check: on held-out text, the dense attention mass (sum-pooled to blocks) that the
   gate's blocks cover ("block recall") at a few densities and thresholds, against the
   mean-pooled q.k block estimate that `block_sparse` uses at the same per-row budgets.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import essays, haystack_text, heldout_text
from .gate import Gates, causal_blocks
from .patterns import block_sparse as bs
from .patterns.adaptive import keep_blocks
from .patterns.base import group_scores
from .recall import dense_probs

HELDOUT_TOKENS = 16384  # eval ppl/fidelity read at most 2 windows of 8K of heldout_text
RECALL_DENSITIES = (0.1, 0.2)
RECALL_THRESHOLDS = (1e-3, 1e-2)


def calibration_split(tokenizer, heldout_tokens: int = HELDOUT_TOKENS) -> tuple[list[int], list[int]]:
    """-> (calibration ids, held-out ids). Held-out = the first essays of `heldout_text`
    covering `heldout_tokens` tokens (what the eval commands read); calibration = the other
    essays, in `haystack_text` order. No essay is in both."""
    held, count = [], 0
    for name, text in reversed(list(essays().items())):
        if count >= heldout_tokens:
            break
        held.append(name)
        count += len(tokenizer(text, add_special_tokens=False).input_ids)
    calib = tokenizer(haystack_text(exclude=tuple(held)), add_special_tokens=False).input_ids
    heldout = tokenizer(heldout_text(), add_special_tokens=False).input_ids[:count]
    return calib, heldout


def block_targets(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                  rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q [B, Hq, N, D], k [B, Hkv, N, D] pooled to blocks, for the query
    blocks `rows` (int [R], default all nb), one query block at a time.

    -> (tmax, tsum), each [B, Hq, R, nb] float32:
    tmax: the max probability in each (query block, key block) tile, rows normalised to 1
    (the gate's training target); tsum: the attention mass of each tile per query row
    (rows sum to 1: the share of each query's mass, averaged over the block's queries).
    """
    b, hq, n, _ = q.shape
    nb = math.ceil(n / block_size)
    rows = torch.arange(nb) if rows is None else rows
    tmax = torch.zeros(b, hq, len(rows), nb, device=q.device)
    tsum = torch.zeros(b, hq, len(rows), nb, device=q.device)
    for ri, r in enumerate(rows.tolist()):
        i0, i1 = r * block_size, min(n, (r + 1) * block_size)
        p = dense_probs(q, k, scale, i0, i1)  # [B, Hq, i1 - i0, i1]
        p = torch.nn.functional.pad(p, (0, (r + 1) * block_size - i1))
        p = p.reshape(b, hq, i1 - i0, r + 1, block_size)
        tmax[:, :, ri, :r + 1] = p.amax((2, 4))
        tsum[:, :, ri, :r + 1] = p.sum((2, 4)) / (i1 - i0)
    return tmax / tmax.sum(-1, keepdim=True), tsum


def meanpool_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """The block_sparse pattern's block scores (mean-pooled post-RoPE q . k) as a causal
    softmax over key blocks [B, Hq, nb, nb]: a baseline ranking for the recall check."""
    b, hq = q.shape[:2]
    s = group_scores(bs.pool_blocks(q, block_size), bs.pool_blocks(k, block_size)) * scale
    nb = s.shape[-1]
    return torch.softmax(s.masked_fill(~causal_blocks(nb, s.device), float("-inf")), -1)


@dataclass
class LayerCache:
    """Per sequence: gate features qf [B, Hq, nb, F], kf [B, Hkv, nb, F], the query blocks
    with targets rows [R] and the targets [B, Hq, R, nb] (extra, for held-out text only: tsum
    [B, Hq, R, nb] and the mean-pool baseline [B, Hq, nb, nb])."""

    qf: list = field(default_factory=list)
    kf: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    target: list = field(default_factory=list)
    tsum: list = field(default_factory=list)
    baseline: list = field(default_factory=list)


@torch.no_grad()
def capture(model, gates: Gates, sequences: list[list[int]], *, heldout: bool = False, row_stride: int = 1,
            progress: bool = True, desc: str = "capture") -> list[LayerCache]:
    """Run the model densely on each sequence; -> one LayerCache per layer (tensors on the CPU).
    Targets for query blocks phase, phase + row_stride, ... (phase = sequence index mod row_stride)."""
    from .integration import patch, unpatch

    n_layers = model.config.num_hidden_layers
    caches = [LayerCache() for _ in range(n_layers)]
    bar = tqdm(total=len(sequences) * n_layers, desc=desc, disable=not progress)

    phase = [0]

    def observe(layer, q, k, scale):
        c = caches[layer]
        qf, kf = gates.features(q, k)
        nb = qf.shape[2]
        rows = torch.arange(phase[0] % row_stride, nb, row_stride)
        tmax, tsum = block_targets(q, k, scale, gates.block_size, rows)
        c.qf.append(qf.cpu())
        c.kf.append(kf.cpu())
        c.rows.append(rows)
        c.target.append(tmax.cpu())
        if heldout:
            c.tsum.append(tsum.cpu())
            c.baseline.append(meanpool_scores(q, k, scale, gates.block_size).cpu())
        bar.update()

    patch(model, "dense", min_len=0)
    for m in model.modules():
        if hasattr(m, "_sparseinfer"):
            m._sparseinfer.observer = observe
    try:
        for si, ids in enumerate(sequences):
            phase[0] = si
            model(torch.tensor([ids], device=model.device), logits_to_keep=1)
    finally:
        unpatch(model)
        bar.close()
    return caches


def kl_loss(logq: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over query-block rows of KL(target || gate); logq [B, Hq, nb, nb], target
    [B, Hq, R, nb] for the query blocks rows [R] (default: all)."""
    causal = causal_blocks(logq.shape[-1], logq.device)
    logq = logq.masked_fill(~causal, 0.0)
    if rows is not None:
        logq = logq[:, :, rows.to(logq.device)]
    t = target.float()
    kl = torch.where(t > 0, t * (t.clamp_min(1e-30).log() - logq), torch.zeros_like(t))
    return kl.sum(-1).mean()


def train_layer(gate, cache: LayerCache, steps: int, lr: float) -> list[float]:
    """Adam on the summed KL of all cached sequences (moved to the gate's device once: the
    cache lives on the CPU); -> the loss per step."""
    dev = gate.q_proj.device
    seqs = [tuple(x.to(dev) for x in item) for item in zip(cache.qf, cache.kf, cache.target, cache.rows)]
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    losses = []
    gate.requires_grad_(True)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(kl_loss(gate(qf, kf), t, r) for qf, kf, t, r in seqs)
        loss = loss / len(cache.qf)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    gate.requires_grad_(False)
    return losses


@torch.no_grad()
def block_recall(gates: Gates, caches: list[LayerCache]) -> dict:
    """Held-out block recall (share of the dense mass the kept blocks cover, mean over rows,
    heads, layers) and kept block density, of the gate and the mean-pool baseline."""
    out: dict = {}
    dev = gates.layers[0].q_proj.device
    modes = [("density", d) for d in RECALL_DENSITIES] + [("threshold", t) for t in RECALL_THRESHOLDS]
    for mode, val in modes:
        rec, dens, brec = [], [], []
        for li, c in enumerate(caches):
            for qf, kf, tsum, base in zip(c.qf, c.kf, c.tsum, c.baseline):
                p = gates.layers[li](qf.to(dev), kf.to(dev)).exp().cpu()  # the cache is on the CPU
                keep = keep_blocks(p, **{mode: val})
                rec.append(float((tsum * keep).sum(-1).mean()))
                nb = keep.shape[-1]
                dens.append(float(keep.sum() / (keep.shape[0] * keep.shape[1] * nb * (nb + 1) / 2)))
                if mode == "density":
                    brec.append(float((tsum * keep_blocks(base, density=val)).sum(-1).mean()))
        key = f"{mode}={val:g}"
        out[key] = {"gate_recall": sum(rec) / len(rec), "block_density": sum(dens) / len(dens)}
        if brec:
            out[key]["meanpool_recall"] = sum(brec) / len(brec)
    return out


def plot_losses(losses: list[list[float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for li, ls in enumerate(losses):
        ax.plot(ls, color=plt.cm.viridis(li / max(1, len(losses) - 1)), lw=0.8, alpha=0.7)
    mean = torch.tensor(losses).mean(0)
    ax.plot(mean.numpy(), color="black", lw=2, label="mean over layers")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("KL(target || gate), nats per block row")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train_gates(model, tokenizer, *, out: str | Path | None = None, length: int | None = None, sequences: int = 1,
                row_stride: int = 4, block_size: int = 64, pooling: str = "avg,max,min", width: int = 12, steps: int = 300,
                lr: float = 1e-2, model_id: str = "", heldout_length: int | None = None,
                progress: bool = True) -> tuple[Gates, dict]:
    """Self-distil gates for `model` (frozen). -> (gates, report).

    length: tokens per calibration sequence (default: min(model maximum, 8192));
    sequences: how many (consecutive windows of the calibration essays); row_stride: targets
    for every row_stride-th query block of each sequence (phases rotate); heldout_length:
    tokens of held-out text for the recall check (default: min(length, 4096); 0 = skip).
    out: a .safetensors path: the gates are written there with a loss-curve PNG and a JSON
    report beside it (<stem>.loss.png, <stem>.json).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    length = length or min(int(getattr(model.config, "max_position_embeddings", 8192)), 8192)
    gates = Gates.new(model.config, block_size=block_size, pooling=pooling, width=width,
                      model=model_id or getattr(model.config, "_name_or_path", "")).to(model.device)
    gates.attach(model)
    calib, held = calibration_split(tokenizer)
    if len(calib) < length * sequences:
        raise ValueError(f"train_gates: {sequences} sequences of {length} tokens need {length * sequences} "
                         f"calibration tokens, the essays give {len(calib)}")
    seqs = [calib[i * length:(i + 1) * length] for i in range(sequences)]
    caches = capture(model, gates, seqs, row_stride=row_stride, progress=progress, desc="capture (dense targets)")
    t_capture = time.perf_counter() - t0
    losses = []
    for li, cache in enumerate(tqdm(caches, desc="train gates", disable=not progress)):
        losses.append(train_layer(gates.layers[li], cache, steps, lr))
    t_train = time.perf_counter() - t0 - t_capture
    del caches
    report = {"model": gates.meta["model"], "length": length, "sequences": sequences, "row_stride": row_stride, "steps": steps, "lr": lr,
              "block_size": block_size, "pooling": ",".join(gates.pooling), "width": width,
              "loss_first": sum(ls[0] for ls in losses) / len(losses),
              "loss_last": sum(ls[-1] for ls in losses) / len(losses),
              "loss_last_per_layer": [round(ls[-1], 4) for ls in losses],
              "seconds_capture": round(t_capture, 1), "seconds_train": round(t_train, 1)}
    gates.meta["training"] = {k: report[k] for k in ("length", "sequences", "steps", "lr", "loss_last")}
    if out is not None:  # written before the held-out check, so a failure there loses nothing
        out = Path(out)
        gates.save(out)
        report["loss_png"] = str(plot_losses(losses, out.with_suffix(".loss.png"),
                                             f"gate training, {report['model'] or 'model'}"))
    hl = min(length, 4096) if heldout_length is None else heldout_length
    if hl:
        hc = capture(model, gates, [held[:hl]], heldout=True, progress=progress, desc="held-out check")
        report["heldout_length"] = hl
        report["heldout"] = block_recall(gates, hc)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["cpu_seconds"] = round(time.process_time() - c0, 1)  # this process's CPU time, all threads
    report["threads"] = torch.get_num_threads()
    report["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    gates.requires_grad_(False)
    if out is not None:
        out.with_suffix(".json").write_text(json.dumps(report | {"losses_mean": torch.tensor(losses).mean(0).tolist()},
                                                       indent=1))
    report["losses"] = losses
    return gates, report
