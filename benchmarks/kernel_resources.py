"""Registers, spills, shared memory and the resulting resident programs per SM of every compiled
variant of the pre-filling kernel (and the decode GEMV kernels), after one call of each pattern
at 16K on the GPU (one Llama-3-8B layer: 32 q / 8 KV heads, D 128, bf16; realistic indices of
benchmarks/attention.py). Occupancy = min over registers (64K per SM), shared memory (228 KB per
SM, 1 KB reserved per program) and threads (2048 per SM).

    python benchmarks/kernel_resources.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from sparseinfer import kernels  # noqa: E402
from sparseinfer.kernels import gemv  # noqa: E402
from sparseinfer.kernels._loader import kernel_module  # noqa: E402
import attention as A  # noqa: E402  (realistic index sets, shapes)


def compiled(fn):
    """Every CompiledKernel of a JITFunction (triton 3.x device caches)."""
    out = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        out += list(cache.values())
    return out


def describe(k, constants) -> dict:
    k._init_handles()
    md = k.metadata
    warps, shared = md.num_warps, md.shared
    return dict({"kernel": md.name, "constants": constants, "warps": warps, "regs": k.n_regs, "spills": k.n_spills,
                 "shared_KB": round(shared / 1024, 1)}, **occupancy(k.n_regs, shared, warps))


def occupancy(regs: int, shared: int, warps: int) -> dict:
    """Resident programs per SM (sm_90): registers allocated 8 per thread at a time, 64K per SM; 228 KB
    of shared memory, 1 KB reserved per program; 2048 threads; and which limits bind."""
    threads = 32 * warps
    limits = {"registers": 65536 // max(1, -(-regs // 8) * 8 * threads),
              "shared memory": (228 * 1024) // (shared + 1024) if shared else 32, "threads": 2048 // threads}
    best = min(limits.values())
    return {"programs_per_SM": best, "limited_by": [k for k, v in limits.items() if v == best]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=16384)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    n, scale = args.n, A.D ** -0.5
    q, k, v = A.random_qkv(1, A.HQ, A.HKV, n, A.D, dev, gen, torch.bfloat16)
    vert, sl = A.realistic_vs(1, A.HQ, n, dev, gen)
    bi = A.realistic_blocks(1, A.HQ, n, dev, gen)
    kernels.ashape_attention(q, k, v, A.SINK, A.WINDOW, scale)
    kernels.vertical_slash_attention(q, k, v, vert, sl, scale)
    kernels.block_sparse_attention(q, k, v, bi, A.BS, scale)
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 14336, device=dev, dtype=torch.bfloat16)
    t = torch.quantile(x.float().abs(), 0.5)
    gemv.teal_gemv_launch(x, w, t)
    gemv.teal_mlp_launch(x, w, w, w.t().contiguous(), t, t)
    torch.cuda.synchronize()
    rows = []
    keep = ("BLOCK_M", "BLOCK_N", "STAGES", "EDGE_STAGES", "SPLIT", "HAS_TILES", "HAS_EDGES", "HAS_COLS", "TMA",
            "BLOCK_K", "ROWS", "TWO", "PREFETCH", "FUSED")
    for fname, kname in (("_attn_kernel.py", "sparse_fwd_kernel"), ("_gemv_kernel.py", "teal_gemv_kernel")):
        fn = getattr(kernel_module(fname, False), kname)
        for ck in compiled(fn):
            cons = {}
            src = getattr(ck, "src", None)
            for key, val in (getattr(src, "constants", None) or {}).items():
                name = key if isinstance(key, str) else (fn.arg_names[key[0]] if isinstance(key, tuple) else str(key))
                if name in keep:
                    cons[name] = val if isinstance(val, (int, float, bool, str)) else str(val)
            r = describe(ck, cons)
            rows.append(r)
            print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_resources.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "n": n, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
