"""Monitoring a patched model: `with sparseinfer.record(model, audit=0.1) as rec:`.

While the block is open, every attention call of the patched model is recorded per layer:
kept density per head, estimation time, the route it took (sparse, or dense with the reason:
short, decode, chunk, mask, density (per head), rollout, dense_layers) and, on a sampled
share `audit` of the sparse calls, the true attention mass the kept indices cover on the
last `audit_queries` queries (their exact softmax, computed for the audit only).

Off by default and free when off: the attention function only checks `plan.recorder is None`.
While on, estimation is timed with a device synchronisation before and after it.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class CallTrace:
    """One attention call. density / covered: [B, Hq] tensors (read lazily) or None."""

    layer: int
    q_len: int
    method: str
    reason: str  # "" for a sparse call; else why it (or some heads, for "density") ran dense
    density: torch.Tensor | None = None
    estimate_s: float | None = None
    dense_heads: torch.Tensor | None = None  # bool [Hq]: heads routed dense by the density guard
    covered: torch.Tensor | None = None  # audited share of the true attention mass kept


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@dataclass
class Recorder:
    """Collects CallTraces; see the module docstring. audit: share of sparse calls audited
    (deterministic given seed); audit_queries: how many last queries the audit uses."""

    audit: float = 0.0
    seed: int = 0
    audit_queries: int = 64
    calls: list[CallTrace] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.audit, bool) or not isinstance(self.audit, (int, float)) or not 0.0 <= self.audit <= 1.0:
            raise ValueError(f"record: audit expected a share in [0, 1], got {self.audit!r}")
        if isinstance(self.audit_queries, bool) or not isinstance(self.audit_queries, int) or self.audit_queries < 1:
            raise ValueError(f"record: audit_queries expected a positive int, got {self.audit_queries!r}")
        self._rng = random.Random(self.seed)

    # ------------------------------------------------------------ called by the attention function
    def dense(self, layer: int, q_len: int, reason: str) -> None:
        self.calls.append(CallTrace(layer, q_len, "dense", reason))

    def start(self, q: torch.Tensor) -> float:
        _sync(q)
        return time.perf_counter()

    def sparse(self, layer, method, q, k, scale, parts, density, t0, dense_heads=None, t_end=None) -> None:
        """t0: `start` before the estimation; t_end: `start` again where it ended (None: now)."""
        if t_end is None:
            _sync(q)
            t_end = time.perf_counter()
        dt = t_end - t0
        covered = None
        if self.audit > 0 and self._rng.random() < self.audit:
            covered = self._covered(q, k, scale, parts, dense_heads)
        reason = "density" if dense_heads is not None else ""
        self.calls.append(CallTrace(layer, q.shape[2], method, reason, density.detach(), dt, dense_heads, covered))

    def _covered(self, q, k, scale, parts, dense_heads) -> torch.Tensor:
        from .recall import RecallProbe

        n = q.shape[2]
        probe = RecallProbe(q, k, scale, blocks=[(max(0, n - self.audit_queries), n)])
        kept = probe.recall(parts)
        if dense_heads is not None:
            kept = torch.where(dense_heads, torch.ones_like(kept), kept)
        return kept.detach()

    # ------------------------------------------------------------ reading
    def layers(self) -> list[dict]:
        """One dict per layer: calls, sparse calls, density per head (mean over sparse calls and
        batch; dense calls not included), mean estimation ms, fallbacks {reason: count},
        dense heads {head: count}, covered mass per head (mean over audited calls)."""
        by: dict[int, list[CallTrace]] = {}
        for c in self.calls:
            by.setdefault(c.layer, []).append(c)
        out = []
        for layer, calls in sorted(by.items()):
            sp = [c for c in calls if c.density is not None]
            fall: dict[str, int] = {}
            for c in calls:
                if c.reason:
                    fall[c.reason] = fall.get(c.reason, 0) + 1
            dens = torch.stack([c.density.float().mean(0).cpu() for c in sp]) if sp else None  # [calls, Hq]
            aud = [c.covered.float().mean(0).cpu() for c in sp if c.covered is not None]
            dh: dict[int, int] = {}
            for c in sp:
                if c.dense_heads is not None:
                    for h in c.dense_heads.nonzero().flatten().tolist():
                        dh[h] = dh.get(h, 0) + 1
            out.append({
                "layer": layer,
                "calls": len(calls),
                "sparse_calls": len(sp),
                "density": dens.mean(0).tolist() if dens is not None else None,
                "density_all": dens.tolist() if dens is not None else [],
                "estimate_ms": 1e3 * sum(c.estimate_s for c in sp) / len(sp) if sp else None,
                "fallbacks": fall,
                "dense_heads": dh,
                "covered": torch.stack(aud).mean(0).tolist() if aud else None,
                "audited_calls": len(aud),
            })
        return out

    def summary(self, print_it: bool = True):
        """A rich Table, one row per layer (printed unless print_it=False); -> the Table."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title="sparseinfer: what the patched model kept")
        for c in ("layer", "calls", "sparse", "density mean", "heads min-max", "est. ms", "fallbacks",
                  "heads dense", "covered (audit)"):
            t.add_column(c, justify="left" if c in ("fallbacks", "heads dense") else "right")
        for r in self.layers():
            d = r["density"]
            cov = r["covered"]
            t.add_row(
                str(r["layer"]), str(r["calls"]), str(r["sparse_calls"]),
                f"{100 * sum(d) / len(d):.1f}%" if d else "-",
                f"{100 * min(d):.1f}-{100 * max(d):.1f}%" if d else "-",
                f"{r['estimate_ms']:.2f}" if r["estimate_ms"] is not None else "-",
                ", ".join(f"{k} x{v}" for k, v in r["fallbacks"].items()) or "-",
                ", ".join(f"h{k} x{v}" for k, v in sorted(r["dense_heads"].items())) or "-",
                f"{sum(cov) / len(cov):.3f} (min {min(cov):.3f}, {r['audited_calls']} calls)" if cov else "-",
            )
        if print_it:
            Console(width=160).print(t)
        return t

    def to_json(self, path: str | Path | None = None) -> str:
        """The per-layer dicts of `layers()` as JSON (written to `path` when given)."""
        text = json.dumps({"audit": self.audit, "seed": self.seed, "audit_queries": self.audit_queries,
                           "layers": self.layers()}, indent=1)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def heatmap(self, path: str | Path, title: str = "") -> Path:
        """PNG: kept density per layer x head, and (when audited) the covered mass."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        rows = self.layers()
        if not rows:
            raise ValueError("heatmap: nothing was recorded (was the model run inside the `record` block?)")
        n_layers = max(r["layer"] for r in rows) + 1
        hq = max((len(r["density"]) for r in rows if r["density"]), default=1)
        dens = np.full((n_layers, hq), np.nan)
        cov = np.full((n_layers, hq), np.nan)
        for r in rows:
            if r["density"]:
                dens[r["layer"]] = r["density"]
            if r["covered"]:
                cov[r["layer"]] = r["covered"]
        panels = [("kept density", dens, "viridis")] + ([("covered attention mass (audit)", cov, "magma")]
                                                        if not np.isnan(cov).all() else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(2.5 + 3.2 * len(panels), 1.8 + 0.17 * n_layers), squeeze=False)
        for ax, (name, grid, cmap) in zip(axes[0], panels):
            im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            mean = np.nanmean(grid) if not np.isnan(grid).all() else math.nan
            ax.set_title(f"{name}\nmean {mean:.3f} (blank: no sparse call)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.05)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


@contextlib.contextmanager
def record(model, audit: float = 0.0, seed: int = 0, audit_queries: int = 64):
    """Record what a patched model computes while the block is open; yields the Recorder."""
    from .integration import _ATTR, _attention_modules

    if not hasattr(model, "_sparseinfer_patch"):
        raise ValueError("record: expected a model patched with sparseinfer.patch, got an unpatched model")
    rec = Recorder(audit, seed, audit_queries)
    plans = [getattr(m, _ATTR) for m in _attention_modules(model) if hasattr(m, _ATTR)]
    for p in plans:
        p.recorder = rec
    try:
        yield rec
    finally:
        for p in plans:
            p.recorder = None
