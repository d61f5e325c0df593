"""Block-sparse kernel variants on the realistic top-100 lists, timed in alternating rounds.

One Llama-3-8B layer (32 q / 8 KV heads, D 128, bf16, causal, B 1); the lists of
`attention.realistic_blocks` (the sink block, 16 local blocks, 83 random earlier ones, 64-blocks).
A variant is a kernel file (sparseinfer/kernels/<file>), a kernel config (block_m, block_n, warps,
stages, edge stages, split) and katt.FLAGS changes. Each is checked at 16K against the float32
reference on the same mask, then at every length the index of each variant is built once and the
kernel alone is timed (`run_index`), all variants once per round, `--rounds` rounds; cuDNN dense is
timed before the first round and after the last. Registers, shared memory and resident programs per
SM of every compiled specialisation are recorded (the launch at 512K is a different
specialisation from 16K's: FLAGS["PF_MAX_N"]).

    python benchmarks/bs_variants.py --sizes 131072,524288 --rounds 4 --out $OUT --tag bsvar \
        --variants 'default=_attn_kernel.py;n32=_v_x.py:64,32,4,3,1,0;pf=_attn_kernel.py::PF_MAX_N=1048576'

Variant syntax: name=file[:config[:FLAG=int+FLAG=int]]; an empty config keeps the library default.
With FLAGS["GLUON"] on (the default) the library config's 64 x 64 lists run the Gluon kernel on an H100,
whatever the file: pass GLUON=0 for the Triton kernel file named (benchmarks/gluon_ab.py compares the two).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from sparseinfer import index as _index, ops  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402
from sparseinfer.kernels._loader import kernel_module  # noqa: E402
import attention as A  # noqa: E402
from kernel_resources import compiled, describe  # noqa: E402


def parse(spec: str) -> list[dict]:
    out = []
    for item in (s for s in spec.split(";") if s):
        name, _, rest = item.partition("=")
        parts = rest.split(":")
        cfg = tuple(int(x) for x in parts[1].split(",")) if len(parts) > 1 and parts[1] else None
        flags = {}
        for f in (parts[2].split("+") if len(parts) > 2 and parts[2] else []):
            k, _, v = f.partition("=")
            if k not in katt.FLAGS:
                raise SystemExit(f"--variants {name}: unknown flag {k!r} (expected one of {sorted(katt.FLAGS)})")
            flags[k] = int(v)
        if not name or not parts[0]:
            raise SystemExit(f"--variants: expected name=file[:config[:FLAG=int]], got {item!r}")
        out.append({"name": name, "file": parts[0], "config": cfg, "flags": flags})
    return out


def use(var: dict, base: dict) -> tuple:
    katt.FLAGS.update(base)
    katt.FLAGS.update(KERNEL=var["file"], **var["flags"])
    cfg = var["config"] or katt.CONFIGS["blocks"][A.D]
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--sizes", default="131072,524288")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--budget", type=float, default=1.2, help="seconds of timing per variant per round")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="bs_variants")
    args = ap.parse_args()
    variants = parse(args.variants)
    dev, gen = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0)
    base = dict(katt.FLAGS)
    scale = A.D ** -0.5
    meta = A.run_meta()
    lines, log = A.logger(json.dumps(meta))

    q16, k16, v16 = A.random_qkv(1, A.HQ, A.HKV, 16384, A.D, dev, gen, torch.bfloat16)
    bi16 = A.realistic_blocks(1, A.HQ, 16384, dev, gen)
    ref = ops.block_sparse_attention(q16, k16, v16, bi16, A.BS, backend="reference").float()
    checks = {}
    for var in list(variants):
        cfg = use(var, base)
        try:
            o = katt.block_sparse_attention(q16, k16, v16, bi16, A.BS, scale, config=cfg).float()
        except Exception as e:  # a variant that does not compile is logged and left out
            log(f"check {var['name']}: failed {type(e).__name__}: {str(e)[:400]}")
            variants.remove(var)
            continue
        err = ((o - ref).norm() / ref.norm()).item()
        checks[var["name"]] = {"rel_err": err, "nan": bool(torch.isnan(o).any())}
        log(f"check {var['name']}: rel err {err:.2e} nan {checks[var['name']]['nan']}")
    del q16, k16, v16, ref
    rows = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        q, k, v, bi, dense_fn, dense = A.length_inputs(n, dev, gen, log)
        idx = {}
        for var in variants:
            cfg = use(var, base)
            idx[var["name"]] = _index.from_block_sparse(bi, A.BS, n, cfg[0], cfg[1])
        first = None  # every variant's output against the first one's (the 16K check misses PF_MAX_N's switch)
        for var in variants:
            cfg = use(var, base)
            o = katt.run_index(q, k, v, idx[var["name"]], scale, cfg[1], *cfg[2:]).float()
            first = o if first is None else first
            diff = ((o - first).norm() / first.norm()).item()
            checks[var["name"]][f"vs_first_{n}"] = diff
            log(f"N={n} {var['name']}: rel. diff to {variants[0]['name']} {diff:.2e} nan {bool(torch.isnan(o).any())}")
            del o
        del first
        def timed(var):  # the variant's FLAGS set on every call (bench's warm-up call included)
            cfg, ix = use(var, base), idx[var["name"]]
            return lambda: (use(var, base), katt.run_index(q, k, v, ix, scale, cfg[1], *cfg[2:]))

        times = A.alternate({var["name"]: timed(var) for var in variants}, args.rounds, args.budget, log, f"N={n}")
        dense.append(A.bench(dense_fn, budget_s=1.0, min_reps=1))
        log(f"N={n} dense cudnn (after) {dense[1]:.2f} ms")
        d = min(dense)
        for var in variants:
            ts = times[var["name"]]
            rows.append({"N": n, "variant": var["name"], "file": var["file"], "config": var["config"],
                         "flags": var["flags"], "ms": ts, "median_ms": statistics.median(ts), "dense_ms": dense})
            log(f"N={n} {var['name']:12s} median {statistics.median(ts):8.2f} ms  min {min(ts):8.2f}  "
                f"{d / statistics.median(ts):6.2f}x (dense {d:.1f})")
    katt.FLAGS.update(base)
    res = []
    keep = ("BLOCK_N", "STAGES", "EDGE_STAGES", "PF", "HAS_TILES")
    for f in sorted({var["file"] for var in variants}):
        fn = kernel_module(f, False).sparse_fwd_kernel
        for ck in compiled(fn):
            cons = {}
            for key, val in (getattr(getattr(ck, "src", None), "constants", None) or {}).items():
                name = key if isinstance(key, str) else (fn.arg_names[key[0]] if isinstance(key, tuple) else str(key))
                if name in keep:
                    cons[name] = val if isinstance(val, (int, float, bool, str)) else str(val)
            res.append(dict(describe(ck, cons), file=f))
    for r in res:
        log(f"resources {r['file']} {r['constants']}: regs {r['regs']} spills {r['spills']} shared {r['shared_KB']} KB -> "
            f"{r['programs_per_SM']} per SM ({', '.join(r['limited_by'])})")
    md = [f"# Block-sparse kernel variants, {meta['device']}", "",
          f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; realistic top-100 lists of 64-blocks, "
          f"one Llama-3-8B layer (32 / 8 heads, D 128, bf16); kernel alone (index prebuilt), median of "
          f"{args.rounds} alternating rounds; ratio vs the faster cuDNN timing (before / after the rounds).", "",
          "| N | variant | file | config | flags | 16K rel. err | rounds (ms) | median (ms) | ratio |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = min(r["dense_ms"])
        md.append(f"| {r['N'] // 1024}K | {r['variant']} | {r['file']} | {r['config'] or 'default'} | "
                  f"{r['flags'] or '-'} | {checks[r['variant']]['rel_err']:.2e} | "
                  f"{' / '.join(f'{t:.2f}' for t in r['ms'])} | {r['median_ms']:.2f} | {d / r['median_ms']:.2f}x |")
    md += ["", "| file | constants | regs | spills | shared KB | programs / SM | limited by |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {r['file']} | {r['constants']} | {r['regs']} | {r['spills']} | {r['shared_KB']} | {r['programs_per_SM']} | "
           f"{', '.join(r['limited_by'])} |" for r in res]
    A.write_results(args.out, args.tag, {"meta": meta, "checks": checks, "rows": rows, "resources": res},
                    "\n".join(md) + "\n", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
