"""XAttention-style pattern: per query-block row, the fewest KV blocks whose estimated
attention mass reaches `tau`, scored by strided antidiagonal sums (arXiv 2503.16428).

Estimation, per head and input (no training, no fixed budget):
1. Queries and keys are cut into groups of `stride` consecutive rows. A query group's rows are
   concatenated in order, a key group's in *reverse* order, so the dot product of the two
   concatenations is the sum of one antidiagonal of the stride x stride score tile:
   sum_t q[g*S + t] . k[h*S + S-1-t]. Antidiagonals cross every row and column of the tile,
   so a vertical or a slash line inside it is always seen.
2. Those sums, times scale / stride (a mean logit), go through a causal softmax over key
   groups (row per query group), and the probabilities are summed into
   block_size x block_size tiles: mass [B, Hq, nb, nb]; each row is normalised to 1.
3. Row r keeps the smallest prefix of its causal blocks sorted by mass (descending, ties by
   lower index) whose cumulative mass reaches tau, plus the sink block 0 and the diagonal
   block r (always). Never an empty row.

The result is the index of `ops.block_sparse_attention`. Batched over batch and heads; query
groups are processed in chunks so no [N/S, N/S] matrix of a long input is held at once.
One host synchronisation per call (the widest row, to size the index tensor).
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch

from ..index import _compact, device_tensor
from .base import Pattern, Selection
from .block_sparse import block_sparse_density

# the fused path: "scores" = half-precision scores (one cuBLAS matmul per query head and chunk of
# query groups), then one Triton pass to the block mass (kernels.xattn.scores_block_mass);
# "lastq" = float32 scores, then kernels.lastq's two passes (benchmarks/results/adaptive_mass.md)
MASS_KERNEL = "scores"
MIN_CHUNKS = 8
_CHUNK_ELEMS = 1 << 26  # strided scores per chunk (B * Hq * rows * key groups); 256 MB in float32


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """Matmul inputs stay in half precision (tensor cores, float32 accumulation); else the accumulator."""
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else _acc_dtype(x)


def _use_fused(q: torch.Tensor, fused) -> bool:
    """The fused path (MASS_KERNEL: half-precision scores reduced to the block mass in one
    Triton pass, `kernels.xattn`, or `kernels.lastq`'s two passes; the selection by
    `kernels.xattn.select_blocks`) instead of ~10 torch passes: CUDA half-precision inputs by
    default; fused=True forces it (CPU: Triton interpreter), False the torch path."""
    from .vertical_slash import fused_sums

    if fused is not None:
        return bool(fused)
    return q.dtype in (torch.float16, torch.bfloat16) and fused_sums(q) is not None


def _group_block_mass(qv, ks, qi, g_valid: int, gpb: int, scale: float, hq: int, fused: bool) -> torch.Tensor:
    """Block mass of query groups: qv [B, Hkv, G, R, S*D] (query head hkv * G + g's R rows; a
    view, strides free), ks [B, Hkv, K, S*D] key groups, qi [R] the rows' query-group positions
    (R a multiple of gpb) -> [B, Hq, R / gpb, K / gpb] (float32 / float64): per row the causal
    softmax over key groups <= qi (scores times scale), rows qi >= g_valid weigh 0, summed over
    gpb rows and gpb key groups."""
    b, hkv, grp, r, sd = qv.shape
    kk = ks.shape[2]
    if fused:
        from ..kernels.lastq import lastq_sums, matmul_f32

        pos = qi.view(1, r).expand(b, r)
        w = (qi < g_valid).float().view(1, r).expand(b, r)  # padded query groups carry no mass
        if qv.is_contiguous():  # the group's heads stacked along M (a view): one matmul per KV head
            s = matmul_f32(qv.reshape(b, hkv, grp * r, sd), ks.transpose(-1, -2), tf32=True).reshape(b, hq, r, kk)
            col = lastq_sums(s, pos, w, r // gpb, scale, diag=False)[0]  # [B, R/gpb, Hq, K]
        else:  # a strided slice: one matmul per query head of the group, q rows read in place (no copy)
            cols = [lastq_sums(matmul_f32(qv[:, :, g], ks.transpose(-1, -2), tf32=True), pos, w, r // gpb, scale,
                               diag=False)[0] for g in range(grp)]  # each [B, R/gpb, Hkv, K] from unscaled logits
            col = torch.stack(cols, 3).reshape(b, r // gpb, hq, kk)  # head hkv * G + g
        return col.reshape(b, r // gpb, hq, kk // gpb, gpb).sum(-1).transpose(1, 2)
    # a KV head's query heads stacked along M: one [G * R, S*D] x [S*D, K] matmul per KV head
    # (a broadcast batch dim would copy k once per query head of the group)
    qg = qv.reshape(b, hkv, grp * r, sd)
    acc = _acc_dtype(qg)
    key_g = torch.arange(kk, device=qg.device)
    s = torch.matmul(qg, ks.transpose(-1, -2)).reshape(b, hq, r, kk).to(acc) * scale
    s = s.masked_fill((key_g[None, :] > qi[:, None]) | (key_g[None, :] >= g_valid), float("-inf"))
    p = torch.softmax(s, dim=-1) * (qi[:, None] < g_valid).to(acc)  # padded query groups carry no mass
    return p.reshape(b, hq, r // gpb, gpb, kk // gpb, gpb).sum((3, 5))


def _key_groups(k: torch.Tensor, npad: int, stride: int, dtype, reverse: bool = True) -> torch.Tensor:
    """k [B, Hkv, N, D] -> [B, Hkv, npad / stride, stride * D]: each key group's rows concatenated
    in reverse order (so that a query group's rows, concatenated in order, meet them along one
    antidiagonal of the stride x stride tile). Reversing k, not q: k is the smaller (GQA).
    reverse=False: in order (a view when no padding or conversion is needed; the caller then
    reverses its query groups instead, as the probe does with its few sampled rows)."""
    b, hkv, n, d = k.shape
    kp = k.to(dtype) if npad == n else torch.nn.functional.pad(k.to(dtype), (0, 0, 0, npad - n))
    if not reverse:
        return kp.reshape(b, hkv, npad // stride, stride * d)
    return kp.reshape(b, hkv, npad // stride, stride, d).flip(3).reshape(b, hkv, npad // stride, stride * d)


def antidiagonal_mass(q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, scale: float,
                      fused=None) -> torch.Tensor:
    """q [B, Hq, N, D], k [B, Hkv, N, D] -> row-normalised block mass [B, Hq, nb, nb] (float32,
    float64 for float64 inputs), nb = ceil(N / block_size); zero above the diagonal.
    fused: see _use_fused (None = by device)."""
    if block_size % stride:
        raise ValueError(f"xattention: block_size must be a multiple of stride, got {block_size} and {stride}")
    b, hq, n, d = q.shape
    acc = _acc_dtype(q)
    fused = _use_fused(q, fused)
    nb = math.ceil(n / block_size)
    npad = nb * block_size
    ng = npad // stride  # groups (padded)
    gpb = block_size // stride  # groups per block
    mm = _mm_dtype(q)
    qp = q.to(mm) if npad == n else torch.nn.functional.pad(q.to(mm), (0, 0, 0, npad - n))
    hkv = k.shape[1]
    qs = qp.reshape(b, hkv, hq // hkv, ng, stride * d)  # query groups: rows concatenated in order
    ks = _key_groups(k, npad, stride, mm)
    g_valid = math.ceil(n / stride)  # groups holding at least one real token
    scores = fused and MASS_KERNEL == "scores" and gpb & (gpb - 1) == 0 and acc == torch.float32
    if fused and not scores and not (q.is_cuda and mm in (torch.float16, torch.bfloat16)):
        ks = ks.float()  # once (TF32 operands), not per chunk; CUDA half inputs stay half (matmul_f32)
    out = torch.zeros(b, hq, nb, nb, dtype=acc, device=q.device)
    elems = _CHUNK_ELEMS * (4 if q.is_cuda else 1)
    heads_at_once = hkv if fused else hq  # the fused path scores one query head of each group at a time
    # at least MIN_CHUNKS chunks: a chunk of rows [r0, r1) scores keys [0, r1), so its upper
    # triangle is wasted work (1/2 for one chunk, 1/16 for 8)
    rows_per_chunk = max(gpb, min(elems // max(1, b * heads_at_once * ng), ng // MIN_CHUNKS) // gpb * gpb)
    for r0 in range(0, ng, rows_per_chunk):
        r1 = min(ng, r0 + rows_per_chunk)  # a multiple of gpb; causal: key groups < r1 only
        if scores:  # half-precision scores of the chunk, then one reduction pass (kernels.xattn)
            from ..kernels import xattn

            s = torch.empty(hq // hkv, b, hkv, r1 - r0, r1, dtype=mm, device=q.device)
            for g in range(hq // hkv):  # one matmul per query head of the group, q rows read in place
                torch.matmul(qs[:, :, g, r0:r1], ks[:, :, :r1].transpose(-1, -2), out=s[g])
            xattn.scores_block_mass(s, out, r0, g_valid, gpb, scale / stride)
            continue
        qi = torch.arange(r0, r1, device=q.device)
        out[:, :, r0 // gpb : r1 // gpb, : r1 // gpb] = _group_block_mass(
            qs[:, :, :, r0:r1], ks[:, :, :r1], qi, g_valid, gpb, scale / stride, hq, fused).to(acc)
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)


def threshold_rows(mass: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """mass [B, H, R, M] (rows sum to 1; non-candidates 0), tau [H] -> bool [B, H, R, M]: per row
    the smallest prefix of entries sorted by mass (descending, ties by index) reaching tau.
    tau >= 1 keeps every entry with mass (a float cumsum may reach 1 before the smallest ones)."""
    vals, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    before = row_cumsum(vals) - vals  # mass of the entries ranked before each one
    t = tau[None, :, None, None]
    keep_sorted = ((before < t) | (t >= 1)) & (vals > 0)
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter_(-1, order, keep_sorted)


def row_cumsum(x: torch.Tensor, chunk: int = 1024, two_level: bool | None = None) -> torch.Tensor:
    """cumsum along the last dim. Rows longer than `chunk` (a multiple of it) are scanned in two
    levels when two_level (default: on CUDA): within chunks, then the chunks' exclusive prefix
    added; torch's scan of a few very long rows runs one block per row (0.7 ms for 32 rows of
    1M floats on an H100)."""
    m = x.shape[-1]
    two_level = x.is_cuda if two_level is None else two_level
    if not two_level or m <= chunk or m % chunk:
        return x.cumsum(-1)
    c = x.reshape(*x.shape[:-1], m // chunk, chunk).cumsum(-1)
    tot = c[..., -1]
    return (c + (tot.cumsum(-1) - tot)[..., None]).reshape(x.shape)


def table_to_index(table: torch.Tensor, kmax: int | None = None) -> torch.Tensor:
    """bool [B, H, R, M] membership -> int64 [B, H, R, K]: each row's members in ascending order,
    -1 padding (K = kmax, by default the widest row: one host synchronisation). Members past
    kmax are dropped. A prefix sum gives each member its slot (no sort)."""
    kmax = max(1, int(table.sum(-1).max()) if kmax is None else kmax)
    return _compact(torch.arange(table.shape[-1], device=table.device), table, -1, kmax)


def head_values(name: str, value, hq: int, device, lo: float, hi: float) -> torch.Tensor:
    """A float or one float per query head -> float64 tensor [Hq]."""
    vals = [value] * hq if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    if len(vals) != hq:
        raise ValueError(f"{name}: expected a float or {hq} per-head values, got {len(vals)} values")
    return device_tensor(vals, device, torch.float64)  # no blocking H2D copy per call


def check_fraction(name: str, value, lo: float = 0.0, hi: float = 1.0) -> None:
    vals = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and lo < v <= hi for v in vals)
    except TypeError:
        ok = False
    if not ok or not vals:
        raise ValueError(f"{name}: expected a float in ({lo}, {hi}] or a list of them (one per head), got {value!r}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def estimate(q, k, tau=0.9, stride: int = 8, block_size: int = 64, scale: float | None = None, fused=None):
    """q [B, Hq, N, D], k [B, Hkv, N, D] -> (block_idx [B, Hq, nb, K] int64 with -1 padding,
    mass [B, Hq, nb, nb] the estimated row-normalised block mass). fused (None = on CUDA
    half-precision inputs): the Triton kernels of `kernels.xattn` for the mass and the selection."""
    b, hq, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    fused = _use_fused(q, fused)
    mass = antidiagonal_mass(q, k, stride, block_size, scale, fused)
    taus = head_values("tau", tau, hq, q.device, 0.0, 1.0).to(mass.dtype)
    return select_rows(mass, taus, fused), mass


def select_rows(mass: torch.Tensor, tau: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """mass [B, Hq, nb, nb] row-normalised, tau [Hq] -> block_idx [B, Hq, nb, K] int64 (-1
    padding): per row `threshold_rows` plus the sink block 0 and the diagonal block, none past
    the diagonal. fused: `kernels.xattn.select_blocks` (float32 mass, no sort), else torch."""
    nb = mass.shape[-1]
    if fused and mass.dtype == torch.float32 and nb <= 16384:
        from ..kernels import xattn

        return xattn.select_blocks(mass, tau)
    keep = threshold_rows(mass, tau)
    r = torch.arange(nb, device=mass.device)
    forced = (r[None, :] == r[:, None]) | (r[None, :] == 0)
    return table_to_index((keep | forced) & (r[None, :] <= r[:, None]))


def sampled_blocks(nb: int, samples: int, device) -> tuple[list[int], torch.Tensor]:
    """`samples` evenly spaced query blocks of nb (first and last included), chosen on the host
    (no device sync): (their indices, the same as a long tensor on `device`)."""
    picked = sorted({round(i * (nb - 1) / max(min(samples, nb) - 1, 1)) for i in range(min(samples, nb))})
    return picked, device_tensor(picked, device, torch.long)


def sampled_query_rows(q: torch.Tensor, rows: torch.Tensor, block_size: int, dtype) -> torch.Tensor:
    """q [B, Hq, N, D], query blocks rows [S] -> their rows [B, Hq, S * block_size, D] in dtype,
    rows past N zero (as a padded q has them)."""
    n = q.shape[2]
    pos = (rows[:, None] * block_size + torch.arange(block_size, device=q.device)).reshape(-1)
    qs = q.index_select(2, pos.clamp_max(n - 1)).to(dtype)
    return qs * (pos < n).to(dtype)[:, None] if n % block_size else qs


def probe_density(q, k, tau=0.9, stride: int = 8, block_size: int = 64, scale: float | None = None,
                  samples: int = 16, fused=None) -> torch.Tensor:
    """A cheap estimate of `estimate`'s kept density: the same scoring and threshold on
    `samples` evenly spaced query blocks only (~samples / nb of the full cost) -> float32
    [B, Hq] = kept blocks / causal blocks over the sampled rows (a ratio estimator of the
    causal-pair-weighted density). No host synchronisation. The density guard calls it
    before the full estimate so that inputs bound for dense do not pay the estimation."""
    b, hq, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    nb = math.ceil(n / block_size)
    if block_size % stride:
        raise ValueError(f"xattention: block_size must be a multiple of stride, got {block_size} and {stride}")
    picked, rows = sampled_blocks(nb, samples, q.device)
    gpb = block_size // stride
    npad = nb * block_size
    mm, acc = _mm_dtype(q), _acc_dtype(q)
    qs = sampled_query_rows(q, rows, block_size, mm)  # [B, Hq, S * block_size, D]
    hkv = k.shape[1]
    # the same antidiagonal sums with the sampled query groups reversed and k in order: no copy of k
    qs = qs.reshape(b, hkv, hq // hkv, len(picked) * gpb, stride, d).flip(4)
    qs = qs.reshape(b, hkv, hq // hkv, len(picked) * gpb, stride * d)
    ks = _key_groups(k, npad, stride, mm, reverse=False)
    qi = (rows[:, None] * gpb + torch.arange(gpb, device=q.device)).reshape(-1)  # query group
    g_valid = math.ceil(n / stride)
    mass = _group_block_mass(qs, ks, qi, g_valid, gpb, scale / stride, hq,
                             _use_fused(q, fused)).to(acc)  # [B, Hq, S, nb]
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    keep = threshold_rows(mass, head_values("tau", tau, hq, q.device, 0.0, 1.0).to(acc))
    r = torch.arange(nb, device=q.device)
    keep = (keep | (r == rows[:, None]) | (r == 0)) & (r <= rows[:, None])
    return (keep.sum((-1, -2)).float() / (rows + 1).sum().float())


@dataclass
class XAttention(Pattern):
    """Options: tau (cumulative block mass kept per query-block row: a float in (0, 1], or one
    per query head), stride (antidiagonal stride), block_size (a multiple of stride)."""

    name = "xattention"
    tau: float | list = 0.9
    stride: int = 8
    block_size: int = 64

    def shard(self, shard) -> "XAttention":
        """A per-head tau list sliced to a tensor-parallel rank's query heads `shard.q`."""
        if isinstance(self.tau, (list, tuple)):
            return dataclasses.replace(self, tau=list(self.tau)[shard.q.start:shard.q.stop])
        return self

    def __post_init__(self):
        check_fraction("tau", self.tau)
        check_int("stride", self.stride)
        check_int("block_size", self.block_size)
        if self.block_size % self.stride:
            raise ValueError(f"block_size: expected a multiple of stride={self.stride}, got {self.block_size}")

    def probe(self, q, k, scale) -> torch.Tensor:
        """[B, Hq] kept density estimated on a few query blocks (see probe_density)."""
        return probe_density(q, k, self.tau, self.stride, self.block_size, scale)

    def est_share(self, n: int) -> float:
        """The estimation's cost as a share of cuDNN dense attention at length n, the probe's
        cost in `guards.probe_says_dense`. Both grow as N^2 / stride: measured (H100, one 8B layer,
        structured q/k, 48K-512K; benchmarks/results/adaptive_breakeven.md, adaptive_long.md)
        0.08-0.12 at stride 8 and 0.04-0.08 at stride 16; the largest is used."""
        return 0.12 if self.stride <= 8 else 0.08

    def probe_op(self) -> str:
        return "block_sparse_attention"

    def select(self, q, k, scale):
        idx, _ = estimate(q, k, self.tau, self.stride, self.block_size, scale)
        # the selection's rows are ascending without repeats: no sort in the index build, no table here
        dens = block_sparse_density(q.shape[2], idx, self.block_size, sorted_blocks=True)
        return [Selection("block_sparse_attention", {"block_idx": idx, "block_size": self.block_size,
                                                     "sorted_blocks": True}, dens)]
