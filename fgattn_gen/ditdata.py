"""DiT-like attention inputs: q/k/v with the structure of video diffusion transformer attention, seeded.

Tokens are a (frames, height, width) latent grid, frame-major, plus text tokens (after the video as in
HunyuanVideo, or before it as in CogVideoX). Every head sees the same hidden state, a smooth random field
over the grid (neighbouring tokens have similar content) with random text features, through its own
projections; q and k then get a 3D rotary position embedding (head dim split into t / y / x sections,
HunyuanVideo style; text tokens are not rotated). A head's kind sets a position "carrier" vector added to
its q and k before the rotation: after it, q_i . k_j holds sum_p w_p cos(theta_p (pos_i - pos_j)), a peak at
zero offset along the axes whose frequencies carry the weight w:

- ``local``: all three axes, sharp: a 3D neighbourhood;
- ``spatial``: sharp in time, broad in space: the query's own frame;
- ``temporal``: sharp in space, broad in time: the same (y, x) in every frame;
- ``sink``: weak position, plus a shared direction added (after the rotation) to every query and to the
  text keys: heavy attention on the text tokens, diffuse elsewhere.

Shapes: ``SHAPES`` has the real HunyuanVideo (24 heads, D=128) and CogVideoX-5B (48 heads, D=64) grids, GPU
benchmark shapes of 8-33K tokens, and small CPU shapes. Generation runs on ``device`` with a generator of
that device seeded by ``seed`` (the same seed gives the same tensors on the same device type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("local", "spatial", "temporal", "sink")
DEFAULT_KIND_CYCLE = ("local", "local", "spatial", "temporal", "local", "sink")
_CONTENT_CHANNELS = 64
# Logit scales (after the softmax scale 1/sqrt(D)), chosen so that 90 % of a local head's mass sits on a few
# percent of the keys and 99 % on 15-50 %, as reported for video DiTs:
_PEAK_LOGIT = (8.0, 14.0)  # positional logit at zero offset, uniform per head in this range
_CONTENT_GAIN = 0.4  # hidden-state (content) similarity term
_QK_NOISE = 0.7  # per-token noise on q and k (queries of a block are not identical)
_SINK_LOGIT = 6.0  # sink heads: extra logit of every query on the text keys
_V_NOISE = 0.5


@dataclass(frozen=True)
class DitShape:
    """One attention call of a video DiT: ``frames x height x width`` video tokens plus ``text_tokens``."""

    name: str
    frames: int
    height: int
    width: int
    text_tokens: int
    heads: int
    head_dim: int
    text_first: bool = False

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def text_range(self) -> tuple[int, int]:
        """Token range ``[start, end)`` of the text tokens (empty when there are none)."""
        return (0, self.text_tokens) if self.text_first else (self.video_tokens, self.seq)

    @property
    def rope_sections(self) -> tuple[int, int, int]:
        """Head-dim split into t / y / x rotary sections (HunyuanVideo: 16 / 56 / 56 at D = 128)."""
        t = 16
        y = (self.head_dim - t) // 2
        return t, y, self.head_dim - t - y


SHAPES = {s.name: s for s in (
    DitShape("hunyuan-720p", 33, 45, 80, 256, 24, 128),  # HunyuanVideo 720p 129 frames
    DitShape("cogvideox-5b", 13, 30, 45, 226, 48, 64, text_first=True),  # CogVideoX-5B 720x480 49 frames
    DitShape("hunyuan-14k", 9, 30, 52, 256, 24, 128),  # accuracy benchmark (GPU): 14,296 tokens
    DitShape("cogvideox-10k", 7, 30, 45, 226, 48, 64, text_first=True),  # accuracy benchmark (GPU): 9,676
    DitShape("hunyuan-32k", 21, 30, 52, 0, 24, 128),  # timing benchmark: S = 32,760
    DitShape("hunyuan-cpu", 4, 8, 12, 32, 4, 128),  # CPU / interpreter: 416 tokens
    DitShape("cogvideox-cpu", 3, 8, 10, 16, 4, 64, text_first=True),  # CPU / interpreter: 256 tokens
)}


@dataclass(frozen=True)
class DitAttention:
    """q, k, v ``[B, H, S, D]`` of one DiT attention call and what generated them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: DitShape
    kinds: tuple[str, ...]  # kind of each head


def _rope_angles(shape: DitShape, device) -> torch.Tensor:
    """fp32 ``[S, D/2]``: rotation angle of each (token, dim pair); zero for text tokens."""
    f, hh, ww = shape.frames, shape.height, shape.width
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(hh), torch.arange(ww), indexing="ij"), -1)
    pos = grid.reshape(-1, 3).float().to(device)  # [video, 3]: (t, y, x)
    freqs = []
    for axis, dim in enumerate(shape.rope_sections):
        theta = 256.0 ** (-torch.arange(0, dim, 2, device=device).float() / dim)
        freqs.append(pos[:, axis:axis + 1] * theta[None, :])
    video = torch.cat(freqs, -1)
    text = torch.zeros(shape.text_tokens, video.shape[1], device=device)
    return torch.cat([text, video] if shape.text_first else [video, text], 0)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x ``[..., S, D]`` (interleaved pairs) by angles ``[S, D/2]``."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def _content(shape: DitShape, batch: int, gen: torch.Generator, device) -> torch.Tensor:
    """fp32 ``[B, S, C]`` unit-variance hidden state: a smooth field over the grid, random text features."""
    f, hh, ww = shape.frames, shape.height, shape.width
    coarse = torch.randn(batch, _CONTENT_CHANNELS, max(2, f // 3), max(2, hh // 6), max(2, ww // 6),
                         generator=gen, device=device)
    field = torch.nn.functional.interpolate(coarse, size=(f, hh, ww), mode="trilinear", align_corners=True)
    field = field / field.std(dim=(2, 3, 4), keepdim=True)
    field = field + 0.3 * torch.randn(field.shape, generator=gen, device=device)
    video = field.flatten(2).transpose(1, 2) / math.sqrt(1.09)
    text = torch.randn(batch, shape.text_tokens, _CONTENT_CHANNELS, generator=gen, device=device)
    return torch.cat([text, video] if shape.text_first else [video, text], 1)


def _carrier(shape: DitShape, kind: str, gen: torch.Generator, device) -> torch.Tensor:
    """fp32 ``[D]`` position carrier of one head: per rotary pair weight w_p (sum 1), random phase."""
    gains = {"local": (1.0, 1.0, 1.0), "spatial": (3.0, 0.3, 0.3), "temporal": (0.1, 1.0, 1.0),
             "sink": (0.3, 0.3, 0.3)}[kind]
    sharp = {"local": (1.0, 1.0, 1.0), "spatial": (2.0, -0.5, -0.5), "temporal": (-1.0, 1.0, 1.0),
             "sink": (-1.0, -1.0, -1.0)}[kind]
    weights = []
    for dim, gain, gamma in zip(shape.rope_sections, gains, sharp):
        theta = 256.0 ** (-torch.arange(0, dim, 2, device=device).float() / dim)
        jitter = 0.5 + torch.rand(theta.shape, generator=gen, device=device)
        w = theta ** (gamma + 0.5 * torch.rand((), generator=gen, device=device)) * jitter
        weights.append(gain * w / w.sum())
    w = torch.cat(weights)
    w = w / w.sum()
    phase = 2 * math.pi * torch.rand(w.shape, generator=gen, device=device)
    return torch.stack([w.sqrt() * phase.cos(), w.sqrt() * phase.sin()], -1).flatten()


def dit_qkv(shape: DitShape | str, *, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
            device: torch.device | str = "cpu", kinds: tuple[str, ...] | None = None) -> DitAttention:
    """Generate one DiT-like attention call (see the module docstring).

    Args:
        shape: a ``DitShape`` or a name in ``SHAPES``.
        batch: batch size (samples get independent content, the same head structure).
        seed: seed of the generator on ``device``.
        dtype: dtype of q/k/v.
        kinds: kind of each head (``KINDS``), default ``DEFAULT_KIND_CYCLE`` repeated over the heads.
    Returns:
        ``DitAttention`` with q, k, v ``[batch, heads, seq, head_dim]`` in ``dtype`` on ``device``.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"shape: unknown DiT shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if kinds is None:
        kinds = tuple(DEFAULT_KIND_CYCLE[i % len(DEFAULT_KIND_CYCLE)] for i in range(shape.heads))
    if len(kinds) != shape.heads or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"kinds: expected {shape.heads} head kinds from {KINDS}, got {kinds!r}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    d, c, seq = shape.head_dim, _CONTENT_CHANNELS, shape.seq
    content = _content(shape, batch, gen, device)
    angles = _rope_angles(shape, device)
    text = torch.zeros(seq, dtype=torch.bool, device=device)
    text[slice(*shape.text_range)] = True
    out = {name: torch.empty(batch, shape.heads, seq, d, dtype=dtype, device=device) for name in "qkv"}
    for h, kind in enumerate(kinds):
        proj_q = torch.randn(c, d, generator=gen, device=device) / math.sqrt(c)
        proj_k = proj_q + 0.5 * torch.randn(c, d, generator=gen, device=device) / math.sqrt(c)
        proj_v = torch.randn(c, d, generator=gen, device=device) / math.sqrt(c)
        low, high = _PEAK_LOGIT
        peak = low + (high - low) * float(torch.rand((), generator=gen, device=device))
        position = math.sqrt(peak * math.sqrt(d)) * _carrier(shape, kind, gen, device)
        content_gain = _CONTENT_GAIN * (c / d) ** 0.25
        q = position + content_gain * content @ proj_q + _QK_NOISE * torch.randn(batch, seq, d, generator=gen,
                                                                                   device=device)
        k = position + content_gain * content @ proj_k + _QK_NOISE * torch.randn(batch, seq, d, generator=gen,
                                                                                   device=device)
        q, k = _rotate(q, angles), _rotate(k, angles)
        if kind == "sink":
            direction = torch.randn(d, generator=gen, device=device)
            direction = direction / direction.norm() * (_SINK_LOGIT * math.sqrt(d)) ** 0.5
            q = q + direction
            k = k + direction * text[:, None]
        out["q"][:, h], out["k"][:, h] = q.to(dtype), k.to(dtype)
        noise = _V_NOISE * torch.randn(batch, seq, d, generator=gen, device=device)
        out["v"][:, h] = (content @ proj_v + noise).to(dtype)
    return DitAttention(out["q"], out["k"], out["v"], shape, tuple(kinds))
