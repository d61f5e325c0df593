"""MMInference patterns for mixed-modality inputs: per-head boundary types with per-modality
intra patterns (A-shape, vertical-slash, grid), lowered onto `ops.mm_attention`.

Per head (an entry of an MMInference config, see `sparseinfer.config`):

    {"boundary": "none" | "k" | "q" | "2d",
     "intra": {"all" | "text" | "image" | "video": <intra entry>, ...}}

intra entries: {"pattern": "ashape", "sink", "window"}, {"pattern": "vertical_slash", "vertical",
"slash"} and {"pattern": "grid", "sink", "window", "vertical_lines": true, "horizontal_lines": true};
budgets as everywhere (int tokens, float fraction of N). With "k" / "2d", "vertical" may be a
dict {key modality: budget}.

Boundary types, as lowered here (queries keep their original order; see ops/mm.py):
  none  one intra pattern ("all") for every query, estimated from the last queries, all keys.
  k     K-boundary: one intra pattern for every query, but verticals are chosen per *key*
        modality (top-k inside each modality's keys, so text sinks cannot crowd out vision
        keys), and grid lines are confined to vision keys.
  q     Q-boundary: each query modality a has its own intra pattern, estimated from the last
        ``last_q`` queries *of modality a* against all keys.
  2d    2D-boundary: Q-boundary + K-boundary: per (query modality, key modality) pair its own
        verticals / grid lines; slashes (local band, diagonals) are per query modality and apply
        to keys of any modality: the kernel's slash map is one per head, so a pair's slashes
        cannot be confined to one key modality without query-side indirection in the kernel.

Modality ids (0 text, 1 image, 2 video, as transformers' `mm_token_type_ids`) and the video
frame stride come from a `ModalityContext` that the integration fills before each forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..index import device_tensor
from ..ops.mm import mm_density
from . import grid as grid_mod
from . import vertical_slash as vs
from .base import Pattern, Selection, resolve_budget

MODALITIES = {"text": 0, "image": 1, "video": 2}
SLOTS = 3
BOUNDARIES = ("none", "k", "q", "2d")
INTRA_KEYS = {"ashape": ("sink", "window"), "vertical_slash": ("vertical", "slash"), "grid": ("sink", "window")}
GRID_LOCAL = 256  # keys this close before the estimating queries are left out of the grid fold
GRID_WINDOW = 1 << 16  # keys folded by the grid estimation (the last ones before the estimating queries)


@dataclass
class ModalityContext:
    """What the attention calls of one forward need to know about the input.

    modality: [B, N] int (0 text, 1 image, 2 video) or None; frame: tokens per video frame
    (the grid's expected stride) or None."""

    modality: torch.Tensor | None = None
    frame: int | None = None

    def set(self, modality: torch.Tensor | None, frame: int | None = None) -> None:
        self.modality, self.frame = modality, frame


def check_head(head: dict, where: str = "head") -> dict:
    """Validate one MMInference head entry -> the same dict (ValueError naming the problem)."""
    if not isinstance(head, dict):
        raise ValueError(f"{where}: expected a dict with 'boundary' and 'intra', got {type(head).__name__}")
    b = head.get("boundary")
    if b not in BOUNDARIES:
        raise ValueError(f"{where}: expected boundary in {list(BOUNDARIES)}, got {b!r}")
    intra = head.get("intra")
    if not isinstance(intra, dict) or not intra:
        raise ValueError(f"{where}: expected 'intra', a dict of modality -> intra pattern, got {intra!r}")
    for name, e in intra.items():
        if name != "all" and name not in MODALITIES:
            raise ValueError(f"{where}: intra key {name!r}: expected 'all' or one of {list(MODALITIES)}")
        pat = e.get("pattern") if isinstance(e, dict) else None
        if pat not in INTRA_KEYS:
            raise ValueError(f"{where}: intra {name!r}: expected pattern in {list(INTRA_KEYS)}, got {pat!r}")
        missing = [k for k in INTRA_KEYS[pat] if k not in e]
        if missing:
            raise ValueError(f"{where}: intra {name!r}: pattern {pat!r} needs {missing}")
        for k in INTRA_KEYS[pat]:
            vals = e[k].values() if (k == "vertical" and isinstance(e[k], dict)) else [e[k]]
            if k == "vertical" and isinstance(e[k], dict):
                if b not in ("k", "2d"):
                    raise ValueError(f"{where}: intra {name!r}: a per-key-modality 'vertical' dict needs boundary "
                                     f"'k' or '2d', got {b!r}")
                bad = [m for m in e[k] if m not in MODALITIES]
                if bad:
                    raise ValueError(f"{where}: intra {name!r}: vertical keys {bad} are not modalities {list(MODALITIES)}")
            for val in vals:
                resolve_budget(f"{where}: intra {name!r}: {k}", val, 1 << 30)
    if b in ("none", "k") and "all" not in intra:
        raise ValueError(f"{where}: boundary {b!r} uses one intra pattern: expected key 'all', got {sorted(intra)}")
    if b in ("q", "2d") and "all" not in intra and set(intra) != set(MODALITIES):
        raise ValueError(f"{where}: boundary {b!r}: expected an intra entry per modality {list(MODALITIES)} "
                         f"or an 'all' fallback, got {sorted(intra)}")
    return head


def _entry(head: dict, slot: int) -> dict:
    """The intra entry a head uses for query-modality slot `slot`."""
    if head["boundary"] in ("none", "k"):
        return head["intra"]["all"]
    name = [m for m, i in MODALITIES.items() if i == slot][0]
    return head["intra"].get(name, head["intra"].get("all"))


def _group(head: dict, slot: int) -> str:
    """Which queries estimate this head's slot: the last queries overall or of modality `slot`."""
    return "all" if head["boundary"] in ("none", "k") else str(slot)


def last_positions(modality: torch.Tensor | None, group: str, n: int, last_q: int, device):
    """-> (positions [B|1, L] int64 of the last `last_q` queries of the group, valid [B|1, L])."""
    L = min(last_q, n)
    if group == "all":
        pos = torch.arange(n - L, n, device=device)[None]
        return pos, torch.ones_like(pos, dtype=torch.bool)
    a = int(group)
    score = torch.where(modality == a, torch.arange(n, device=device)[None], -1)
    val = torch.topk(score, L, dim=-1).values.flip(-1)  # ascending; -1 where fewer than L
    return val.clamp(min=0), val >= 0


def query_scores(q, k, pos, valid, scale):
    """Softmax of the queries at `pos` [B|1, G, L] (G groups of L) over all causal keys ->
    (column sums [B, G, Hq, N], diagonal sums by offset i - j [B, G, Hq, N]) in float32;
    invalid queries count 0. One matmul for all groups; on CUDA softmax and sums are fused
    (`sparseinfer.kernels.lastq`), on the CPU torch ops (softmax, weighted sums, one gather for
    the diagonals: the reference the kernel is tested against)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    gs, L = pos.shape[-2:]
    pos = pos.expand(b, gs, L).reshape(b, gs * L)
    valid = valid.expand(b, gs, L).reshape(b, gs * L)
    gl = gs * L
    query_sums = vs.fused_sums(q)
    if query_sums is not None:
        return query_sums(q, k, pos, valid.float(), gs, scale)
    qs = q.gather(2, pos[:, None, :, None].expand(b, hq, gl, d)) * scale
    s = torch.matmul(qs.reshape(b, hkv, hq // hkv * gl, d).float(), k.float().transpose(-1, -2)).reshape(b, hq, gl, n)
    keys = torch.arange(n, device=q.device)
    s.masked_fill_(keys[None, None, None, :] > pos[:, None, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    del s
    p.mul_(valid[:, None, :, None])
    col = p.view(b, hq, gs, L, n).sum(-2).transpose(1, 2)
    # diag[o] = sum_t p[t, pos_t - o]; for o > pos_t the index wraps to a key > pos_t (p = 0)
    j = (pos[:, None, :, None] - keys) % n  # [B, 1, GL, N]
    diag = p.gather(-1, j.expand(b, hq, gl, n)).view(b, hq, gs, L, n).sum(-2).transpose(1, 2)
    return col, diag


def _topk_masked(score, count, key_ok):
    """Top `count` of score [B, H, N] among keys where key_ok -> [B, H, count], -1 where no key."""
    s = torch.where(key_ok, score, float("-inf"))
    val, idx = torch.topk(s, min(count, score.shape[-1]), dim=-1)
    return torch.where(val == float("-inf"), -1, idx)


def _prefix(idx, counts, dev):
    """Keep the first counts[h] entries of idx [B, H, K] per head (the rest -1)."""
    keep = torch.arange(idx.shape[-1], device=dev)[None, None, :] < device_tensor(counts, dev)[None, :, None]
    return torch.where(keep, idx, -1)


def _pad_cat(parts, dev, b, h):
    parts = [p for p in parts if p.shape[-1]]
    if not parts:
        return torch.full((b, h, 1), -1, dtype=torch.int64, device=dev)
    return torch.cat(parts, -1)


@dataclass
class MMInferenceLayer(Pattern):
    """One layer: heads = one MMInference head entry per query head (see the module docstring).
    context: the ModalityContext filled by the integration; strides: grid candidates (None =
    multiples of 16 up to 1024, plus the context's frame size)."""

    name = "mminference"
    per_head = True
    heads: list = None
    context: ModalityContext = field(default_factory=ModalityContext)
    last_q: int = 64
    strides: tuple | None = None

    def shard(self, shard) -> "MMInferenceLayer":
        """The head entries of a tensor-parallel rank's query heads `shard.q` (context shared)."""
        return dataclasses.replace(self, heads=self.heads[shard.q.start:shard.q.stop])

    def __post_init__(self):
        if not isinstance(self.heads, list) or not self.heads:
            raise ValueError(f"mminference: expected a non-empty list of head entries, got {self.heads!r}")
        for i, h in enumerate(self.heads):
            check_head(h, f"head {i}")

    def modality(self, b, n, device) -> torch.Tensor:
        m = self.context.modality
        if m is None:
            raise ValueError("mminference: no modality ids for this call; expected mm_token_type_ids (or input_ids with "
                             "image/video pad tokens) in the model's forward, or ModalityContext.set(modality [B, N])")
        if tuple(m.shape) != (b, n):
            raise ValueError(f"mminference: modality ids have shape {tuple(m.shape)}, the attention call has [B={b}, N={n}]")
        return m.to(device).long()

    def select(self, q, k, scale):
        b, hq, n, _ = q.shape
        if len(self.heads) != hq:
            raise ValueError(f"mminference: config has {len(self.heads)} heads for this layer, the call has {hq}")
        dev = q.device
        mod = self.modality(b, n, dev)
        heads = self.heads
        strides = grid_mod.candidate_strides(n, self.context.frame, self.strides)
        # estimation groups actually needed (static, from the config)
        needs = {(_group(h, a), _entry(h, a)["pattern"]) for h in heads for a in range(SLOTS)}
        groups = sorted({g for g, p in needs if p != "ashape"})
        scores = {}
        # estimating queries of every group; one host sync: which modalities are present (absent
        # ones are not estimated) and each group's earliest estimating query
        pv = [last_positions(mod, g, n, self.last_q, dev) for g in groups]
        firsts = [torch.where(v, p, n).min() for p, v in pv]
        counts = torch.bincount(mod.flatten(), minlength=SLOTS)[:SLOTS]
        host = torch.cat([counts, torch.stack(firsts)]).tolist() if groups else counts.tolist()
        present = {a for a in range(SLOTS) if host[a] > 0}
        live = [i for i, g in enumerate(groups) if g == "all" or int(g) in present]
        for i, g in enumerate(groups):
            if i not in live:
                z = torch.zeros(b, hq, n, device=dev)
                scores[g] = (z, z, torch.full((b,), n, device=dev))
        first_host = {g: host[SLOTS + i] for i, g in enumerate(groups)}
        if live:  # all estimating queries of all groups in one pass
            L = min(pv[i][0].shape[-1] for i in live)
            pos = torch.stack([pv[i][0].expand(b, -1)[:, -L:] for i in live], 1)  # [B, G, L]
            valid = torch.stack([pv[i][1].expand(b, -1)[:, -L:] for i in live], 1)
            col, diag = query_scores(q, k, pos, valid, scale)
            first = torch.where(valid, pos, n).min(-1).values  # [B, G]
            for j, i in enumerate(live):
                scores[groups[i]] = (col[:, j], diag[:, j], first[:, j])
        is_vision = mod != MODALITIES["text"]  # [B, N]
        keys = torch.arange(n, device=dev)
        V, S, R = [], [], []
        for a in range(SLOTS):
            ents = [_entry(h, a) for h in heads]
            kinds = [e["pattern"] for e in ents]
            bounds = [h["boundary"] for h in heads]
            grp = [_group(h, a) for h in heads]
            vparts, sparts = [], []
            # per-head score tensors for this slot
            col = diag = first = None
            if any(kd != "ashape" for kd in kinds):
                gsel = device_tensor([groups.index(g) if g in scores else 0 for g in grp], dev)
                col = torch.stack([scores[g][0] for g in groups])
                col = col.gather(0, gsel.view(1, 1, hq, 1).expand(1, b, hq, n))[0]
                diag = torch.stack([scores[g][1] for g in groups])
                diag = diag.gather(0, gsel.view(1, 1, hq, 1).expand(1, b, hq, n))[0]
                first = torch.stack([scores[g][2].expand(b) for g in groups])[gsel].T  # [B, H]
            # sinks and local windows (A-shape, grid; vertical-slash keeps the first INIT_TOKENS keys
            # and the LOCAL_OFFSETS nearest diagonals, as `vertical_slash` does)
            sink = [resolve_budget("sink", e["sink"], n) if kd in ("ashape", "grid") else
                    min(vs.INIT_TOKENS, n) for e, kd in zip(ents, kinds)]
            window = [resolve_budget("window", e["window"], n) if kd in ("ashape", "grid") else 0
                      for e, kd in zip(ents, kinds)]
            vparts.append(_prefix(torch.arange(max(sink), device=dev).expand(b, hq, -1), sink, dev))
            sparts.append(_prefix(torch.arange(max(window), device=dev).expand(b, hq, -1), window, dev))
            # vertical-slash
            vsh = [kd == "vertical_slash" for kd in kinds]
            if any(vsh):
                ns = [resolve_budget("slash", e["slash"], n, minimum=1) if v else 0 for e, v in zip(ents, vsh)]
                s_idx = vs._topk_forced(diag, max(ns), vs.LOCAL_OFFSETS)
                sparts.append(_prefix(s_idx, ns, dev))
                glob = [v and bd in ("none", "q") for v, bd in zip(vsh, bounds)]
                if any(glob):
                    nv = [resolve_budget("vertical", e["vertical"], n) if g else 0 for e, g in zip(ents, glob)]
                    vparts.append(_prefix(_topk_masked(col, max(nv), keys >= vs.INIT_TOKENS), nv, dev))
                for mname, m in MODALITIES.items():
                    per = [v and bd in ("k", "2d") for v, bd in zip(vsh, bounds)]
                    if not any(per):
                        continue
                    nv = []
                    for e, p in zip(ents, per):
                        if not p:
                            nv.append(0)
                            continue
                        bud = e["vertical"].get(mname, 0) if isinstance(e["vertical"], dict) else e["vertical"]
                        nv.append(resolve_budget("vertical", bud, n))
                    if max(nv) == 0:
                        continue
                    ok = ((mod == m)[:, None, :]) & (keys >= vs.INIT_TOKENS)
                    vparts.append(_prefix(_topk_masked(col, max(nv), ok), nv, dev))
            # grid
            gh = [kd == "grid" for kd in kinds]
            if any(gh):
                conf = device_tensor([bd in ("k", "2d") for bd in bounds], dev)[None, :, None]
                base = (keys >= vs.INIT_TOKENS)[None, None, :] & (keys[None, None, :] < first[..., None] - GRID_LOCAL)
                km = base & (~conf | is_vision[:, None, :])
                # fold only the GRID_WINDOW keys before the earliest estimating query of these
                # heads (so each head has them all; enough periods for any candidate stride; the
                # cost no longer grows with N); near the start, all keys
                hi = min(n, min(first_host[g] for g, on_ in zip(grp, gh) if on_) - GRID_LOCAL)
                lo = max(0, hi - GRID_WINDOW)
                if hi - lo < 2 * max(strides):
                    lo, hi = 0, n
                stride, phase, _ = grid_mod.estimate_grid(col[..., lo:hi], strides, km[..., lo:hi])
                phase = (phase + lo) % stride
                lines = grid_mod.grid_lines(stride, phase, n, min(strides))  # [B, H, T]
                on = device_tensor(gh, dev)[None, :, None]
                vert = device_tensor([bool(e.get("vertical_lines", True)) for e in ents], dev)[None, :, None]
                hor = device_tensor([bool(e.get("horizontal_lines", True)) for e in ents], dev)[None, :, None]
                lk = lines.clamp(min=0)
                key_vis = is_vision[:, None, :].expand(b, hq, n).gather(-1, lk)
                vparts.append(torch.where(on & vert & (lines >= 0) & (~conf | key_vis), lines, -1))
                # horizontal lines: rows of this slot's modality for q/2d heads; for none/k heads
                # the same rows in every slot, kept once (slot 0) with no modality filter
                qconf = device_tensor([bd in ("q", "2d") for bd in bounds], dev)[None, :, None]
                row_mod = mod[:, None, :].expand(b, hq, n).gather(-1, lk)
                keep_row = torch.where(qconf, row_mod == a, torch.full_like(qconf, a == 0))
                R.append(torch.where(on & hor & (lines >= 0) & keep_row, lines, -1))
            V.append(_pad_cat(vparts, dev, b, hq))
            S.append(_pad_cat(sparts, dev, b, hq))
        width_v = max(x.shape[-1] for x in V)
        width_s = max(x.shape[-1] for x in S)
        pad = torch.nn.functional.pad
        vi = torch.stack([pad(x, (0, width_v - x.shape[-1]), value=-1) for x in V], 2)
        si = torch.stack([pad(x, (0, width_s - x.shape[-1]), value=-1) for x in S], 2)
        # dense rows: fixed size (ceil(N / min stride) per slot), -1 padding; no host sync
        rows = torch.cat(R, -1) if R else None
        dens = mm_density(n, mod, vi, si, rows, slots=sorted(present))
        kw = {"modality": mod, "vertical_idx": vi, "slash_idx": si, "dense_rows": rows, "slots": sorted(present)}
        return [Selection("mm_attention", kw, dens)]
