"""What the TEAL one-row loop costs in instructions, read off the Hopper machine code (no GPU needed).

Compiles `teal_gemv_kernel` for sm_90 with the library's GPU defaults and the argument
divisibility a real launch on Llama-3.1-8B shapes gets (Triton specialises pointers and integers
divisible by 16; without it the weight loads are not vectorised), disassembles it with the
nvdisasm that ships with Triton and counts the instructions of the main loop. Every loop step
touches the whole [BLOCK_K, BLOCK_N] weight tile (dropped rows are masked, not skipped), so the
loop's instructions per weight element times the matrix size is what the SMs must issue whatever
the sparsity: the issue floor = elements x instructions / 32 lanes / (SMs x 4 schedulers) / clock.

    python benchmarks/teal_sass.py --out benchmarks/results/contextual
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from sparseinfer.kernels import gemv  # noqa: E402
import contextual as ctx  # noqa: E402  (save)

SMS, ISSUE, CLOCK_GHZ = 132, 4, 1.755  # H100 SXM: SMs, warp instructions issued per SM per cycle, clock under load
H, I, QKV = 4096, 14336, 6144  # Llama-3.1-8B hidden, intermediate, fused q/k/v outputs


def _kernel():
    path = os.path.join(HERE, "..", "sparseinfer", "kernels", "_gemv_kernel.py")
    spec = importlib.util.spec_from_file_location("_gemv_kernel_sass", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.teal_gemv_kernel


def launches() -> list[dict]:
    """The four launches of a TEAL decode layer with the library defaults."""
    out = []
    for name, k, n, cfg, two in (("gate+up", H, I, gemv.TEAL_MLP_CONFIG["cuda"], True),
                                 ("down", I, H, gemv.TEAL_DOWN_CONFIG["cuda"], False),
                                 ("qkv", H, QKV, gemv.TEAL_CONFIG["cuda"], False),
                                 ("o", H, H, gemv.TEAL_CONFIG["cuda"], False)):
        bk, bn, rows, warps, stages, pf = cfg
        if name in ("qkv", "o"):  # single projections: the default config's rows rule
            rows = gemv.default_rows(k, n, bk, bn, rows, SMS)
        out.append(dict(launch=name, K=k, N=n, config=[bk, bn, rows, warps, stages, pf], two=two))
    return out


def compile_sass(kernel, launch: dict) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bk, bn, rows, warps, stages, pf = launch["config"]
    sig = {"X": "*bf16", "WT": "*bf16", "WT2": "*bf16", "T": "*fp32", "P": "*fp32", "M": "i32", "K": "i32", "N": "i32",
           "stride_xm": "i32", "stride_wk": "i32", "stride_ps": "i32", "stride_pw": "i32", "OUT": "*bf16",
           "CNT": "*i32", "SPLITS": "i32", "stride_om": "i32", "SIDX": "*i32", "SX": "*fp32"}
    consts = dict(ROWS=rows, BLOCK_M=1, BLOCK_K=bk, BLOCK_N=bn, STAGES=stages, TWO=launch["two"], FUSED=True,
                  GLU=launch["two"], COMPACT=False, LIST=False, PREFETCH=bool(pf))
    sig.update({c: "constexpr" for c in consts})
    names = list(kernel.arg_names)
    div = ["X", "WT", "WT2", "T", "P", "K", "N", "stride_xm", "stride_wk", "stride_ps", "OUT", "CNT", "stride_om",
           "SIDX", "SX"] + (["stride_pw"] if launch["two"] else [])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div}
    ck = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": stages})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-c", f.name], check=True, capture_output=True, text=True).stdout


def main_loop(sass: str) -> list[str]:
    """Opcodes of the longest label .. backward-branch-to-it range (the row loop)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", ln.strip()))}
    best = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.search(r"/\*[0-9a-f]{4}\*/", x)]
            if len(body) > len(best):
                best = body
    ops = []
    for x in best:
        code = re.sub(r"/\*[0-9a-f]+\*/", "", x).strip().lstrip("{").strip()
        code = re.sub(r"^@!?U?P[T0-9]+\s+", "", code)
        ops.append(code.split()[0].rstrip(";") if code else "?")
    return ops


def markdown(res: dict) -> str:
    a = res["assumed"]
    md = ["# TEAL one-row loop: instructions per weight element (sm_90 machine code, Llama-3.1-8B launches)", "",
          f"triton {res['triton']}, {res['target']}, {res['date']}; library GPU defaults; issue floor = elements x "
          f"instructions per element / 32 / ({a['sms']} SMs x {a['issue_per_cycle']} per cycle) / {a['clock_ghz']} GHz: "
          "the time the SMs need to issue the loop whatever the sparsity (dropped rows are masked, their FMAs still "
          "issue). `python benchmarks/teal_sass.py --out DIR`.", "",
          "| launch | K x N | config | loop instructions | weight elements per thread per step | instructions per "
          "element | issue floor us | bytes bound at 50% us | most frequent |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        md.append(f"| {r['launch']} | {r['K']} x {r['N']}{' x 2' if r['two'] else ''} | {r['config']} | "
                  f"{r['loop_instructions']} | {r['elements_per_thread_step']:.0f} | {r['instructions_per_element']} | "
                  f"{r['issue_floor_us']} | {r['bytes_bound_50_us']} | "
                  f"{', '.join(f'{k} {v}' for k, v in r['mix'])} |")
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import triton

    kernel = _kernel()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "triton": triton.__version__, "target": "sm_90 (compiled locally, no GPU)",
           "assumed": {"sms": SMS, "issue_per_cycle": ISSUE, "clock_ghz": CLOCK_GHZ}, "rows": []}
    for ln in launches():
        sass = compile_sass(kernel, ln)
        ops = main_loop(sass)
        bk, bn, _, warps, _, _ = ln["config"]
        per_thread = bk * bn * (2 if ln["two"] else 1) / (warps * 32)  # weight elements per thread per step
        ipe = len(ops) / per_thread
        elements = ln["K"] * ln["N"] * (2 if ln["two"] else 1)
        floor_us = elements * ipe / 32 / (SMS * ISSUE) / (CLOCK_GHZ * 1e3)
        bound_us = elements * 2 / 2 / 3.0e6  # bytes at 50% kept over 3.0 TB/s
        mix = collections.Counter(o.split(".")[0] for o in ops).most_common(8)
        row = dict(ln, loop_instructions=len(ops), elements_per_thread_step=per_thread,
                   instructions_per_element=round(ipe, 2), issue_floor_us=round(floor_us, 1),
                   bytes_bound_50_us=round(bound_us, 1), mix=mix)
        res["rows"].append(row)
        print(f"{ln['launch']:8s} {ln['config']} loop {len(ops)} instr for {per_thread:.0f} elements/thread: "
              f"{ipe:.2f} per element, issue floor {floor_us:.1f} us (bytes bound at 50%: {bound_us:.1f} us); "
              f"{', '.join(f'{k} {v}' for k, v in mix)}", flush=True)
    ctx.save(args.out, "teal_sass", res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
