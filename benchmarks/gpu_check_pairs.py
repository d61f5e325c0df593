"""GPU check of the pair-block path (kernels.attention._block_pairs, FLAGS["BS_PAIRS"]) against the
float32 reference on shapes the benchmarks do not use: head_dim 64 and 128, GQA 9 / 3 and 32 / 8,
fp16 and bf16, batch 2, N not a multiple of 64, a dense tail, heads with a given output, and
transformers' [B, N, H, D] output layout. Prints one line per case; exit status 1 on a failure.
Writes results/gpu_check_pairs.md."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparseinfer import ops  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402
from sparseinfer.kernels import rows as krows  # noqa: E402


def sorted_lists(b, h, nb, dens, gen, dev):
    """Ascending 64-block rows (-1 padding) of a causal keep map whose neighbouring rows and key
    blocks often agree (pair blocks occur), diagonal kept."""
    keep = torch.rand(b, h, nb, nb, generator=gen, device=dev) < dens
    keep[:, :, 1::2] |= keep[:, :, 0:nb - 1:2] & (torch.rand(b, h, nb // 2, nb, generator=gen, device=dev) < 0.9)
    keep[..., 1::2] |= keep[..., 0::2][..., :nb // 2] & (torch.rand(b, h, nb, nb // 2, generator=gen, device=dev) < 0.9)
    keep &= torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
    keep |= torch.eye(nb, dtype=torch.bool, device=dev)
    col = torch.where(keep, keep.cumsum(-1) - 1, nb)
    idx = torch.full((b, h, nb, nb + 1), -1, dtype=torch.int64, device=dev)
    idx.scatter_(-1, col, torch.arange(nb, device=dev).expand_as(col))
    return idx[..., :nb].contiguous()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = [(2, 9, 3, 5000, 64, torch.float16, None, False), (1, 32, 8, 16384 + 37, 128, torch.bfloat16, None, False),
             (1, 4, 1, 3000, 128, torch.bfloat16, 40, False), (2, 8, 2, 4100, 64, torch.bfloat16, None, True)]
    lines, bad = [], 0
    seen = []
    split = krows.pair_split
    krows.pair_split = lambda *a: seen.append(split(*a)) or seen[-1]
    for b, hq, hkv, n, d, dtype, dense_from, with_heads in cases:
        q = torch.randn(b, hq, n, d, generator=gen, device=dev).to(dtype)
        k = torch.randn(b, hkv, n, d, generator=gen, device=dev).to(dtype)
        v = torch.randn(b, hkv, n, d, generator=gen, device=dev).to(dtype)
        nb = -(-n // 64)
        idx = sorted_lists(b, hq, nb, 0.3, gen, dev)
        heads = (torch.arange(hq, device=dev) % 3 != 1) if with_heads else None
        ref = ops.block_sparse_attention(q.float(), k.float(), v.float(), idx, 64, backend="reference",
                                         dense_from=dense_from)
        katt.FLAGS["BS_PAIRS"] = "auto"
        seen.clear()
        if heads is None:
            buf = torch.full((b, n, hq, d), float("nan"), dtype=dtype, device=dev)  # [B, N, H, D] layout
            ops.block_sparse_attention(q, k, v, idx, 64, sorted_blocks=True, dense_from=dense_from, out=buf.transpose(1, 2))
            got = buf.transpose(1, 2)
        else:
            got = torch.full_like(q, 3.0)
            ops.block_sparse_attention(q, k, v, idx, 64, sorted_blocks=True, heads=heads, out=got)
        pairs = int(seen[0][1].sum()) if seen else 0
        katt.FLAGS["BS_PAIRS"] = 0
        one = ops.block_sparse_attention(q, k, v, idx, 64, sorted_blocks=True, dense_from=dense_from, heads=heads)
        katt.FLAGS["BS_PAIRS"] = "auto"
        sel = slice(None) if heads is None else heads
        e, e1 = rel(got[:, sel], ref[:, sel]), rel(one[:, sel], ref[:, sel])
        ok = e <= 1e-2 and bool(torch.isfinite(got[:, sel]).all()) and pairs > 0
        if heads is not None:
            ok = ok and bool((got[:, ~heads] == 3.0).all())
        bad += not ok
        line = (f"B={b} Hq/Hkv={hq}/{hkv} N={n} D={d} {str(dtype)[6:]} dense_from={dense_from} heads={with_heads}: "
                f"pair blocks {pairs}, rel err {e:.2e} (one launch {e1:.2e}) {'ok' if ok else 'FAILED'}")
        print(line, flush=True)
        lines.append(f"- {line}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_check_pairs.md")
    with open(out, "w") as f:
        f.write(f"# GPU check: pair blocks vs the float32 reference ({torch.cuda.get_device_name()})\n\n"
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
                "`python benchmarks/gpu_check_pairs.py`.\n\n" + "\n".join(lines) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
