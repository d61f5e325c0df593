"""Synthetic video-structured q/k/v for MMInference tests and benchmarks (no model weights).

Layout: a text prefix, then video frames of ``frame`` tokens with a text segment of
``text_len`` tokens after every ``text_every`` frames, then a text suffix (the question).
Modality ids follow transformers' ``mm_token_type_ids``: 0 text, 2 video.

Attention structure planted per KV head h (q and k share a direction per structure):
  * grid: keys j = phase_h (mod stride_h) inside the video get a direction that every video
    query matches (vertical lines); video queries i = phase_h (mod stride_h) are scaled down
    to attend nearly uniformly (horizontal lines: dense rows);
  * an attention sink at key 0; a local band from a smooth positional component;
  * text queries attend a few text keys (text verticals) and the local band.
"""
from __future__ import annotations

import math

import torch


def layout(n: int, frame: int, text_every: int = 4, text_len: int = 64, prefix: int = 64, suffix: int = 64):
    """modality [N] int64: text prefix, frames with text segments, text suffix (truncated to n)."""
    mod = torch.zeros(n, dtype=torch.int64)
    i, f = prefix, 0
    while i < n - suffix:
        e = min(i + frame, n - suffix)
        mod[i:e] = 2
        i, f = e, f + 1
        if text_every and f % text_every == 0:
            i += text_len
    return mod


def video_qkv(b: int, hq: int, hkv: int, n: int, d: int, frame: int, *, strides=None, phases=None,
              text_every: int = 4, text_len: int = 64, grid: float = 3.0, local: float = 1.0, seed: int = 0,
              device="cpu", dtype=torch.float32):
    """-> (q [B, Hq, N, D], k, v [B, Hkv, N, D], modality [B, N], strides [Hkv], phases [Hkv]).

    strides: grid period per KV head (default ``frame``); phases: per KV head (default random)."""
    g = torch.Generator().manual_seed(seed)
    strides = torch.tensor([frame] * hkv if strides is None else list(strides))
    if phases is None:
        phases = torch.stack([torch.randint(0, int(s), (1,), generator=g)[0] for s in strides])
    phases = torch.as_tensor(phases)
    dev = torch.device(device)
    gd = torch.Generator(device=dev).manual_seed(seed)  # the big tensors are drawn on the device
    mod = layout(n, frame, text_every, text_len).to(dev)
    video = mod == 2
    q = torch.randn(b, hq, n, d, generator=gd, device=dev) * 0.5
    k = torch.randn(b, hkv, n, d, generator=gd, device=dev) * 0.5
    v = torch.randn(b, hkv, n, d, generator=gd, device=dev)
    pos = torch.arange(n, device=dev)
    # smooth positional component (local band): random Fourier features of the position
    freqs = (torch.exp(-torch.rand(d // 2, generator=g) * math.log(2048.0)) * 2 * math.pi / 8).to(dev)
    ang = pos[:, None].float() * freqs[None, :]
    pe = torch.cat([ang.cos(), ang.sin()], -1) * local
    q += pe
    k += pe
    gsz = hq // hkv
    for h in range(hkv):
        u = torch.randn(d, generator=g).to(dev)
        u = u / u.norm()
        s, p = int(strides[h]), int(phases[h])
        line = video & (pos % s == p)
        k[:, h, line] += grid * u * math.sqrt(d) ** 0.5
        qs = slice(h * gsz, (h + 1) * gsz)
        q[:, qs, video] += grid * u * math.sqrt(d) ** 0.5
        q[:, qs, line] *= 0.05  # horizontal lines: near-uniform rows
        # sink at key 0
        w = torch.randn(d, generator=g).to(dev)
        w = w / w.norm()
        k[:, h, 0] += 4.0 * w * math.sqrt(d) ** 0.5
        q[:, qs] += 1.0 * w * math.sqrt(d) ** 0.5
        # text verticals: a few text keys that text queries attend
        tpos = pos[~video]
        hot = tpos[torch.randperm(len(tpos), generator=g)[:4].to(dev)]
        z = torch.randn(d, generator=g).to(dev)
        z = z / z.norm()
        k[:, h, hot] += 3.0 * z * math.sqrt(d) ** 0.5
        q[:, qs, ~video] += 3.0 * z * math.sqrt(d) ** 0.5
    return (q.to(dtype), k.to(dtype), v.to(dtype), mod.expand(b, n).contiguous(), strides, phases)
