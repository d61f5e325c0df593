"""The warp-specialised Gluon kernel against the Triton kernel, kernel alone, alternating rounds.

One Llama-3-8B layer (32 q / 8 KV heads, D 128, bf16, causal, B 1): block-sparse on the realistic
top-100 lists of 64-blocks (`attention.realistic_blocks`) and A-shape (128 sink + 4096 window).
Every variant is checked at 16K against the float32 reference on the same mask (rel. err, NaN),
--vs variants also on slashes with holes, on keys whose logits move rows' maxima late (heavy
columns) and at batch 2 with a tail (N = 16284) on transposed q / k / v; and at every length against
the Triton kernel's output; then the kernel alone (index prebuilt) is timed, all variants once per
round, `--rounds` rounds, order reversed every other round; cuDNN dense before the first round and
after the last.

    python benchmarks/gluon_ab.py --sizes 131072,524288 --rounds 3 --out $OUT --tag gluon_ab \
        --variants 'bs/g3=bs:3,4,128,1;bs/g3n=bs:3,4,128,0;as/g2=as:2,8,168,1,128'
    python benchmarks/gluon_ab.py --sizes 131072 --out $OUT --tag vs_ab --vs 'cols=VS_BAND_COLS=1;old=VS_BAND_COLS=0'

Variant: name=pattern:stages,warps,maxnreg,overlap[,block_n[,two]] with pattern bs or as (warps per
consumer warpgroup; two: two consumer warpgroups on 128-row blocks); the Triton kernel (the library's config, FLAGS["GLUON"] off) is always timed
as "<pattern>/triton". The first Gluon variant of each pattern is also checked on a transposed
(non-contiguous) q. --library adds the whole ops calls (index construction included) with
FLAGS["GLUON"] on and off: "<p>/lib+gluon", "<p>/lib" for bs, as and vs (realistic indices). --vs
times vertical-slash ops calls under other katt.FLAGS settings ("vs/<name>"), checked like the rest; 'bs:<name>=...' entries time block-sparse calls (realistic lists) the same way.
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
from sparseinfer.kernels import attention as katt, gluon as kg  # noqa: E402
import attention as A  # noqa: E402

SINK, WINDOW = 128, 4096


def parse(spec: str) -> list[dict]:
    out = []
    for item in (s for s in spec.split(";") if s):
        name, _, rest = item.partition("=")
        pat, _, params = rest.partition(":")
        p = [int(x) for x in params.split(",")] if params else []
        if pat not in ("bs", "as") or len(p) not in (4, 5, 6):
            raise SystemExit("--variants: expected name=bs|as:stages,warps,maxnreg,overlap[,block_n[,two]], "
                             f"got {item!r}")
        out.append({"name": name, "pattern": pat, "stages": p[0], "warps": p[1], "maxnreg": p[2],
                    "overlap": bool(p[3]), "block_n": p[4] if len(p) > 4 else 64, "two": bool(p[5]) if len(p) > 5 else False})
    return out


def indices(pat, n, bi, block_m, dev):
    if pat == "bs":
        return _index.from_block_sparse(bi, A.BS, n, block_m, A.BS)
    return _index.from_ashape(n, SINK, WINDOW, 1, A.HQ, block_m, dev)


def triton_fn(pat, q, k, v, n, bi, scale, dev):
    kind = "blocks" if pat == "bs" else "ashape"
    cfg = katt.CONFIGS[kind][A.D]
    idx = indices(pat, n, bi, cfg[0], dev)
    return lambda: katt.run_index(q, k, v, idx, scale, cfg[1], *cfg[2:])


def gluon_fn(var, q, k, v, n, bi, scale, dev):
    idx = indices(var["pattern"], n, bi, 16 * var["warps"] * (2 if var["two"] else 1), dev)
    return lambda: kg.run(q, k, v, idx, scale, stages=var["stages"], num_warps=var["warps"], maxnreg=var["maxnreg"],
                          overlap=var["overlap"], block_n=var["block_n"], two=var["two"], check=False)


def parse_vs(spec: str) -> list[dict]:
    """--vs 'name=FLAG=int,FLAG=int;name2=...' -> [{"name": "vs/name", "pattern": "vs", "flags": {...}}]."""
    out = []
    for item in (x for x in spec.split(";") if x):
        name, _, rest = item.partition("=")
        flags = {}
        for kv in (x for x in rest.split(",") if x):
            key, _, val = kv.partition("=")
            kind, _, param = key.partition(".")
            cfg_key = kind in kg.CONFIGS and param in kg.CONFIGS[kind]
            if not (key in katt.FLAGS or cfg_key) or not val.lstrip("-").isdigit():
                raise SystemExit(f"--vs: expected name=FLAG=int[,FLAG=int], FLAG one of {sorted(katt.FLAGS)} or "
                                 f"<kind>.<key of gluon.CONFIGS[kind]>, got {item!r}")
            flags[key] = int(val)
        pat, name = ("bs", name[3:]) if name.startswith("bs:") else ("vs", name)  # bs:<name>: block-sparse calls
        out.append({"name": f"{pat}/{name}", "pattern": pat, "flags": flags})
    return out


def flags_fn(flags, q, k, v, vs, scale, pattern="vs", bi=None):
    """The whole vertical-slash (or block-sparse, realistic lists bi) ops call with these katt.FLAGS /
    Gluon config entries set (GLUON on unless given)."""
    def fn():
        saved, saved_cfg = dict(katt.FLAGS), {kind: dict(c) for kind, c in kg.CONFIGS.items()}
        katt.FLAGS.update({"GLUON": True, **{k_: v_ for k_, v_ in flags.items() if "." not in k_}})
        for k_, v_ in flags.items():  # <kind>.<param>: a Gluon config entry
            if "." in k_:
                kind, _, param = k_.partition(".")
                kg.CONFIGS[kind][param] = v_
        try:
            if pattern == "bs":
                return ops.block_sparse_attention(q, k, v, bi, A.BS, scale=scale, backend="triton")
            return ops.vertical_slash_attention(q, k, v, vs[0], vs[1], scale=scale, backend="triton")
        finally:
            katt.FLAGS.clear()
            katt.FLAGS.update(saved)
            for kind, c in saved_cfg.items():
                kg.CONFIGS[kind].clear()
                kg.CONFIGS[kind].update(c)
    return fn


def holey_vs(vs, n):
    """The realistic slashes plus two groups with holes (merged runs: every third offset over 300, and two runs
    29 apart), so the second launch's ranges with holes are checked too."""
    extra = torch.cat([5000 + torch.arange(0, 300, 3), 9000 + torch.arange(21), 9050 + torch.arange(21)]).to(vs[1].device)
    return vs[0], torch.cat([vs[1], extra.clamp(max=n - 1).expand(*vs[1].shape[:2], -1)], -1)


def library_fn(pat, gluon, q, k, v, n, bi, vs, scale):
    """The whole ops call (index construction included) with FLAGS["GLUON"] on or off."""
    def fn():
        katt.FLAGS["GLUON"] = gluon
        try:
            if pat == "bs":
                return ops.block_sparse_attention(q, k, v, bi, A.BS, scale=scale, backend="triton")
            if pat == "as":
                return ops.ashape_attention(q, k, v, SINK, WINDOW, scale=scale, backend="triton")
            return ops.vertical_slash_attention(q, k, v, vs[0], vs[1], scale=scale, backend="triton")
        finally:
            katt.FLAGS["GLUON"] = False
    return fn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="")
    ap.add_argument("--vs", default="", help="vertical-slash ops calls (realistic indices) under katt.FLAGS "
                    "settings: 'name=FLAG=int[,FLAG=int];...' (GLUON on unless given), timed as vs/name")
    ap.add_argument("--sizes", default="131072,524288")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per variant per round")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="gluon_ab")
    ap.add_argument("--library", action="store_true", help="also time the ops calls with FLAGS['GLUON'] on / off")
    args = ap.parse_args()
    variants = parse(args.variants)
    vs_vars = parse_vs(args.vs)
    if not variants and not vs_vars and not args.library:
        raise SystemExit("nothing to time: give --variants, --vs or --library")
    katt.FLAGS["GLUON"] = False  # the baseline is the Triton kernel; Gluon variants call kg.run
    pats = sorted({v["pattern"] for v in variants})
    dev, gen = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0)
    scale = A.D ** -0.5
    meta = A.run_meta()
    lines, log = A.logger(json.dumps(meta))

    n16 = 16384
    q, k, v = A.random_qkv(1, A.HQ, A.HKV, n16, A.D, dev, gen, torch.bfloat16)
    bi = A.realistic_blocks(1, A.HQ, n16, dev, gen)
    vs = A.realistic_vs(1, A.HQ, n16, dev, gen)
    lib = [(p, g) for p in ("bs", "as", "vs") for g in (True, False)] if args.library else []
    need = set(pats) | {p for p, _ in lib} | {var["pattern"] for var in vs_vars}
    refs = {"bs": ops.block_sparse_attention(q, k, v, bi, A.BS, backend="reference").float() if "bs" in need else None,
            "as": ops.ashape_attention(q, k, v, SINK, WINDOW, backend="reference").float() if "as" in need else None,
            "vs": ops.vertical_slash_attention(q, k, v, *vs, backend="reference").float() if "vs" in need else None}
    checks = {}
    entries = (list(variants) + [{"name": f"{p}/triton", "pattern": p} for p in pats]
               + [{"name": f"{p}/lib" + ("+gluon" if g else ""), "pattern": p, "lib": g} for p, g in lib]
               + list(vs_vars))
    for var in entries:
        try:
            if "lib" in var:
                fn = library_fn(var["pattern"], var["lib"], q, k, v, n16, bi, vs, scale)
            elif "flags" in var:
                fn = flags_fn(var["flags"], q, k, v, vs, scale, var["pattern"], bi)
            elif var["name"].endswith("/triton"):
                fn = triton_fn(var["pattern"], q, k, v, n16, bi, scale, dev)
            else:
                fn = gluon_fn(var, q, k, v, n16, bi, scale, dev)
            o = fn().float()
            torch.cuda.synchronize()
        except Exception as e:  # a variant that fails is logged and left out
            log(f"check {var['name']}: failed {type(e).__name__}: {str(e)[:600]}")
            if var in variants:
                variants.remove(var)
            if "lib" in var:
                lib.remove((var["pattern"], var["lib"]))
            if var in vs_vars:
                vs_vars.remove(var)
            continue
        ref = refs[var["pattern"]]
        err = ((o - ref).norm() / ref.norm()).item()
        checks[var["name"]] = {"rel_err": err, "nan": bool(torch.isnan(o).any())}
        log(f"check {var['name']}: rel err {err:.2e} nan {checks[var['name']]['nan']}")
        if "flags" in var and var["pattern"] == "vs":
            def extra(key, label, q_, k_, v_, vs_):  # one more check of this variant against the reference
                o_ = flags_fn(var["flags"], q_, k_, v_, vs_, scale)().float()
                r_ = ops.vertical_slash_attention(q_, k_, v_, *vs_, backend="reference").float()
                e_ = ((o_ - r_).norm() / r_.norm()).item()
                checks[var["name"]].update({f"{key}_rel_err": e_, f"{key}_nan": bool(torch.isnan(o_).any())})
                log(f"check {var['name']}: {label}, rel err {e_:.2e} nan {checks[var['name']][key + '_nan']}")

            extra("holey", "slashes with holes", q, k, v, holey_vs(vs, n16))  # ranges with holes too
            # keys whose logits dwarf the rest (head 0's vertical columns scaled 12x, in every KV head): rows'
            # maxima move late (column pass, edges), where a rescaling that skips unmoved rows could go wrong
            # (results/vs_lazy_rejected.patch); random q / k move a row's max only on its first tile
            kl = k.clone()
            kl[:, :, vs[0][0, 0]] *= 12
            extra("late_max", "heavy columns (late maxima)", q, kl, v, vs)
            del kl
            # batch 2, N with a tail (N % 128 = 28: a 128-row block whose upper 64 rows are past N), q / k / v as
            # transposed views of [B, N, H, D] projections
            nt_ = n16 - 100
            qt, kt, vt = (torch.randn(2, nt_, h_, A.D, device=dev, generator=gen, dtype=torch.bfloat16).transpose(1, 2)
                          for h_ in (A.HQ, A.HKV, A.HKV))
            extra("tail", f"B 2, N {nt_}, transposed q / k / v", qt, kt, vt, A.realistic_vs(2, A.HQ, nt_, dev, gen))
            del qt, kt, vt
        if var in variants and var is next(x for x in variants if x["pattern"] == var["pattern"]):
            qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # projections' views
            ot = gluon_fn(var, qt, kt, vt, n16, bi, scale, dev)().float()
            same = ((ot - o).norm() / o.norm()).item()
            checks[var["name"]]["transposed_qkv_diff"] = same
            log(f"check {var['name']}: transposed q / k / v, rel. diff to contiguous ones {same:.2e}")
    del q, k, v, refs
    rows = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        q, k, v, bi, dense_fn, dense = A.length_inputs(n, dev, gen, log)
        vs = A.realistic_vs(1, A.HQ, n, dev, gen)
        fns = {}
        for p in pats:
            fns[f"{p}/triton"] = (p, triton_fn(p, q, k, v, n, bi, scale, dev))
        for var in variants:
            fns[var["name"]] = (var["pattern"], gluon_fn(var, q, k, v, n, bi, scale, dev))
        for p, g in lib:
            fns[f"{p}/lib" + ("+gluon" if g else "")] = (p, library_fn(p, g, q, k, v, n, bi, vs, scale))
        for var in vs_vars:
            fns[var["name"]] = (var["pattern"], flags_fn(var["flags"], q, k, v, vs, scale, var["pattern"], bi))
        base = {p: (f"{p}/triton" if p in pats else f"{p}/lib" if (p, False) in lib else
                    next(x["name"] for x in vs_vars if x["pattern"] == p)) for p in need}
        firsts = {p: fns[base[p]][1]().float() for p in need}
        for name, (p, fn) in fns.items():
            o = fn().float()
            diff = ((o - firsts[p]).norm() / firsts[p].norm()).item()
            checks.setdefault(name, {})[f"vs_triton_{n}"] = diff
            log(f"N={n} {name}: rel. diff to {base[p]} {diff:.2e} "
                f"nan {bool(torch.isnan(o).any())}")
            del o
        del firsts
        names = list(fns)
        times = A.alternate({name: fn for name, (_, fn) in fns.items()}, args.rounds, args.budget, log, f"N={n}")
        dense.append(A.bench(dense_fn, budget_s=1.0, min_reps=1))
        log(f"N={n} dense cudnn (after) {dense[1]:.2f} ms")
        d = min(dense)
        for name in names:
            ts = times[name]
            rows.append({"N": n, "variant": name, "ms": ts, "median_ms": statistics.median(ts), "dense_ms": dense})
            log(f"N={n} {name:14s} median {statistics.median(ts):8.2f} ms  {d / statistics.median(ts):6.2f}x")
        del q, k, v, fns
    md = [f"# Gluon (warp-specialised) vs Triton kernel, {meta['device']}", "",
          f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; one Llama-3-8B layer (32 / 8 heads, D 128, "
          f"bf16); block-sparse realistic top-100 of 64-blocks, A-shape {SINK} + {WINDOW}, vertical-slash realistic "
          f"(1000 / 6096); kernel alone (index prebuilt; '/lib' rows: the whole ops call), median of {args.rounds} alternating rounds; ratio vs the faster cuDNN timing.", "",
          "Variants: " + "; ".join(f"{v['name']} = stages {v['stages']}, warps {v['warps']}, maxnreg {v['maxnreg']}, "
                                   f"overlap {int(v['overlap'])}, block_n {v['block_n']}, two {int(v['two'])}"
                                   for v in variants), "",
          "| N | variant | 16K rel. err | rounds (ms) | median (ms) | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        err = checks.get(r["variant"], {}).get("rel_err")
        md.append(f"| {r['N'] // 1024}K | {r['variant']} | {err:.2e} | {' / '.join(f'{t:.2f}' for t in r['ms'])} | "
                  f"{r['median_ms']:.2f} | {min(r['dense_ms']) / r['median_ms']:.2f}x |")
    A.write_results(args.out, args.tag, {"meta": meta, "variants": variants, "checks": checks, "rows": rows},
                    "\n".join(md) + "\n", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
