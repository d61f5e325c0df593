"""Per-model, per-head pattern configs (MInference-style): the one place they are read and written.

A config is a JSON document:

    {
      "schema_version": 1,
      "model": "smollm2-135m",                 # what it was searched on
      "fingerprint": {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                      "num_key_value_heads": 3, "hidden_size": 576, "vocab_size": 49152},
      "search": {...},                         # how it was found (length, target density, time)
      "layers": [                              # one list per layer, one entry per query head
        [{"pattern": "vertical_slash", "vertical": 0.02, "slash": 0.06, "recall": 0.93}, ...],
        ...
      ]
    }

Head entries by pattern (budgets: int = tokens, float = fraction of the sequence length N):
  "ashape": sink, window;  "vertical_slash": vertical, slash;
  "block_sparse": topk (int blocks, or float share of the blocks), block_size.
"recall" (share of the dense softmax mass kept on the calibration input) is informational.

MMInference configs (vision-language models) add ``"kind": "mminference"``; their head entries
are ``{"boundary": "none" | "k" | "q" | "2d", "intra": {"all" | "text" | "image" | "video":
{"pattern": "ashape" | "vertical_slash" | "grid", <budgets>}}}`` (see `sparseinfer.patterns.mm`);
"fingerprint" then describes the language model (the VLM's text_config). Configs without
"kind" are MInference configs as above.
"""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA_VERSION = 1
CONFIG_DIR = Path(__file__).parent / "configs"
HEAD_KEYS = {
    "ashape": ("sink", "window"),
    "vertical_slash": ("vertical", "slash"),
    "block_sparse": ("topk", "block_size"),
}
_FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "hidden_size", "vocab_size")


class ConfigError(ValueError):
    """A per-head config is missing, malformed or made for another model."""


def fingerprint(model_config) -> dict:
    """The architecture facts a config must match (from a transformers PretrainedConfig)."""
    return {key: getattr(model_config, key, None) for key in _FINGERPRINT_KEYS}


def validate(cfg: dict, source: str = "config") -> dict:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{source}: expected schema_version {SCHEMA_VERSION}, got {cfg.get('schema_version')!r}")
    layers = cfg.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{source}: expected 'layers', a non-empty list of per-head lists")
    if cfg.get("kind", "minference") not in ("minference", "mminference"):
        raise ConfigError(f"{source}: expected kind 'minference' or 'mminference', got {cfg.get('kind')!r}")
    if cfg.get("kind") == "mminference":
        from .patterns.mm import check_head

        for li, heads in enumerate(layers):
            if not isinstance(heads, list) or not heads:
                raise ConfigError(f"{source}: layer {li}: expected a non-empty list of heads")
            for hi, head in enumerate(heads):
                try:
                    check_head(head, f"layer {li} head {hi}")
                except ValueError as e:
                    raise ConfigError(f"{source}: {e}") from None
        return cfg
    for li, heads in enumerate(layers):
        if not isinstance(heads, list) or not heads:
            raise ConfigError(f"{source}: layer {li}: expected a non-empty list of heads")
        for hi, head in enumerate(heads):
            pat = head.get("pattern") if isinstance(head, dict) else None
            if pat not in HEAD_KEYS:
                raise ConfigError(f"{source}: layer {li} head {hi}: expected pattern in {list(HEAD_KEYS)}, got {pat!r}")
            missing = [k for k in HEAD_KEYS[pat] if k not in head]
            if missing:
                raise ConfigError(f"{source}: layer {li} head {hi}: pattern {pat!r} needs {missing}")
    return cfg


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path}: not valid JSON ({e})") from None
    return validate(cfg, str(path))


def save(cfg: dict, path: str | Path) -> Path:
    validate(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def check_matches(cfg: dict, model_config, source: str = "config") -> None:
    """Raise ConfigError unless the config has one entry per layer and per query head."""
    layers = cfg["layers"]
    n_layers, n_heads = model_config.num_hidden_layers, model_config.num_attention_heads
    if len(layers) != n_layers or any(len(h) != n_heads for h in layers):
        raise ConfigError(
            f"{source}: made for {len(layers)} layers x {len(layers[0])} heads "
            f"({cfg.get('model', '?')}), but the model has {n_layers} layers x {n_heads} heads"
        )


def shipped_for(model_config) -> Path:
    """The config shipped in the package for this architecture, or ConfigError."""
    fp = fingerprint(model_config)
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        if cfg.get("fingerprint") == fp:
            return path
    raise ConfigError(
        f"no shipped minference config matches this model ({fp}); search one with "
        f"`sparseinfer search --model M --out config.json` and pass config='config.json'"
    )
