"""Does the order of a run move the ratio? Dense and sparse pre-filling attention timed in three
orders while nvidia-smi samples the SM clock, power, temperature and throttle reasons.

    python benchmarks/clocks.py [--sizes 131072,524288] [--rounds 4] [--out DIR] [--tag clocks]

`attention.py` times, per length, every dense call first (cuDNN, then the flash backend: ~35 s of
full-power work at 512K), then the sparse calls. If that heats the card or holds it at its power
limit, the sparse calls run at lower clocks than the dense ones they are divided by. Orders per
length (one Llama-3-8B layer: B 1, 32 / 8 heads, D 128, bf16; realistic indices as in attention.py):
  "table":        cuDNN burst, then vertical-slash, then block-sparse (attention.py's order);
  "sparse first": after an idle pause, vertical-slash, block-sparse, then cuDNN;
  "interleaved":  R rounds of one burst each (cuDNN, vertical-slash, block-sparse).
A burst = back-to-back timed calls (CUDA events) for a time budget; its median is the burst's time.
Each burst records the nvidia-smi samples taken during it (mean SM clock, mean power, highest
temperature, the throttle reasons seen). Ratio = cuDNN / sparse within one order (interleaved: per
round, then the median over rounds). Writes JSON + markdown to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention import BS, D, HKV, HQ, run_meta, busy_ahead, dense_fns, random_qkv, realistic_blocks, realistic_vs  # noqa: E402
from sparseinfer import kernels  # noqa: E402

FIELDS = ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu"]
REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


class Smi:
    """nvidia-smi sampling the first visible GPU every `ms` milliseconds on a thread; each line is
    stamped with the host clock when read. samples(t0, t1) -> the samples between."""

    def __init__(self, ms: int = 100):
        self.rows: list[tuple[float, list[str]]] = []
        self.fields = None
        self.proc = None
        for reason in REASONS:
            fields = FIELDS + [reason]
            try:
                probe = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}",
                                        "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                return
            if probe.returncode == 0 and "Field" not in probe.stdout:
                self.fields = fields
                break
        if self.fields is None:
            return
        self.proc = subprocess.Popen(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(self.fields)}",
                                      "--format=csv,noheader,nounits", "-lms", str(ms)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.rows.append((time.time(), [x.strip() for x in line.split(",")]))

    def samples(self, t0: float, t1: float) -> dict:
        got = [r for t, r in self.rows if t0 <= t <= t1]
        if not got:  # a call shorter than the sampling period: the nearest sample after it
            after = [r for t, r in self.rows if t > t1]
            got = after[:1]
        if not got:
            return {}

        def num(i):
            vals = []
            for r in got:
                try:
                    vals.append(float(r[i]))
                except (ValueError, IndexError):
                    pass
            return vals

        clk, mem, pw, temp = num(0), num(1), num(2), num(3)
        reasons = sorted({r[4] for r in got if len(r) > 4})
        return {"samples": len(got), "sm_mhz": statistics.mean(clk) if clk else None,
                "sm_mhz_min": min(clk) if clk else None, "mem_mhz": statistics.mean(mem) if mem else None,
                "power_w": statistics.mean(pw) if pw else None, "temp_c": max(temp) if temp else None,
                "reasons": reasons}

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()


SLEEP_CYCLES = 20_000_000  # ~10 ms of torch.cuda._sleep (what attention.bench(ahead=True) queued before session 19)


def burst(fn, budget_s: float, min_reps: int, sleep: str = "none") -> tuple[list[float], float, float]:
    """Back-to-back calls of fn for ~budget_s (at least min_reps): (ms per call, host t0, t1).
    sleep: "none"; "ahead" = a sleep kernel queued before each timed call (the host launches the
    call while it runs); "before" = the same sleep kernel, waited for before the timed call (the
    same low-power GPU time before the call, the host not ahead); "busy" = ~10 ms of full-power
    matrix products queued ahead instead (attention.busy_ahead: the host ahead, no idle power)."""
    torch.cuda.synchronize()
    times = []
    t0 = time.time()
    while len(times) < min_reps or time.time() - t0 < budget_s:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep == "busy":
            busy_ahead(torch.device("cuda", torch.cuda.current_device()))
        elif sleep != "none":
            torch.cuda._sleep(SLEEP_CYCLES)
            if sleep == "before":
                torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return times, t0, time.time()


def run(sizes, rounds: int, pause_s: float, log, smi: Smi, sleeps: bool = False, orders: bool = True):
    rows = []
    scale = D ** -0.5
    for n in sizes:
        torch.cuda.empty_cache()
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = random_qkv(1, HQ, HKV, n, D, torch.device("cuda"), gen, torch.bfloat16)
        vert, sl = realistic_vs(1, HQ, n, q.device, gen)
        bi = realistic_blocks(1, HQ, n, q.device, gen)
        fns = {"cudnn": dense_fns(q, k, v)["cudnn"],
               "vertical-slash": lambda: kernels.vertical_slash_attention(q, k, v, vert, sl, scale),
               "block-sparse": lambda: kernels.block_sparse_attention(q, k, v, bi, BS, scale)}
        for f in fns.values():  # compile / warm up
            f()
        torch.cuda.synchronize()
        long = n >= 524288
        budget = {"cudnn": 1.0, "vertical-slash": 0.8, "block-sparse": 0.8}
        min_reps = {"cudnn": 2 if long else 3, "vertical-slash": 3, "block-sparse": 3}

        def one(order, rnd, name, budget_s=None, sleep="none"):
            times, t0, t1 = burst(fns[name], budget[name] if budget_s is None else budget_s,
                                  min_reps[name] if budget_s is None else 1, sleep)
            r = {"N": n, "order": order, "round": rnd, "variant": name, "ms": statistics.median(times),
                 "calls": len(times), "first_ms": times[0], "last_ms": times[-1], "t0": t0, "t1": t1,
                 **smi.samples(t0, t1)}
            rows.append(r)
            clk = f"{r['sm_mhz']:.0f} MHz (min {r['sm_mhz_min']:.0f}), {r['power_w']:.0f} W, {r['temp_c']:.0f} C " \
                  f"{'/'.join(r['reasons'])}" if r.get("sm_mhz") else "no clock samples"
            log(f"N={n:7d} {order:12s} r{rnd} {name:15s} {r['ms']:9.2f} ms x{len(times):3d} "
                f"(first {times[0]:.2f}, last {times[-1]:.2f}) {clk}")

        def idle(s):
            t0 = time.time()
            time.sleep(s)
            st = smi.samples(t0, time.time())
            log(f"N={n:7d} idle {s:.0f} s: {st.get('sm_mhz') or 0:.0f} MHz, {st.get('power_w') or 0:.0f} W, "
                f"{st.get('temp_c') or 0:.0f} C")

        if orders:
            idle(pause_s)
            for name in ("cudnn", "vertical-slash", "block-sparse"):
                one("table", 0, name)
            idle(pause_s)
            for name in ("vertical-slash", "block-sparse", "cudnn"):
                one("sparse first", 0, name)
            idle(pause_s)
        for rnd in range(rounds if orders else 0):
            for name in ("cudnn", "vertical-slash", "block-sparse"):
                one("interleaved", rnd, name, budget_s=0.3)
        if sleeps:  # the sparse calls with a sleep kernel ahead / waited for / none, alternated
            for rnd in range(2):
                for name in ("vertical-slash", "block-sparse"):
                    for mode in ("none", "before", "ahead", "busy"):
                        one(f"sleep {mode}", rnd, name, sleep=mode)
        del q, k, v, vert, sl, bi, fns
    return rows


def ratios(rows) -> list[dict]:
    out = []
    for n in sorted({r["N"] for r in rows}):
        for order in ("table", "sparse first", "interleaved"):
            sel = [r for r in rows if r["N"] == n and r["order"] == order]
            for name in ("vertical-slash", "block-sparse"):
                per = []
                for rnd in sorted({r["round"] for r in sel}):
                    d = [r["ms"] for r in sel if r["round"] == rnd and r["variant"] == "cudnn"]
                    s = [r["ms"] for r in sel if r["round"] == rnd and r["variant"] == name]
                    if d and s:
                        per.append(d[0] / s[0])
                if order == "sparse first":  # both after an idle pause: table's cuDNN burst, this sparse one
                    d = [r["ms"] for r in rows if r["N"] == n and r["order"] == "table" and r["variant"] == "cudnn"]
                    s = [r["ms"] for r in sel if r["variant"] == name]
                    if d and s:
                        out.append({"N": n, "order": "both after idle", "variant": name, "ratio": d[0] / s[0],
                                    "ratios": [d[0] / s[0]], "dense_mhz": None, "sparse_mhz": None})
                if per:
                    clk = lambda v: [r["sm_mhz"] for r in sel if r["variant"] == v and r.get("sm_mhz")]  # noqa: E731
                    out.append({"N": n, "order": order, "variant": name, "ratio": statistics.median(per),
                                "ratios": per,
                                "dense_mhz": statistics.mean(clk("cudnn")) if clk("cudnn") else None,
                                "sparse_mhz": statistics.mean(clk(name)) if clk(name) else None})
    return out


def markdown(meta, rows, rat) -> str:
    lines = [f"# Run order, clocks and the sparse / dense ratio, {meta['device']}", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; one Llama-3-8B "
             "layer (B 1, 32 / 8 heads, D 128, bf16, causal), realistic indices (attention.py). Clocks, power, "
             "temperature: nvidia-smi samples during each burst (`benchmarks/clocks.py`).", "",
             "## Ratios (cuDNN / sparse, same order; interleaved: median over rounds)", "",
             "| N | order | variant | ratio | per round | cuDNN MHz | sparse MHz |", "|---|---|---|---|---|---|---|"]
    f = lambda x: f"{x:.0f}" if x else "-"  # noqa: E731
    for r in rat:
        lines.append(f"| {r['N'] // 1024}K | {r['order']} | {r['variant']} | {r['ratio']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {f(r['dense_mhz'])} | {f(r['sparse_mhz'])} |")
    lines += ["", "## Bursts", "", "| N | order | round | variant | ms (median) | calls | first / last ms | SM MHz "
              "(mean / min) | W | C | reasons |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N'] // 1024}K | {r['order']} | {r['round']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['calls']} | {r['first_ms']:.2f} / {r['last_ms']:.2f} | {f(r.get('sm_mhz'))} / "
                     f"{f(r.get('sm_mhz_min'))} | {f(r.get('power_w'))} | {f(r.get('temp_c'))} | "
                     f"{' '.join(r.get('reasons', []))} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="131072,524288")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--pause", type=float, default=15.0, help="idle seconds before each order")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default="clocks")
    ap.add_argument("--sleeps", action="store_true",
                    help="also: the sparse calls with a sleep kernel queued ahead of each call, waited for before it, "
                         "or none (is attention.bench(ahead=True)'s gain host time or power headroom?)")
    ap.add_argument("--no-orders", action="store_true", help="skip the three orders (with --sleeps: only those)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("clocks.py times GPU kernels: no CUDA device")
    meta = run_meta()
    os.makedirs(args.out, exist_ok=True)
    smi = Smi()
    meta["smi_fields"] = smi.fields
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(json.dumps(meta))
    rows = []
    try:
        rows = run([int(s) for s in args.sizes.split(",") if s], args.rounds, args.pause, log, smi, args.sleeps,
                   not args.no_orders)
    finally:
        smi.stop()
        rat = ratios(rows)
        for r in rat:
            log(f"N={r['N']} {r['order']:12s} {r['variant']:15s} {r['ratio']:.2f}x  {r['ratios']}")
        with open(os.path.join(args.out, f"{args.tag}.json"), "w") as fh:
            json.dump({"meta": meta, "rows": rows, "ratios": rat}, fh, indent=1)
        with open(os.path.join(args.out, f"{args.tag}.md"), "w") as fh:
            fh.write(markdown(meta, rows, rat))
        with open(os.path.join(args.out, f"{args.tag}.log"), "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
