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

Two more kinds (``EXTRA_KINDS``; ``ALL_KINDS`` = both tuples) serve the harder families below:

- ``semantic``: content-dominated. Weak position carrier (peak logit 2-3.5), plus a content term added after
  the rotation (so RoPE does not scramble it): q and k are the unit-normalised projections of the hidden
  state through nearly the same matrix, scaled to a peak logit of 8-14, so ``q_i . k_j`` follows the cosine
  similarity of the two tokens' content wherever they are: attention stays inside the query's content
  cluster.
- ``window``: a ``local`` head with a 1.6x sharper peak: a tight 3D neighbourhood of a few tokens.

Families (``FAMILIES``, the ``family`` argument) choose the hidden state and the default head kinds. Only
``smooth`` is what earlier versions generated; the others hold structure on which a predictor that scores a
128-query block by its mean query (``pooled_top_p``) can fail while the exact per-block mask does not:

- ``smooth`` (default, bit-identical to earlier versions): the smooth random field above; kinds
  ``DEFAULT_KIND_CYCLE``. Neighbouring queries want neighbouring keys, so a block's mean query stands for
  its rows.
- ``scattered``: the hidden state is one of ``_SCATTER_CLUSTERS`` discrete content clusters per video token
  (centroid + token noise), drawn token by token at random with Zipf-like frequencies (Sparse VideoGen 2
  observes semantically similar tokens scattered in raster order in real DiTs): every 128-query block mixes
  a few frequent clusters with many rare ones. Kinds ``FAMILY_KINDS["scattered"]`` (semantic, local, window,
  spatial, sink). The mean query of a block is dominated by its frequent clusters: the keys of the rare
  clusters' queries get little pooled probability and are dropped, and those rows lose most of their mass.
- ``regions``: spatially coherent clusters: Voronoi regions around random seeds in (t, y, x) (stretched in
  time: regions persist over frames, as objects do), each region one of fewer content clusters (distant
  regions share semantics). Region borders run across the grid, so they cross query-block boundaries and a
  block (several latent rows of a narrow grid) holds parts of several regions of unequal size. Kinds
  semantic, window, temporal, local, sink. Minority regions of a block are lost by the mean query as above.
- ``content``: content-dominated heads (mostly ``semantic``) over a hidden state of ``_MATERIALS`` random
  "materials" blended by smooth random fields (soft blobs a few tokens wide; every material recurs in many
  blobs all over the video, labels = the dominant material) plus token-level detail. A query attends to the
  tokens of its material wherever they are, with weak position. A block crosses several blobs and their
  soft borders; its mean query is a blend that scores best the keys of mixed tokens near the borders, not
  the pure-material keys each row wants.
- ``mixed-sharpness``: every kind, each head's logits multiplied by its own temperature factor (log-evenly
  spaced over ``_SHARPNESS_RANGE``, shuffled over the heads): very peaked heads (a few keys per query, which
  differ between a block's rows) next to flat ones (most keys needed). One pooled rule/threshold fits the
  heads unevenly.

Every non-smooth family also adds to each head's queries a shared offset (``_QUERY_OFFSET`` times the rms
query norm) along a direction every key of the head is made orthogonal to: real DiT queries and keys carry
large shared components. It leaves every ``q . k`` unchanged, so the attention is the same, but the queries
of a block then look alike to a cosine-similarity gate (``pooled_top_p``'s ``sim_threshold``), which stops
sending their blocks dense: the pooled prediction is used, silently.

In every family the 128-token query blocks of the small CPU study shapes (``study-cpu``: width 32,
``narrow-cpu``: width 20) span 4-6 latent rows, so a local or window head's rows in one block want
different neighbourhoods (at HunyuanVideo's width 80 a block spans 1.6 rows).

Trajectories (``trajectory``): the same scene over the steps of a denoising run, its video tokens' hidden state
settling from noise (fast early, slowly late, each head at its own speed) onto ``dit_qkv``'s, for predictors
that reuse masks across steps (``CachedMask``).

Shapes: ``SHAPES`` has the real HunyuanVideo 720p, Wan2.1-14B 720p and CogVideoX-5B shapes, read from the model
presets (``preset_shape``: any preset shape with a grid), GPU benchmark shapes of 8-33K tokens, and small CPU shapes (``study-cpu``: 2,317 tokens, 6 heads, D=64, a length
no power-of-two block divides). Generation runs on ``device`` with a generator of that device seeded by
``seed`` (the same seed gives the same tensors on the same device type).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .models import load_model

KINDS = ("local", "spatial", "temporal", "sink")
EXTRA_KINDS = ("semantic", "window")  # the content-dominated and tight-window kinds of the harder families
ALL_KINDS = KINDS + EXTRA_KINDS
DEFAULT_KIND_CYCLE = ("local", "local", "spatial", "temporal", "local", "sink")
FAMILIES = ("smooth", "scattered", "regions", "content", "mixed-sharpness")
# Default head kinds of each family, repeated over the heads.
FAMILY_KINDS = {
    "smooth": DEFAULT_KIND_CYCLE,
    "scattered": ("semantic", "local", "semantic", "window", "spatial", "sink"),
    "regions": ("semantic", "window", "semantic", "temporal", "local", "sink"),
    "content": ("semantic", "semantic", "local", "semantic", "semantic", "sink"),
    "mixed-sharpness": ("local", "window", "spatial", "semantic", "temporal", "sink"),
}
_CONTENT_CHANNELS = 64
# Logit scales (after the softmax scale 1/sqrt(D)), chosen so that 90 % of a local head's mass sits on a few
# percent of the keys and 99 % on 15-50 %, as reported for video DiTs:
_PEAK_LOGIT = (8.0, 14.0)  # positional logit at zero offset, uniform per head in this range
_CONTENT_GAIN = 0.4  # hidden-state (content) similarity term
_QK_NOISE = 0.7  # per-token noise on q and k (queries of a block are not identical)
_SINK_LOGIT = 6.0  # sink heads: extra logit of every query on the text keys
_V_NOISE = 0.5
# Harder families (module docstring):
_SEMANTIC_POSITION_LOGIT = (2.0, 3.5)  # semantic heads: weak positional peak
_SEMANTIC_PROJ_NOISE = 0.3  # semantic heads: k's projection = q's + this much of an independent one
_WINDOW_SHARPNESS = 1.6  # window heads: peak logit of a local head times this
_SCATTER_CLUSTERS = 32  # scattered: content clusters, drawn per token with weight 1 / (rank + 1)
_CLUSTER_NOISE = 0.5  # scattered / regions: token noise around the cluster centroid (centroid std 1)
_REGION_TOKENS = 48  # regions: video tokens per Voronoi region (on average)
_REGION_TIME_STRETCH = 4.0  # regions: a frame step counts as 1/4 of a latent pixel step in the distance
_REGION_CLUSTER_SHARE = 2  # regions: this many regions per content cluster on average
_MATERIALS = 16  # content: materials blended over the grid
_MATERIAL_CONTRAST = 4.0  # content: softmax gain of the smooth material fields (higher: purer blobs)
_CONTENT_DETAIL = 0.5  # content: std of the i.i.d. token detail added to the (unit std) material blend
_SHARPNESS_RANGE = (0.25, 4.0)  # mixed-sharpness: per-head logit factors, log-evenly spaced
_QUERY_OFFSET = 2.0  # non-smooth families: shared query offset, in units of the head's rms query norm


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


def preset_shape(model: str, shape: str, name: str | None = None) -> DitShape:
    """The ``DitShape`` of shape ``shape`` of model preset ``model`` (``fgattn_gen/presets``): its grid, text
    tokens and placement, heads and head dim; named ``name`` (default ``"<model>-<shape>"``)."""
    spec = load_model(model)
    found = {s.name: s for s in spec.shapes}
    if shape not in found:
        raise ValueError(f"shape: preset {model!r} has no shape {shape!r}; it has {sorted(found)}")
    attention_shape = found[shape]
    if attention_shape.grid is None:
        raise ValueError(f"shape: preset {model!r} shape {shape!r} has no grid (frames x height x width)")
    return DitShape(name or f"{model}-{shape}", *attention_shape.grid, attention_shape.text_tokens, spec.heads,
                    spec.head_dim, text_first=spec.text_first)


SHAPES = {s.name: s for s in (
    preset_shape("hunyuan", "720p-129f", "hunyuan-720p"),  # HunyuanVideo 720p 129 frames
    preset_shape("wan-14b", "720p-81f", "wan14b-720p"),  # Wan2.1-14B 720p 81 frames
    preset_shape("cogvideox-5b", "480p-49f", "cogvideox-5b"),  # CogVideoX-5B 720x480 49 frames
    DitShape("hunyuan-14k", 9, 30, 52, 256, 24, 128),  # accuracy benchmark (GPU): 14,296 tokens
    DitShape("cogvideox-10k", 7, 30, 45, 226, 48, 64, text_first=True),  # accuracy benchmark (GPU): 9,676
    DitShape("hunyuan-32k", 21, 30, 52, 0, 24, 128),  # timing benchmark: S = 32,760
    DitShape("hunyuan-cpu", 4, 8, 12, 32, 4, 128),  # CPU / interpreter: 416 tokens
    DitShape("cogvideox-cpu", 3, 8, 10, 16, 4, 64, text_first=True),  # CPU / interpreter: 256 tokens
    DitShape("study-cpu", 4, 18, 32, 13, 6, 64),  # CPU predictor study: 2,317 tokens, 128 rows = 4 grid rows
    DitShape("narrow-cpu", 3, 12, 20, 7, 4, 64),  # CPU tests of the families: 727 tokens, 128 rows = 6.4 grid rows
)}


@dataclass(frozen=True)
class DitAttention:
    """q, k, v ``[B, H, S, D]`` of one DiT attention call and what generated them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: DitShape
    kinds: tuple[str, ...]  # kind of each head
    family: str = "smooth"  # FAMILIES
    labels: torch.Tensor | None = None  # int64 [B, S] content cluster of each token (not smooth /
    # mixed-sharpness; text tokens -1)
    sharpness: tuple[float, ...] | None = None  # per-head logit factor (mixed-sharpness)


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


def _video_grid(shape: DitShape, device) -> torch.Tensor:
    """fp32 ``[video, 3]``: the (t, y, x) position of each video token, frame-major."""
    f, hh, ww = shape.frames, shape.height, shape.width
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(hh), torch.arange(ww), indexing="ij"), -1)
    return grid.reshape(-1, 3).float().to(device)


def _with_text(shape: DitShape, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return torch.cat([text, video] if shape.text_first else [video, text], 1)


def _scattered_labels(shape: DitShape, batch: int, gen: torch.Generator, device) -> tuple[torch.Tensor, int]:
    """int64 ``[B, video]``: a cluster per token, i.i.d. with probability proportional to 1 / (rank + 1); and
    the number of clusters."""
    weights = 1.0 / torch.arange(1, _SCATTER_CLUSTERS + 1, device=device, dtype=torch.float32)
    weights = weights.expand(batch, -1).contiguous()
    return torch.multinomial(weights, shape.video_tokens, replacement=True, generator=gen), _SCATTER_CLUSTERS


def _region_labels(shape: DitShape, batch: int, gen: torch.Generator, device) -> tuple[torch.Tensor, int]:
    """int64 ``[B, video]``: the content cluster of each token's Voronoi region (nearest seed in (t, y, x),
    time distances divided by ``_REGION_TIME_STRETCH``); and the number of clusters."""
    n_regions = max(4, shape.video_tokens // _REGION_TOKENS)
    n_clusters = max(2, n_regions // _REGION_CLUSTER_SHARE)
    extent = torch.tensor([shape.frames / _REGION_TIME_STRETCH, shape.height, shape.width], device=device)
    seeds = torch.rand(batch, n_regions, 3, generator=gen, device=device) * extent
    region_cluster = torch.randint(0, n_clusters, (batch, n_regions), generator=gen, device=device)
    points = _video_grid(shape, device) / torch.tensor([_REGION_TIME_STRETCH, 1.0, 1.0], device=device)
    labels = torch.empty(batch, shape.video_tokens, dtype=torch.int64, device=device)
    for b in range(batch):
        for start in range(0, shape.video_tokens, 8192):  # bounded [tokens, regions] distance matrix
            nearest = torch.cdist(points[start:start + 8192], seeds[b]).argmin(-1)
            labels[b, start:start + 8192] = region_cluster[b, nearest]
    return labels, n_clusters


def _cluster_content(shape: DitShape, labels: torch.Tensor, n_clusters: int, gen: torch.Generator,
                     device) -> torch.Tensor:
    """fp32 ``[B, S, C]`` unit-variance hidden state: each video token its cluster's random centroid plus
    ``_CLUSTER_NOISE`` token noise; random text features."""
    batch = labels.shape[0]
    centroids = torch.randn(batch, n_clusters, _CONTENT_CHANNELS, generator=gen, device=device)
    video = torch.gather(centroids, 1, labels[..., None].expand(-1, -1, _CONTENT_CHANNELS))
    video = video + _CLUSTER_NOISE * torch.randn(video.shape, generator=gen, device=device)
    video = video / math.sqrt(1 + _CLUSTER_NOISE ** 2)
    text = torch.randn(batch, shape.text_tokens, _CONTENT_CHANNELS, generator=gen, device=device)
    return _with_text(shape, video, text)


def _material_content(shape: DitShape, batch: int, gen: torch.Generator, device):
    """fp32 ``[B, S, C]`` hidden state of the ``content`` family and int64 ``[B, S]`` labels (dominant
    material; text -1): at each video token a softmax blend of ``_MATERIALS`` random material vectors, weighted
    by smooth random fields (blobs a few tokens wide; each material recurs in many blobs over the video),
    plus ``_CONTENT_DETAIL`` token detail."""
    f, hh, ww = shape.frames, shape.height, shape.width
    coarse = torch.randn(batch, _MATERIALS, max(2, f // 2), max(2, hh // 4), max(2, ww // 4), generator=gen,
                         device=device)
    fields = torch.nn.functional.interpolate(coarse, size=(f, hh, ww), mode="trilinear", align_corners=True)
    fields = fields / fields.std(dim=(2, 3, 4), keepdim=True)
    weights = torch.softmax(_MATERIAL_CONTRAST * fields.flatten(2).transpose(1, 2), -1)  # [B, video, M]
    materials = torch.randn(batch, _MATERIALS, _CONTENT_CHANNELS, generator=gen, device=device)
    video = weights @ materials
    video = video / video.std(dim=(1, 2), keepdim=True)
    video = (video + _CONTENT_DETAIL * torch.randn(video.shape, generator=gen, device=device))
    video = video / math.sqrt(1 + _CONTENT_DETAIL ** 2)
    text = torch.randn(batch, shape.text_tokens, _CONTENT_CHANNELS, generator=gen, device=device)
    labels = torch.full((batch, shape.text_tokens), -1, dtype=torch.int64, device=device)
    return _with_text(shape, video, text), _with_text(shape, weights.argmax(-1), labels)


def _family_content(shape: DitShape, family: str, batch: int, gen: torch.Generator, device):
    """Hidden state ``[B, S, C]`` and token cluster labels ``[B, S]`` (or None) of a family."""
    if family == "smooth" or family == "mixed-sharpness":
        return _content(shape, batch, gen, device), None
    if family == "content":
        return _material_content(shape, batch, gen, device)
    labels, n_clusters = (_scattered_labels if family == "scattered" else _region_labels)(shape, batch, gen, device)
    content = _cluster_content(shape, labels, n_clusters, gen, device)
    text = torch.full((batch, shape.text_tokens), -1, dtype=torch.int64, device=device)
    return content, _with_text(shape, labels, text)


def _carrier(shape: DitShape, kind: str, gen: torch.Generator, device) -> torch.Tensor:
    """fp32 ``[D]`` position carrier of one head: per rotary pair weight w_p (sum 1), random phase."""
    kind = {"window": "local", "semantic": "sink"}.get(kind, kind)  # same spectra, other logit scales
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


def _sharpness(heads: int, gen: torch.Generator, device) -> tuple[float, ...]:
    """Per-head logit factors, log-evenly spaced over ``_SHARPNESS_RANGE``, in a random head order."""
    low, high = (math.log(x) for x in _SHARPNESS_RANGE)
    steps = [low + (high - low) * i / max(1, heads - 1) for i in range(heads)]
    order = torch.randperm(heads, generator=gen, device=device).tolist()
    return tuple(math.exp(steps[i]) for i in order)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


@dataclass(frozen=True)
class _Head:
    """Every random draw of one head (``dit_qkv``'s draws, in its order) and its logit scales; no content."""

    kind: str
    proj_q: torch.Tensor  # fp32 [C, D]
    proj_k: torch.Tensor
    proj_v: torch.Tensor
    position: torch.Tensor  # fp32 [D]: the scaled position carrier
    noise_q: torch.Tensor  # fp32 [B, S, D]: _QK_NOISE token noise
    noise_k: torch.Tensor
    noise_v: torch.Tensor  # fp32 [B, S, D]: _V_NOISE token noise
    sink: torch.Tensor | None  # fp32 [D]: sink heads' shared direction
    semantic: tuple[float, torch.Tensor] | None  # semantic heads: content gain and k's projection
    offset: torch.Tensor | None  # fp32 [D]: non-smooth families' query offset direction


def _draw_head(shape: DitShape, kind: str, family: str, batch: int, gen: torch.Generator, device) -> _Head:
    """The random draws of one head of ``dit_qkv`` (the same order, so the tensors stay bit-identical)."""
    d, c, seq = shape.head_dim, _CONTENT_CHANNELS, shape.seq
    proj_q = torch.randn(c, d, generator=gen, device=device) / math.sqrt(c)
    proj_k = proj_q + 0.5 * torch.randn(c, d, generator=gen, device=device) / math.sqrt(c)
    proj_v = torch.randn(c, d, generator=gen, device=device) / math.sqrt(c)
    low, high = _PEAK_LOGIT
    uniform = float(torch.rand((), generator=gen, device=device))
    peak = low + (high - low) * uniform
    if kind == "window":
        peak *= _WINDOW_SHARPNESS
    elif kind == "semantic":  # weak position; the content term carries the head
        peak = _SEMANTIC_POSITION_LOGIT[0] + (_SEMANTIC_POSITION_LOGIT[1] - _SEMANTIC_POSITION_LOGIT[0]) * uniform
    position = math.sqrt(peak * math.sqrt(d)) * _carrier(shape, kind, gen, device)
    noise_q = _QK_NOISE * torch.randn(batch, seq, d, generator=gen, device=device)
    noise_k = _QK_NOISE * torch.randn(batch, seq, d, generator=gen, device=device)
    sink = semantic = offset = None
    if kind == "sink":
        direction = torch.randn(d, generator=gen, device=device)
        sink = direction / direction.norm() * (_SINK_LOGIT * math.sqrt(d)) ** 0.5
    elif kind == "semantic":
        semantic_peak = low + (high - low) * float(torch.rand((), generator=gen, device=device))
        proj_ks = proj_q + _SEMANTIC_PROJ_NOISE * torch.randn(c, d, generator=gen, device=device) / math.sqrt(c)
        semantic = (math.sqrt(semantic_peak * math.sqrt(d)), proj_ks)
    if family != "smooth":
        offset = _unit(torch.randn(d, generator=gen, device=device))
    noise_v = _V_NOISE * torch.randn(batch, seq, d, generator=gen, device=device)
    return _Head(kind, proj_q, proj_k, proj_v, position, noise_q, noise_k, noise_v, sink, semantic, offset)


def _head_qkv(shape: DitShape, head: _Head, content: torch.Tensor, angles: torch.Tensor, text: torch.Tensor,
              sharpness: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 q, k, v ``[B, S, D]`` of one head over the hidden state ``content`` ``[B, S, C]``."""
    d, c = shape.head_dim, _CONTENT_CHANNELS
    content_gain = 0.0 if head.kind == "semantic" else _CONTENT_GAIN * (c / d) ** 0.25
    q = head.position + content_gain * content @ head.proj_q + head.noise_q
    k = head.position + content_gain * content @ head.proj_k + head.noise_k
    q, k = _rotate(q, angles), _rotate(k, angles)
    if head.sink is not None:
        q = q + head.sink
        k = k + head.sink * text[:, None]
    elif head.semantic is not None:  # after the rotation: q_i . k_j ~ peak * cos(content_i, content_j)
        gain, proj_ks = head.semantic
        q = q + gain * _unit(content @ head.proj_q)
        k = k + gain * _unit(content @ proj_ks)
    if head.offset is not None:  # a shared query offset that every key is orthogonal to (module docstring)
        k = k - (k @ head.offset)[..., None] * head.offset
        q = q + _QUERY_OFFSET * q.square().sum(-1).mean().sqrt() * head.offset
    if sharpness is not None:
        q = q * sharpness
    return q, k, content @ head.proj_v + head.noise_v


def _resolve(shape: DitShape | str, family: str, kinds: tuple[str, ...] | None) -> tuple[DitShape, tuple[str, ...]]:
    """The ``DitShape`` and the head kinds of ``dit_qkv``'s arguments (errors name the argument)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"shape: unknown DiT shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if not isinstance(shape, DitShape):
        raise TypeError(f"shape: expected a DitShape or a name in SHAPES, got {type(shape).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if kinds is None:
        cycle = FAMILY_KINDS[family]
        kinds = tuple(cycle[i % len(cycle)] for i in range(shape.heads))
    if len(kinds) != shape.heads or any(kind not in ALL_KINDS for kind in kinds):
        raise ValueError(f"kinds: expected {shape.heads} head kinds from {ALL_KINDS}, got {kinds!r}")
    return shape, tuple(kinds)


def _text_tokens(shape: DitShape, device) -> torch.Tensor:
    """bool ``[S]``: True at the text tokens."""
    text = torch.zeros(shape.seq, dtype=torch.bool, device=device)
    text[slice(*shape.text_range)] = True
    return text


def dit_qkv(shape: DitShape | str, *, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
            device: torch.device | str = "cpu", kinds: tuple[str, ...] | None = None,
            family: str = "smooth") -> DitAttention:
    """Generate one DiT-like attention call (see the module docstring).

    Args:
        shape: a ``DitShape`` or a name in ``SHAPES``.
        batch: batch size (samples get independent content, the same head structure).
        seed: seed of the generator on ``device``.
        dtype: dtype of q/k/v.
        kinds: kind of each head (``ALL_KINDS``), default ``FAMILY_KINDS[family]`` repeated over the heads
            (``DEFAULT_KIND_CYCLE`` for ``smooth``).
        family: one of ``FAMILIES``: how the hidden state and the head sharpness are built (module docstring).
            ``"smooth"`` gives the same tensors as versions without families.
    Returns:
        ``DitAttention`` with q, k, v ``[batch, heads, seq, head_dim]`` in ``dtype`` on ``device``, the kinds,
        the family, the token cluster labels (scattered, regions) and the heads' sharpness (mixed-sharpness).
    """
    shape, kinds = _resolve(shape, family, kinds)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    content, labels = _family_content(shape, family, batch, gen, device)
    sharpness = _sharpness(shape.heads, gen, device) if family == "mixed-sharpness" else None
    angles, text = _rope_angles(shape, device), _text_tokens(shape, device)
    out = {name: torch.empty(batch, shape.heads, shape.seq, shape.head_dim, dtype=dtype, device=device)
           for name in "qkv"}
    for h, kind in enumerate(kinds):
        head = _draw_head(shape, kind, family, batch, gen, device)
        q, k, v = _head_qkv(shape, head, content, angles, text, None if sharpness is None else sharpness[h])
        out["q"][:, h], out["k"][:, h], out["v"][:, h] = q.to(dtype), k.to(dtype), v.to(dtype)
    return DitAttention(out["q"], out["k"], out["v"], shape, kinds, family, labels, sharpness)


# ---------------------------------------------------------------------------------------- trajectories
_TRAJECTORY_SPEEDS = (0.5, 2.0)  # per-head factor on the schedule's shift, log-uniform in this range
_WANDER = 0.15  # slow straight perturbation of the video hidden state at drift 1, over the run (content rms 1)
_TRAJECTORY_SEED = 0x9E3779B9  # offset of the trajectory generator's seed from the scene's


class Trajectory(Sequence):
    """The attention inputs of one DiT scene over the steps of a denoising run (``trajectory``).

    ``traj[t]`` (t in ``range(len(traj))``, negative indices too) and iteration give ``DitAttention``; the
    tensors of a step are generated when asked for (one step's q/k/v and the scene's ``[B, S, C]`` hidden
    states live at a time). Attributes: ``sigmas`` (noise level of each step and head, ``[steps][heads]``,
    1 -> 0), ``shifts`` (each head's shift), ``drift``, ``shift``, ``shape``, ``kinds``, ``family``.
    """

    def __init__(self, shape: DitShape, family: str, kinds: tuple[str, ...], *, steps: int, drift: float,
                 shift: float, seed: int, batch: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.family, self.kinds = shape, family, kinds
        self.drift, self.shift, self.dtype, self.device = drift, shift, dtype, device
        gen = torch.Generator(device=device).manual_seed(seed)
        self._content, self.labels = _family_content(shape, family, batch, gen, device)
        self.sharpness = _sharpness(shape.heads, gen, device) if family == "mixed-sharpness" else None
        self._head_state = gen.get_state()  # the heads' draws are replayed from here at every step
        extra = torch.Generator(device=device).manual_seed(seed + _TRAJECTORY_SEED)
        self._video = ~_text_tokens(shape, device)[:, None]  # [S, 1]: the prompt is not noised
        size = (batch, shape.seq, _CONTENT_CHANNELS)
        self._noise = torch.randn(size, generator=extra, device=device) * self._video
        self._wander = torch.randn(size, generator=extra, device=device) * self._video
        low, high = (math.log(x) for x in _TRAJECTORY_SPEEDS)
        logs = low + (high - low) * torch.rand(shape.heads, generator=extra, device=device)
        self.shifts = tuple(shift * math.exp(x) for x in logs.tolist())
        self._u = tuple(1.0 - t / (steps - 1) for t in range(steps))  # flow time, 1 -> 0
        self.sigmas = tuple(tuple(s * u / (1.0 + (s - 1.0) * u) for s in self.shifts) for u in self._u)
        self._angles, self._text = _rope_angles(shape, device), _text_tokens(shape, device)

    def __len__(self) -> int:
        return len(self._u)

    def __getitem__(self, step: int) -> DitAttention:
        """Step ``step``'s q/k/v (each ``[batch, H, S, D]`` in the trajectory's dtype and device), made on demand."""
        if isinstance(step, bool) or not isinstance(step, int) or not -len(self) <= step < len(self):
            raise IndexError(f"step: expected an int in [{-len(self)}, {len(self)}), got {step!r}")
        step %= len(self)
        base = self._content + self.drift * _WANDER * self._u[step] * self._wander
        gen = torch.Generator(device=self.device)
        gen.set_state(self._head_state)
        shape = self.shape
        out = {name: torch.empty(self._content.shape[0], shape.heads, shape.seq, shape.head_dim, dtype=self.dtype,
                                 device=self.device) for name in "qkv"}
        for h, kind in enumerate(self.kinds):
            head = _draw_head(shape, kind, self.family, self._content.shape[0], gen, self.device)
            theta = self.drift * math.pi / 2 * self.sigmas[step][h]
            content = torch.where(self._video, math.cos(theta) * base + math.sin(theta) * self._noise, base)
            q, k, v = _head_qkv(shape, head, content, self._angles, self._text,
                                None if self.sharpness is None else self.sharpness[h])
            out["q"][:, h], out["k"][:, h], out["v"][:, h] = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)
        return DitAttention(out["q"], out["k"], out["v"], shape, self.kinds, self.family, self.labels,
                            self.sharpness)

    def __iter__(self) -> Iterator[DitAttention]:
        return (self[t] for t in range(len(self)))


def trajectory(shape: DitShape | str, family: str = "smooth", *, steps: int = 50, drift: float = 1.0,
               shift: float = 0.3, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", kinds: tuple[str, ...] | None = None) -> Trajectory:
    """One scene over ``steps`` denoising steps: the attention inputs settle from noise onto ``dit_qkv``'s.

    The heads (projections, position carriers, token noise) are those of ``dit_qkv`` with the same arguments
    and stay fixed; what moves is the video tokens' hidden state. At step t (flow time ``u = 1 - t / (steps -
    1)``) head h sees ``cos(a) (x + drift * 0.15 u w) + sin(a) e`` with ``a = drift * pi/2 * sigma_h(u)``,
    ``sigma_h(u) = s_h u / (1 + (s_h - 1) u)`` (the flow-matching shift schedule, 1 -> 0): x the scene's hidden
    state, e i.i.d. unit noise (variance preserving mix), w an i.i.d. unit field (a slow straight wander that
    ends at the scene), ``s_h = shift * f_h`` with f_h log-uniform in [0.5, 2] per head (heads settle at
    different speeds). sigma_h falls at rate ``1 / s_h`` at the first step and ``s_h`` at the last, so with
    ``shift < 0.5`` every head changes fast early and slowly late (what video DiTs' attention maps show). Text
    tokens are not noised: text-anchored (sink) and position-dominated heads move little, content-driven
    (semantic) heads most. The last step is exactly ``dit_qkv(shape, seed=seed, ...)``; ``drift=0`` gives that
    scene at every step.

    Args:
        shape: a ``DitShape`` or a name in ``SHAPES`` (``dataclasses.replace(shape, heads=n)`` for a few heads).
        family: one of ``FAMILIES``.
        steps: denoising steps, >= 2.
        drift: in [0, 1]: 1 starts the video tokens from pure noise, 0 never moves.
        shift: the schedule's shift, > 0 (default 0.3: per head 0.15-0.6, sigma falls 3-44x faster at the first
            step than at the last).
        seed: seeds the scene (as ``dit_qkv``) and, offset, the noise, wander and speeds.
        batch, dtype, device, kinds: as ``dit_qkv``.
    Returns:
        ``Trajectory``: ``traj[t]`` is a ``DitAttention`` with q, k, v ``[batch, heads, seq, head_dim]`` in
        ``dtype`` on ``device``.
    """
    shape, kinds = _resolve(shape, family, kinds)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps: expected an int >= 2 (denoising steps), got {steps!r}")
    if isinstance(drift, bool) or not isinstance(drift, (int, float)) or not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift: expected a number in [0, 1], got {drift!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0.0 < shift < math.inf:
        raise ValueError(f"shift: expected a finite number > 0, got {shift!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    return Trajectory(shape, family, kinds, steps=steps, drift=float(drift), shift=float(shift), seed=seed,
                      batch=batch, dtype=dtype, device=torch.device(device))
