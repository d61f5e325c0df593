"""Triton kernel: a block-sparse row's block list -> its sorted, deduplicated key tiles.

Only @triton.jit code; ``sparseinfer.kernels.blocklist`` loads it compiled (CUDA tensors) or
under the Triton interpreter (CPU tensors). No sort: with K <= KP entries per row, an entry's
output slot is the number of kept entries with a smaller block (a [KP, KP] comparison in
registers), and an entry is kept if it is causal-strict and no earlier entry holds the same block.
"""
import triton
import triton.language as tl

# standard combine functions the interpreter recognises by identity (see _attn_kernel.py)
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def block_tiles_kernel(IDX, TILES, TCOUNT, DIAG, K, NB, BLOCK_SIZE, KP: tl.constexpr):
    row = tl.program_id(0)  # (b, h, query block) flattened; query block = row % NB
    qb = row % NB
    offs = tl.arange(0, KP)
    x = tl.load(IDX + row.to(tl.int64) * K + offs, mask=offs < K, other=-1).to(tl.int32)
    diag = tl.reduce((x == qb).to(tl.int32), 0, _max_fn)
    valid = (x >= 0) & (x < qb)
    big = NB + 1
    xv = tl.where(valid, x, big)
    same_before = (xv[None, :] == xv[:, None]) & (offs[None, :] < offs[:, None])
    keep = valid & (tl.reduce(same_before.to(tl.int32), 1, _max_fn) == 0)
    slot = tl.reduce(((xv[None, :] < xv[:, None]) & keep[None, :]).to(tl.int32), 1, _sum_fn)
    tl.store(TILES + row.to(tl.int64) * K + slot, xv * BLOCK_SIZE, mask=keep)
    tl.store(TCOUNT + row, tl.reduce(keep.to(tl.int32), 0, _sum_fn))
    tl.store(DIAG + row, diag.to(tl.int8))
