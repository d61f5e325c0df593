"""Hardware counters (Nsight Compute) for the kernels whose targets are still open: the realistic
block-sparse top-100 lists at 128K / 512K and the realistic vertical-slash call at 128K (one
Llama-3-8B layer: 32 / 8 heads, D 128, bf16), and TEAL's sparse GEMVs at 50% next to cuBLAS's dense
ones (Llama-3.1-8B decode projections, batch 1).

Each case runs twice to compile and warm up, then once between cudaProfilerStart / Stop, so that

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section LaunchStats --csv --page raw \
        python benchmarks/ncu_kernels.py --cases bs128k,bs512k,vs128k,teal > raw.csv

profiles exactly the kernels of that one call. `--summary raw.csv` prints, per kernel, the
counters that say what limits it (duration, DRAM / L2 / L1 traffic and hit rates, tensor pipe,
occupancy, registers, issue rate, the main warp stall reasons) as a markdown table.

Where in the machine code the warps wait (warp-state sampling per instruction):

    ncu --clock-control none --profile-from-start off -k regex:sparse_fwd --section SourceCounters \
        --section WarpStateStats -o bs512 python ncu_kernels.py --cases bs512k
    ncu -i bs512.ncu-rep --page source --csv --print-source sass > sass.csv
    python ncu_kernels.py --source sass.csv

prints the share of the samples per stall reason and the instructions holding most of them.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def profiled(fn, label: str) -> None:
    import torch

    fn()
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(label)
    torch.cuda.cudart().cudaProfilerStart()
    fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    torch.cuda.nvtx.range_pop()
    print(f"# profiled {label}", file=sys.stderr, flush=True)


def attention_cases(cases) -> None:
    import torch

    import attention as bench  # benchmarks/attention.py: the realistic index sets
    from sparseinfer import kernels

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    for case in cases:
        n = {"bs128k": 131072, "bs512k": 524288, "vs128k": 131072, "vs512k": 524288}[case]
        gen.manual_seed(0)
        q, k, v = bench.random_qkv(1, bench.HQ, bench.HKV, n, bench.D, dev, gen, torch.bfloat16)
        scale = bench.D ** -0.5
        if case.startswith("bs"):
            bi = bench.realistic_blocks(1, bench.HQ, n, dev, gen)
            profiled(lambda: kernels.block_sparse_attention(q, k, v, bi, bench.BS, scale), case)
            del bi
        else:
            vert, sl = bench.realistic_vs(1, bench.HQ, n, dev, gen)
            profiled(lambda: kernels.vertical_slash_attention(q, k, v, vert, sl, scale), case)
            del vert, sl
        del q, k, v
        torch.cuda.empty_cache()


def teal_case() -> None:
    import torch
    import torch.nn.functional as F

    from sparseinfer.kernels import gemv

    dev = torch.device("cuda")
    torch.manual_seed(0)
    hid, inter, nq, nkv = 4096, 14336, 4096, 1024
    bf = torch.bfloat16

    def w(o, i):
        return torch.randn(o, i, device=dev, dtype=bf) * i ** -0.5

    ws = {"gate": w(inter, hid), "up": w(inter, hid), "down": w(hid, inter), "qkv": w(nq + 2 * nkv, hid),
          "o": w(hid, nq)}
    wt = {name: t.t().contiguous() for name, t in ws.items()}
    x = torch.randn(1, hid, device=dev, dtype=bf)
    h = torch.randn(1, inter, device=dev, dtype=bf)
    tx = x.float().abs().quantile(0.5).reshape(1)
    th = h.float().abs().quantile(0.5).reshape(1)
    gemv.prepare_counters(dev)
    gu_cfg = gemv._sized(gemv.TEAL_MLP_CONFIG["cuda"], hid, inter, x)  # what teal_mlp runs
    profiled(lambda: gemv._teal(x, wt["gate"], wt["up"], tx, gu_cfg, True), "teal gate+up")
    profiled(lambda: gemv.teal_gemv_launch(h, wt["down"], th, gemv._sized(gemv.TEAL_DOWN_CONFIG["cuda"], inter, hid, h)),
             "teal down")
    profiled(lambda: gemv.teal_gemv_launch(x, wt["qkv"], tx), "teal qkv")
    profiled(lambda: gemv.teal_gemv_launch(x, wt["o"], tx), "teal o")
    for name, inp in (("gate", x), ("down", h), ("qkv", x), ("o", x)):
        profiled(lambda: F.linear(inp, ws[name]), f"dense {name}")


# raw metric -> (column, scale) for the summary
SUMMARY = [
    ("gpu__time_duration.sum", "us", 1e-3),
    ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "DRAM %", 1),
    ("dram__bytes.sum.per_second", "DRAM GB/s", 1e-9),
    ("lts__throughput.avg.pct_of_peak_sustained_elapsed", "L2 %", 1),
    ("lts__t_sector_hit_rate.pct", "L2 hit %", 1),
    ("l1tex__t_sector_hit_rate.pct", "L1 hit %", 1),
    ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", "tensor %", 1),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM %", 1),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy %", 1),
    ("launch__registers_per_thread", "regs", 1),
    ("launch__grid_size", "programs", 1),
    ("launch__occupancy_limit_registers", "blocks/SM (regs)", 1),
    ("launch__occupancy_limit_shared_mem", "blocks/SM (smem)", 1),
]
STALLS = "smsp__average_warps_issue_stalled_"


def summary(path: str) -> str:
    """Markdown table of SUMMARY's counters and the three largest stall reasons per kernel."""
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = list(csv.reader(lines))
    head, data = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]  # row 1: units
    col = {name: i for i, name in enumerate(head)}

    def val(r, name):
        try:
            return float(r[col[name]].replace(",", ""))
        except (KeyError, ValueError):
            return math.nan

    cols = [c for _, c, _ in SUMMARY]
    out = ["| kernel | " + " | ".join(cols) + " | top stalls (warps per issue) |",
           "|---" * (len(cols) + 2) + "|"]
    stall_cols = [n for n in head if n.startswith(STALLS) and n.endswith("_per_issue_active.ratio")]
    for r in data:
        name = r[col["Kernel Name"]][:48]
        vals = [val(r, m) * s for m, _, s in SUMMARY]
        st = sorted(((val(r, n), n[len(STALLS):-len("_per_issue_active.ratio")]) for n in stall_cols),
                    reverse=True)[:4]
        out.append(f"| {name} | " + " | ".join("-" if math.isnan(v) else f"{v:.3g}" for v in vals)
                   + " | " + ", ".join(f"{n} {v:.2f}" for v, n in st if not math.isnan(v)) + " |")
    return "\n".join(out) + "\n"


def source(path: str, top: int = 25) -> str:
    """Markdown: the share of warp-state samples per stall reason over a kernel's SASS, and the
    `top` instructions holding the most samples (ncu's source page exported as CSV)."""
    with open(path) as f:
        rows = list(csv.reader(f))
    at = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if at is None or "Warp Stall Sampling (All Samples)" not in rows[at]:
        raise SystemExit(f"--source {path}: expected ncu's source page as CSV (a header row starting with "
                         "'Address' and a 'Warp Stall Sampling (All Samples)' column: --page source --csv "
                         "--print-source sass of a report with the SourceCounters section)")
    head, data = rows[at], [r for r in rows[at + 1:] if len(rows[at]) == len(r)]
    col = {name: i for i, name in enumerate(head)}

    def val(r, name):
        try:
            return float(r[col[name]] or 0)
        except ValueError:
            return 0.0

    samples = "Warp Stall Sampling (All Samples)"
    total = sum(val(r, samples) for r in data) or 1.0
    reasons = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    share = sorted(((sum(val(r, h) for r in data) / total, h[6:]) for h in reasons), reverse=True)
    out = [f"{len(data)} instructions, {int(total)} samples", "", "| stall reason | share of samples |", "|---|---|"]
    out += [f"| {h} | {v * 100:.1f}% |" for v, h in share if v >= 0.001]
    out += ["", "| address | share | instruction | main reasons |", "|---|---|---|---|"]
    for r in sorted(data, key=lambda r: -val(r, samples))[:top]:
        main = sorted(((val(r, h), h[6:]) for h in reasons), reverse=True)[:2]
        text = r[col["Source"]].strip().replace("|", "/")
        out.append(f"| {r[col['Address']][-5:]} | {val(r, samples) / total * 100:.1f}% | `{text[:70]}` | "
                   + ", ".join(f"{h} {v / total * 100:.1f}%" for v, h in main if v) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="bs128k,bs512k,vs128k,teal")
    ap.add_argument("--summary", default=None, help="a raw CSV written by ncu: print the summary table")
    ap.add_argument("--source", default=None, help="ncu's source page as CSV (--page source --print-source sass): "
                    "stall reasons and the instructions holding the most samples")
    args = ap.parse_args()
    if args.source:
        print(source(args.source), end="")
        return
    if args.summary:
        print(summary(args.summary), end="")
        return
    cases = [c for c in args.cases.split(",") if c]
    known = {"bs128k", "bs512k", "vs128k", "vs512k", "teal"}
    if set(cases) - known:
        raise SystemExit(f"--cases: unknown {sorted(set(cases) - known)}; known: {sorted(known)}")
    attention_cases([c for c in cases if c != "teal"])
    if "teal" in cases:
        teal_case()


if __name__ == "__main__":
    main()
