"""Per-layer KV-cache policies (transformers `CacheLayerMixin` subclasses).

Every layer reports the logical number of tokens seen (`get_seq_length`, so generate's
positions are right) and the logical mask size (seen + q: the dense layers hold every token;
policy layers never use the mask in decode because they compute their own decode attention).

Pre-fill: `update` stores the whole prompt and returns it (pre-fill attention is whatever the
patched model computes over the full prompt); `observe_prefill` may score it (H2O, SnapKV);
the first decode step compresses it into the policy's fixed-capacity buffers.
Decode: `update` writes the new token (evicting on the device: argmin of a priority tensor,
no host sync), then `decode_attention` selects pages/slots and calls
`sparseinfer.ops.decode.sparse_decode_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from ..ops import decode as _opd
from ..ops.decode import _decode, _decode_multi, page_bounds, quest_scores

_INF = float("inf")
_PAGE = 16  # slot buffers are read in pages of this many slots


def _group_sum(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...] summing each KV group's query heads."""
    b, hq = x.shape[:2]
    return x.reshape(b, hkv, hq // hkv, *x.shape[2:]).sum(2)


class _Base(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    is_croppable = False
    _batch_state: tuple[str, ...] = ()  # tensor attributes with a leading batch dim

    def __init__(self, cache):
        super().__init__()
        self.cache = cache
        self.seen = 0
        self.fresh = False  # set by a decode update, consumed by decode_attention

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers passes the query length (5.2x) or the cache_position tensor (earlier 5.x): its shape only
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.seen + q, 0

    def get_max_length(self) -> int:
        return -1

    def kv_tokens(self) -> int:
        """KV slots held (allocated) per (batch, KV head)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(f"{type(self).__name__}: crop is not supported by sparseinfer KV policies")

    def reset(self) -> None:
        for name in ("step", "now"):
            if hasattr(self, name):
                setattr(self, name, None)
        for name in ("keys", "values") + self._batch_state:
            setattr(self, name, None)
        self.seen, self.fresh, self.is_initialized = 0, False, False

    def _apply_batch(self, fn) -> None:
        for name in ("keys", "values") + self._batch_state:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._apply_batch(lambda t: t[indices, ...])

    def _prompt_valid(self, n: int, b: int, h: int) -> torch.Tensor:
        """[B, H, n] validity of the incoming prompt tokens from the captured 2-D padding mask."""
        m = getattr(self.cache, "attention_mask2d", None)
        if m is None or m.shape[0] != b or m.shape[-1] < n:
            return torch.ones(b, h, n, dtype=torch.bool, device=self.device)
        return m[:, -n:].to(device=self.device, dtype=torch.bool)[:, None, :].expand(b, h, n).contiguous()

    def observe_prefill(self, query, key, scale) -> None:
        return None

    def decode_attention(self, query, scale):
        return None


class DenseLayer(_Base):
    """All tokens kept (a DynamicLayer that knows its cache); decode runs the model's dense SDPA."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values


class _PolicyBase(_Base):
    """Shared pre-fill handling: the first multi-token update stores the whole prompt."""

    name = "policy"

    def _check_step(self, key_states):
        n = key_states.shape[-2]
        if self.seen > 0 and n != 1:
            raise ValueError(f"kv policy {self.name!r}: expected one token per step after the prompt "
                             f"(q_len 1), got a {n}-token chunk after {self.seen} cached tokens")


class SlotLayer(_PolicyBase):
    """Eviction policies on fixed-capacity slots: streaming, h2o (and snapkv, which appends).

    keys/values [B, H, C, D]; valid [B, H, C]; pos [B, H, C] (original positions, -1 free);
    score [B, H, C] (accumulated attention for h2o). Victim = argmin of `_priority()`.
    """

    _batch_state = ("valid", "pos", "score", "prefill_score")

    def __init__(self, cache, name: str, capacity: int, opts: dict):
        super().__init__(cache)
        self.name, self.capacity, self.opts = name, capacity, opts
        self.valid = self.pos = self.score = self.prefill_score = None
        self.now = None  # position of the next token: a 0-d device tensor (a graph replay advances it)
        self.compressed = False

    # ---- pre-fill
    def update(self, key_states, value_states, *args, **kwargs):
        self._check_step(key_states)
        b, h, n, d = key_states.shape
        if self.seen == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self.valid = self._prompt_valid(n, b, h)
            self.pos = torch.arange(n, device=self.device).expand(b, h, n).contiguous()
            self.score = torch.zeros(b, h, n, dtype=torch.float32, device=self.device)
            self.compressed = False
            self.now = torch.full((), n, dtype=torch.long, device=self.device)
            self.seen = n
            return key_states, value_states
        if not self.compressed:
            self._compress()
        self._write(key_states, value_states)
        self.now.add_(1)
        self.seen += 1
        self.fresh = True
        return self.keys, self.values

    def observe_prefill(self, query, key, scale) -> None:
        if self.seen != key.shape[-2] or self.compressed or self.name not in ("h2o", "snapkv"):
            return
        b, hq, n, d = query.shape
        hkv = key.shape[1]
        g = hq // hkv
        valid = self.valid  # [B, Hkv, N]
        w = n if self.name == "h2o" else min(self.opts["window"], n)
        votes = torch.zeros(b, hkv, n, dtype=torch.float32, device=key.device)
        chunk = max(1, (1 << 22) // max(1, b * hq * n))
        kf = key.float()
        for i0 in range(n - w, n, chunk):
            i1 = min(n, i0 + chunk)
            qc = query[:, :, i0:i1].float().reshape(b, hkv, g * (i1 - i0), d)
            sc = torch.einsum("bhqd,bhkd->bhqk", qc, kf).reshape(b, hkv, g, i1 - i0, n) * scale
            causal = torch.arange(i0, i1, device=key.device)[:, None] >= torch.arange(n, device=key.device)
            mask = causal[None, None, None] & valid[:, :, None, None, :]
            p = torch.softmax(sc.masked_fill(~mask, -_INF), -1).nan_to_num(0.0)
            votes += p.sum((2, 3))
        if self.name == "snapkv":
            k_ = self.opts["kernel"]
            pool = F.avg_pool1d if self.opts["pooling"] == "avg" else F.max_pool1d
            votes = pool(votes.reshape(b * hkv, 1, n), k_, stride=1, padding=k_ // 2).reshape(b, hkv, -1)[..., :n]
        self.prefill_score = votes

    def _keep_priority(self) -> torch.Tensor:
        """Priority of each prompt token to survive compression (higher = kept)."""
        n = self.keys.shape[-2]
        pos = self.pos.float()
        o = self.opts
        if self.name == "streaming":
            pri = torch.where(self.pos < o["sink"], _INF, pos)
        else:
            votes = self.prefill_score if self.prefill_score is not None else torch.zeros_like(pos)
            recent = o["recent"] if self.name == "h2o" else o["window"]
            pri = torch.where(self.pos >= n - recent, _INF, votes)
        return pri.masked_fill(~self.valid, -_INF)

    def _compress(self) -> None:
        b, h, n, d = self.keys.shape
        cap = self.capacity
        if self.name == "h2o" and self.prefill_score is not None:
            self.score = self.prefill_score.clone()
        m = min(n, cap)
        keep = self._keep_priority().topk(m, -1).indices.sort(-1).values  # [B, H, m]
        take = lambda t: t.gather(2, keep if t.dim() == 3 else keep[..., None].expand(-1, -1, -1, d))
        keys, values, valid, pos, score = (take(t) for t in (self.keys, self.values, self.valid, self.pos, self.score))
        if self.name == "snapkv":  # appends after the prompt: no free slots
            self.keys, self.values, self.valid, self.pos, self.score = keys, values, valid, pos, score
        else:
            pad = cap - m
            self.keys = F.pad(keys, (0, 0, 0, pad))
            self.values = F.pad(values, (0, 0, 0, pad))
            self.valid = F.pad(valid, (0, pad), value=False)
            self.pos = F.pad(pos, (0, pad), value=-1)
            self.score = F.pad(score, (0, pad))
        self.prefill_score = None
        self.compressed = True

    # ---- decode
    def _priority(self) -> torch.Tensor:
        pos = self.pos
        if self.name == "streaming":
            pri = torch.where(pos < self.opts["sink"], _INF, pos.float())
        else:  # h2o
            pri = torch.where(pos > self.now - self.opts["recent"], _INF, self.score)
        return pri.masked_fill(~self.valid, -_INF)

    def _write(self, k, v) -> None:
        b, h, _, d = k.shape
        ones = torch.ones(b, h, 1, dtype=torch.bool, device=self.device)
        if self.name == "snapkv":
            self.keys = torch.cat([self.keys, k], -2)
            self.values = torch.cat([self.values, v], -2)
            self.valid = torch.cat([self.valid, ones], -1)
            self.pos = torch.cat([self.pos, self.now.expand_as(self.pos[..., :1])], -1)
            self.score = torch.cat([self.score, torch.zeros_like(self.score[..., :1])], -1)
            return
        slot = self._priority().argmin(-1, keepdim=True)  # [B, H, 1] on the device
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, d), k)
        self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, d), v)
        self.valid.scatter_(2, slot, ones)
        self.pos.scatter_(2, slot, self.now.expand_as(slot))
        self.score.scatter_(2, slot, torch.zeros_like(slot, dtype=self.score.dtype))

    def decode_attention(self, query, scale):
        c = self.keys.shape[-2]
        b, h = self.keys.shape[:2]
        npg = -(-c // _PAGE)  # every slot, read as pages (contiguous loads); `valid` masks free slots
        idx = torch.arange(npg, device=self.device).expand(b, h, npg)
        if self.name != "h2o":
            return _decode(query, self.keys, self.values, idx, _PAGE, self.valid, scale, unique=True)
        # h2o: the attention probabilities accumulate into each slot's score
        out, lse = _decode(query, self.keys, self.values, idx, _PAGE, self.valid, scale, return_lse=True, unique=True)
        hq = query.shape[1]
        kf = self.keys.float()
        qg = query.float().reshape(b, h, hq // h, -1)
        sc = torch.einsum("bhgd,bhtd->bhgt", qg, kf) * scale
        p = torch.exp(sc - lse.reshape(b, h, hq // h, 1)).masked_fill(~self.valid[:, :, None], 0.0)
        self.score += p.sum(2)
        return out


class QuestLayer(_PolicyBase):
    """Quest: every token kept (growing buffers); each decode step attends the top
    budget // page_size pages by the upper bound (the last page always)."""

    name = "quest"
    _batch_state = ("valid", "kmin", "kmax")

    def __init__(self, cache, budget: int, page_size: int):
        super().__init__(cache)
        self.budget, self.ps = budget, page_size
        self.valid = self.kmin = self.kmax = None

    def update(self, key_states, value_states, *args, **kwargs):
        self._check_step(key_states)
        b, h, n, d = key_states.shape
        ps = self.ps
        if self.seen == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self.valid = self._prompt_valid(n, b, h)
            self.kmin, self.kmax = page_bounds(key_states, ps, self.valid)
            self.seen = n
            return key_states, value_states
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        self.valid = torch.cat([self.valid, torch.ones(b, h, 1, dtype=torch.bool, device=self.device)], -1)
        kf = key_states.float()
        if self.seen % ps == 0:  # a new page (python ints: no device sync)
            self.kmin = torch.cat([self.kmin, kf], 2)
            self.kmax = torch.cat([self.kmax, kf], 2)
        else:
            self.kmin[:, :, -1:] = torch.minimum(self.kmin[:, :, -1:], kf)
            self.kmax[:, :, -1:] = torch.maximum(self.kmax[:, :, -1:], kf)
        self.seen += 1
        self.fresh = True
        return self.keys, self.values

    def select(self, query) -> torch.Tensor:
        """Top pages [B, Hkv, K] for this step (the last page always), K = budget // page_size
        at every step (static shape): -1 pads the rows while fewer pages exist."""
        bound = quest_scores(query, self.kmin, self.kmax)
        k = max(1, self.budget // self.ps)
        p = bound.shape[-1]
        bound = torch.cat([bound[..., :-1], torch.full_like(bound[..., -1:], _INF)], -1)
        if p < k:
            bound = F.pad(bound, (0, k - p), value=-_INF)
        top = bound.topk(k, -1)
        return torch.where(top.values > -_INF, top.indices, -1)

    def decode_attention(self, query, scale):
        return _decode(query, self.keys, self.values, self.select(query), self.ps, self.valid, scale, unique=True)


class RaaSLayer(_PolicyBase):
    """RaaS: the prompt kept whole (attended whole, or Quest-selected with prompt="quest");
    generated tokens in S = budget // page_size + 1 page slots with timestamps.

    Per decode step (all on the device, static shapes): the token goes into the current page;
    a new page takes a free slot or evicts the slot with the oldest timestamp (argmin); page
    scores are Quest bounds; the top `select` pages are attended (the current page always);
    the top half of the budget's pages get their timestamp set to the current step.
    Memory: prompt + budget + one page per (batch, KV head). The decode step updates its state
    in place (fixed buffers, no host sync), as a CUDA-graph capture needs.
    Where the decode kernels run (CUDA), the bookkeeping runs as two Triton kernels
    (`sparseinfer.kernels.raas`: the token write + eviction; the refresh + selection from the
    page scores, no top-k) instead of ~25 small torch ops; `kernels=False/True` forces either.
    """

    name = "raas"
    _batch_state = ("pvalid", "pmin", "pmax", "gk", "gv", "fill", "ts", "gmin", "gmax", "cur", "pidx", "gvalid")
    kernels: bool | None = None  # None: the kernels where the decode kernel runs the call

    def __init__(self, cache, budget: int, page_size: int, prompt: str, prompt_budget: int, select: int):
        super().__init__(cache)
        self.budget, self.ps, self.prompt, self.prompt_budget = budget, page_size, prompt, prompt_budget
        self.slots = budget // page_size + 1
        self.n_select = min(self.slots, -(-select // page_size))
        self.n_refresh = max(1, (budget // page_size) // 2)
        for name in self._batch_state:
            setattr(self, name, None)
        self.step = None  # generated tokens so far: a 0-d device tensor (shared by the batch)

    def kv_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2] + (0 if self.gk is None else self.gk.shape[-2])

    def update(self, key_states, value_states, *args, **kwargs):
        self._check_step(key_states)
        b, h, n, d = key_states.shape
        ps, s = self.ps, self.slots
        if self.seen == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states  # the prompt, kept whole
            self.pvalid = self._prompt_valid(n, b, h)
            if self.prompt == "quest":
                self.pmin, self.pmax = page_bounds(key_states, ps, self.pvalid)
            dev = self.device
            self.gk = torch.zeros(b, h, s * ps, d, dtype=key_states.dtype, device=dev)
            self.gv = torch.zeros_like(self.gk)
            self.fill = torch.zeros(b, h, s, dtype=torch.long, device=dev)
            self.ts = torch.full((b, h, s), -_INF, device=dev)
            # page key bounds in the keys' dtype: a min / max of keys is one of them (exact), and
            # the Quest scores read half the bytes of fp32 bounds for bf16 keys
            self.gmin = torch.full((b, h, s, d), _INF, dtype=key_states.dtype, device=dev)
            self.gmax = torch.full((b, h, s, d), -_INF, dtype=key_states.dtype, device=dev)
            self.cur = torch.zeros(b, h, dtype=torch.long, device=dev)
            self.gvalid = torch.zeros(b, h, s * ps, dtype=torch.bool, device=dev)  # [B, H, S * PS] held tokens
            npg = -(-n // ps)
            self.pidx = torch.arange(npg, dtype=torch.int32, device=dev).expand(b, h, npg)
            self.step = torch.zeros((), dtype=torch.long, device=dev)  # generated tokens so far
            self.seen = n
            return key_states, value_states
        if self._use_kernels(key_states):
            from ..kernels.raas import raas_update

            raas_update(key_states, value_states, self.gk, self.gv, self.ts, self.fill, self.cur, self.gmin,
                        self.gmax, self.gvalid, self.step)
            self.step.add_(1)
            self.seen += 1
            self.fresh = True
            return self.gk, self.gv
        in_page = self.step % ps
        new_page = in_page == 0
        victim = self.ts.argmin(-1)  # a free slot (-inf) first, else the stalest page
        self.cur.copy_(torch.where(new_page, victim, self.cur))
        onehot = torch.arange(s, device=self.device) == self.cur[..., None]  # [B, H, S] (no one_hot: it syncs)
        reset = onehot & new_page
        now = self.step.float()
        self.fill.masked_fill_(reset, 0)
        self.ts.copy_(torch.where(reset, now, self.ts))
        self.gmin.masked_fill_(reset[..., None], _INF)
        self.gmax.masked_fill_(reset[..., None], -_INF)
        at = (self.cur * ps + in_page)[..., None, None].expand(b, h, 1, d)
        self.gk.scatter_(2, at, key_states)
        self.gv.scatter_(2, at, value_states)
        self.fill.add_(onehot.long())
        kf = key_states.float()  # [B, H, 1, D]
        self.gmin.copy_(torch.where(onehot[..., None], torch.minimum(self.gmin, kf), self.gmin))
        self.gmax.copy_(torch.where(onehot[..., None], torch.maximum(self.gmax, kf), self.gmax))
        self.gvalid.copy_((torch.arange(ps, device=self.device) < self.fill[..., None]).reshape(b, h, s * ps))
        self.step.add_(1)
        self.seen += 1
        self.fresh = True
        return self.gk, self.gv

    def _use_kernels(self, x: torch.Tensor) -> bool:
        if self.kernels is not None:
            return self.kernels
        d = x.shape[-1]
        return _opd._triton_reason(x, "auto") is None and d & (d - 1) == 0

    def _prompt_part(self, query):
        """(keys, values, page ids, page size, valid) of the kept prompt for _decode_multi."""
        if self.prompt == "quest":
            npg = self.pmin.shape[2]
            pb = quest_scores(query, self.pmin, self.pmax)
            pidx = pb.topk(min(npg, max(1, self.prompt_budget // self.ps)), -1).indices
        else:
            pidx = self.pidx
        return self.keys, self.values, pidx, self.ps, self.pvalid

    def decode_attention(self, query, scale):
        b, h, s = self.fill.shape
        ps = self.ps
        if self._use_kernels(query):
            from ..kernels import decode as kd
            from ..kernels.raas import raas_select

            bound = kd.quest_scores(query, self.gmin, self.gmax, cur=self.cur)  # current page +inf
            sel_idx = raas_select(bound, self.ts, self.step, self.n_refresh, self.n_select)
            return _decode_multi(query, [self._prompt_part(query), (self.gk, self.gv, sel_idx, ps, self.gvalid)],
                                 scale)
        # generated pages: score, refresh timestamps of the top half of the budget, attend the top `select`
        bound = quest_scores(query, self.gmin, self.gmax)  # -inf for free slots
        onehot = torch.arange(s, device=self.device) == self.cur[..., None]
        ranked = bound.masked_fill(onehot, _INF)  # the current page always ranks first
        sel = ranked.topk(max(self.n_select, self.n_refresh), -1)  # sorted: its head is the refresh set
        top_v, top_i = sel.values[..., :self.n_refresh], sel.indices[..., :self.n_refresh]
        now = (self.step - 1).float()
        self.ts.scatter_(-1, top_i, torch.where(top_v > -_INF, now, self.ts.gather(-1, top_i)))
        sel = ranked.topk(self.n_select, -1) if self.n_select < self.n_refresh else sel
        sel_idx = torch.where(sel.values > -_INF, sel.indices, -1)
        # the prompt: all of it (a fixed index row built at pre-fill), or its top pages by the Quest bound
        return _decode_multi(query, [self._prompt_part(query), (self.gk, self.gv, sel_idx, ps, self.gvalid)], scale)
