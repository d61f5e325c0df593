"""Learned block gates (SeerAttention-style): which KV blocks each query block needs.

Per layer, for a sequence of N tokens cut into nb = ceil(N / block_size) blocks:

1. q [B, Hq, N, D] and k [B, Hkv, N, D] arrive post-RoPE (that is what transformers hands the
   attention function); the RoPE rotation is undone exactly with the model's own rotary
   module at positions 0..N-1 (a full pre-fill call always starts at position 0), giving the
   pre-RoPE q / k.
2. Each block is pooled (`pooling`: any of "avg", "max", "min", concatenated over the head
   dim) -> features [B, H, nb, P * D] with P poolings.
3. A linear projection per query head (q side) and per KV head (k side, GQA: a query head
   uses the k gate of its KV head) maps the features to `width` dims.
4. RoPE (theta: the model's rope_theta, `width` dims) is re-applied at each block's first
   token position, so the gate sees relative block positions.
5. Scores gq . gk / sqrt(width), causal at block level (key block <= query block), softmax
   over key blocks -> probabilities [B, Hq, nb, nb].

Only the projections are parameters (trained by `sparseinfer.gate_training`, the model frozen).
A gate file is safetensors: tensors "layers.{i}.q_proj" [Hq, P*D, width] and
"layers.{i}.k_proj" [Hkv, P*D, width] (float16 on disk), metadata "sparseinfer" = JSON with
schema_version, fingerprint (the model's architecture), block_size, pooling, width,
rope_theta, head_dim, model and training info.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from . import config as config_io

SCHEMA_VERSION = 1
POOLINGS = ("avg", "max", "min")
GATE_DIR = Path(__file__).parent / "gates"


class GateError(ValueError):
    """A gate file is missing, malformed or made for another model / shape."""


def check_pooling(pooling) -> tuple[str, ...]:
    """'avg,max,min' or a sequence of names -> tuple of names, or GateError."""
    names = tuple(p.strip() for p in pooling.split(",")) if isinstance(pooling, str) else tuple(pooling)
    if not names or any(p not in POOLINGS for p in names) or len(set(names)) != len(names):
        raise GateError(f"pooling: expected distinct names from {list(POOLINGS)}, got {pooling!r}")
    return names


def pool_blocks(x: torch.Tensor, block_size: int, pooling: tuple[str, ...]) -> torch.Tensor:
    """x [B, H, N, D] -> [B, H, nb, len(pooling) * D] float32: per block the avg / max / min
    over its tokens (the last block: over its valid tokens only). Sums accumulate in float32;
    max / min are exact in x's dtype."""
    b, h, n, d = x.shape
    nb = math.ceil(n / block_size)
    pad = nb * block_size - n
    out = []
    for p in pooling:
        if p == "avg":
            xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
            s = xp.reshape(b, h, nb, block_size, d).sum(3, dtype=torch.float32)
            counts = torch.full((nb, 1), float(block_size), device=x.device)
            counts[-1] = block_size - pad
            out.append(s / counts)
        else:
            fill = float("-inf") if p == "max" else float("inf")
            xp = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill) if pad else x
            xp = xp.reshape(b, h, nb, block_size, d)
            out.append((xp.amax(3) if p == "max" else xp.amin(3)).float())
    return torch.cat(out, -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo transformers' RoPE (x cos + rotate_half(x) sin, on the first cos.shape[-1] dims).

    x [B, H, N, D]; cos, sin [B or 1, N, R] (R <= D, as the model's rotary module returns them,
    possibly scaled by its attention_scaling s: then cos^2 + sin^2 = s^2) -> [B, H, N, D] in
    x's dtype when it is fp16 / bf16 (half the memory traffic on long inputs), else float32.
    """
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    r = cos.shape[-1]
    c, s = cos.float(), sin.float()
    norm = c * c + s * s
    c, s = (c / norm).to(dt)[:, None], (s / norm).to(dt)[:, None]
    xr = x[..., :r].to(dt)
    back = xr * c - _rotate_half(xr) * s
    return torch.cat([back, x[..., r:].to(dt)], -1) if r < x.shape[-1] else back


def block_rope(x: torch.Tensor, block_size: int, theta: float) -> torch.Tensor:
    """x [..., nb, W] (W even) -> RoPE applied at positions 0, block_size, 2 * block_size, ..."""
    nb, w = x.shape[-2:]
    inv = 1.0 / (theta ** (torch.arange(0, w, 2, device=x.device, dtype=torch.float32) / w))
    ang = torch.arange(nb, device=x.device, dtype=torch.float32)[:, None] * block_size * inv
    emb = torch.cat((ang, ang), -1)
    return x * emb.cos() + _rotate_half(x) * emb.sin()


def causal_blocks(nb: int, device=None) -> torch.Tensor:
    """bool [nb, nb]: key block j <= query block i."""
    r = torch.arange(nb, device=device)
    return r[None, :] <= r[:, None]


def _fused_pool():
    """sparseinfer.kernels.pool (Triton) or None when triton is missing."""
    try:
        from .kernels import pool
    except ImportError:
        return None
    return pool


class LayerGate(nn.Module):
    """One layer's gate. q_proj [Hq, F, W], k_proj [Hkv, F, W], F = len(pooling) * head_dim."""

    def __init__(self, n_q: int, n_kv: int, features: int, width: int, block_size: int, theta: float):
        super().__init__()
        if n_q % n_kv:
            raise GateError(f"gate: query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
        self.block_size, self.theta, self.width = block_size, float(theta), width
        self.q_proj = nn.Parameter(torch.randn(n_q, features, width) / math.sqrt(features))
        self.k_proj = nn.Parameter(torch.randn(n_kv, features, width) / math.sqrt(features))

    def logits(self, qf: torch.Tensor, kf: torch.Tensor) -> torch.Tensor:
        """qf [B, Hq, nb, F], kf [B, Hkv, nb, F] pooled pre-RoPE features -> [B, Hq, nb, nb]
        scores, -inf above the block diagonal (non-causal)."""
        nb = qf.shape[2]
        gq, gk = self.project(qf, kf)
        from .patterns.base import group_scores  # (patterns imports this module)

        s = group_scores(gq, gk) / math.sqrt(self.width)
        return s.masked_fill(~causal_blocks(nb, s.device), float("-inf"))

    def project(self, qf: torch.Tensor, kf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qf [B, Hq, nb, F], kf [B, Hkv, nb, F] -> the gate's query / key vectors gq [B, Hq, nb, W],
        gk [B, Hkv, nb, W] (float32, RoPE at each block's first position); scores = gq . gk / sqrt(W)."""
        gq = block_rope(torch.einsum("bhnf,hfw->bhnw", qf, self.q_proj.float()), self.block_size, self.theta)
        gk = block_rope(torch.einsum("bhnf,hfw->bhnw", kf, self.k_proj.float()), self.block_size, self.theta)
        return gq, gk

    def sliced(self, q: range, kv: range) -> "LayerGate":
        """This gate for query heads q and KV heads kv only (a tensor-parallel rank's heads;
        q must be the query heads of the KV heads kv)."""
        g = LayerGate(len(q), len(kv), self.q_proj.shape[1], self.width, self.block_size, self.theta)
        g.q_proj.data = self.q_proj.data[q.start:q.stop]
        g.k_proj.data = self.k_proj.data[kv.start:kv.stop]
        return g

    def forward(self, qf: torch.Tensor, kf: torch.Tensor) -> torch.Tensor:
        """-> log-probabilities over key blocks [B, Hq, nb, nb] (-inf where non-causal)."""
        return torch.log_softmax(self.logits(qf, kf), -1)


def _rope_theta(model_config) -> float:
    params = getattr(model_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(model_config, "rope_theta", 10000.0))


def _head_dim(model_config) -> int:
    return getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads


def fingerprint(model_config) -> dict:
    """Architecture facts a gate file must match: the minference config's plus head_dim."""
    return dict(config_io.fingerprint(model_config), head_dim=_head_dim(model_config))


class Gates(nn.Module):
    """The gates of every layer of one model, plus what they were made for (`meta`)."""

    def __init__(self, meta: dict):
        super().__init__()
        fp = meta["fingerprint"]
        self.meta = dict(meta)
        self.block_size = int(meta["block_size"])
        self.pooling = check_pooling(meta["pooling"])
        feats = len(self.pooling) * fp["head_dim"]
        self.layers = nn.ModuleList(
            LayerGate(fp["num_attention_heads"], fp["num_key_value_heads"], feats, int(meta["width"]),
                      self.block_size, float(meta["rope_theta"]))
            for _ in range(fp["num_hidden_layers"])
        )
        self.rotary = None  # the model's rotary module, set by `attach` (not saved)
        self._cos_sin = None  # (key, cos, sin) of the last length: every layer of a pre-fill reuses them

    @classmethod
    def new(cls, model_config, *, block_size: int = 64, pooling="avg,max,min", width: int = 12,
            model: str = "") -> "Gates":
        """Untrained gates for a transformers model config."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise GateError(f"block_size: expected a positive int, got {block_size!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
            raise GateError(f"width: expected a positive even int, got {width!r}")
        return cls({"schema_version": SCHEMA_VERSION, "model": model, "fingerprint": fingerprint(model_config),
                    "block_size": block_size, "pooling": ",".join(check_pooling(pooling)), "width": width,
                    "rope_theta": _rope_theta(model_config)})

    # --- model binding -------------------------------------------------------------------
    def check_matches(self, model_config, source: str = "gates") -> None:
        """GateError unless these gates were made for this architecture."""
        want, got = fingerprint(model_config), self.meta["fingerprint"]
        if want != got:
            diff = {k: (got.get(k), want.get(k)) for k in want if got.get(k) != want.get(k)}
            raise GateError(f"{source}: made for another model ({self.meta.get('model') or '?'}); "
                            f"differences (gate file, model): {diff}")

    def attach(self, model) -> "Gates":
        """Check the model's architecture and remember its rotary module (to undo RoPE)."""
        self.check_matches(model.config)
        rot = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
        if not rot:
            raise GateError(f"gates: found no rotary_emb module in {type(model).__name__}")
        self.rotary = rot[0]
        param = next(model.parameters(), None)
        return self.to(param.device) if param is not None else self

    # --- inference ------------------------------------------------------------------------
    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE q [B, Hq, N, D], k [B, Hkv, N, D] of a full pre-fill (positions 0..N-1)
        -> pooled pre-RoPE features qf [B, Hq, nb, F], kf [B, Hkv, nb, F] (float32)."""
        if self.rotary is None:
            raise GateError("gates: not attached to a model (call gates.attach(model) first)")
        cos, sin = self.cos_sin(q.shape[2], q.device)
        fused = _fused_pool() if q.is_cuda else None
        if fused is not None and fused.supported(q, cos, self.block_size):  # one pass over q / k
            return (fused.unrotate_pool(q, cos, sin, self.block_size, self.pooling),
                    fused.unrotate_pool(k, cos, sin, self.block_size, self.pooling))
        qf = pool_blocks(unrotate(q, cos, sin), self.block_size, self.pooling)
        kf = pool_blocks(unrotate(k, cos, sin), self.block_size, self.pooling)
        return qf, kf

    @torch.no_grad()
    def cos_sin(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos / sin [1, n, D] of positions 0..n-1 from the model's rotary module, kept for
        the next call of the same length (a pre-fill's layers share them: 0.37 ms per layer at 128K on
        an H100; 2 x n x D x 4 bytes held). The key includes the module's inv_freq buffer and its
        version, so a rotary that rescales itself (dynamic RoPE) is asked again."""
        def key():
            inv = getattr(self.rotary, "inv_freq", None)
            return None if not isinstance(inv, torch.Tensor) else (
                n, str(device), id(self.rotary), inv.data_ptr(), inv._version,
                getattr(self.rotary, "attention_scaling", None))

        k = key()
        if k is not None and self._cos_sin is not None and self._cos_sin[0] == k:
            return self._cos_sin[1], self._cos_sin[2]
        pos = torch.arange(n, device=device)[None]
        x = torch.zeros(1, 1, 1, 1, device=device)  # gives the rotary its dtype (float32) and device
        cos, sin = self.rotary(x, pos)
        k = key()  # the state the call left (a dynamic rotary may have updated itself for n)
        self._cos_sin = None if k is None else (k, cos, sin)
        return cos, sin

    @torch.no_grad()
    def probs(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """-> gate probabilities over key blocks [B, Hq, nb, nb] (0 where non-causal)."""
        qf, kf = self.features(q, k)
        return self.layers[layer](qf, kf).exp()

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(path), metadata={"sparseinfer": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Gates":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise GateError(f"gates: no such file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("sparseinfer", "null"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, GateError):
                raise
            raise GateError(f"gates {path}: not a readable safetensors gate file ({e})") from None
        if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
            got = meta.get("schema_version") if isinstance(meta, dict) else meta
            raise GateError(f"gates {path}: expected sparseinfer metadata with schema_version {SCHEMA_VERSION}, got {got!r}")
        missing = [k for k in ("fingerprint", "block_size", "pooling", "width", "rope_theta") if k not in meta]
        if missing:
            raise GateError(f"gates {path}: metadata lacks {missing}")
        gates = cls(meta)
        own = dict(gates.named_parameters())
        if set(own) != set(tensors):
            raise GateError(f"gates {path}: expected tensors {sorted(own)[:4]}... ({len(own)}), got {len(tensors)} "
                            f"named {sorted(tensors)[:4]}...")
        for name, p in own.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise GateError(f"gates {path}: {name} expected shape {tuple(p.shape)} (from the metadata), "
                                f"got {tuple(tensors[name].shape)}")
            p.data.copy_(tensors[name].float())
        return gates.requires_grad_(False)


def shipped_for(model_config) -> Path:
    """The gate file shipped in the package for this architecture, or GateError."""
    from safetensors import safe_open

    fp = fingerprint(model_config)
    for path in sorted(GATE_DIR.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("sparseinfer", "{}"))
        if meta.get("fingerprint") == fp:
            return path
    raise GateError(f"no shipped gates match this model ({fp}); train some with "
                    f"`sparseinfer train-gate --model M --out gates.safetensors` and pass gates='gates.safetensors'")


def resolve(gates, model) -> Gates:
    """gates: a Gates object, a path, or None (the shipped gates for this model) -> attached Gates."""
    if gates is None:
        gates = shipped_for(model.config)
    if not isinstance(gates, Gates):
        gates = Gates.load(gates)
    source = gates.meta.get("model") or "gates"
    gates.check_matches(model.config, f"gates ({source})")
    return gates.attach(model)
