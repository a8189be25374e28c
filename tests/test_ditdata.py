"""DiT-like attention data: shapes, seeding, and the attention structure each head kind promises."""

import math

import pytest
import torch

from fgattn_gen.ditdata import DEFAULT_KIND_CYCLE, KINDS, SHAPES, DitShape, dit_qkv, trajectory

SMALL = DitShape("small", 4, 8, 12, 32, 4, 128)


def test_model_shapes():
    hunyuan, cog = SHAPES["hunyuan-720p"], SHAPES["cogvideox-5b"]
    assert (hunyuan.heads, hunyuan.head_dim, hunyuan.video_tokens, hunyuan.seq) == (24, 128, 118800, 119056)
    assert (cog.heads, cog.head_dim, cog.video_tokens, cog.seq) == (48, 64, 17550, 17776)
    assert SHAPES["hunyuan-32k"].seq == 32760
    assert hunyuan.text_range == (118800, 119056) and cog.text_range == (0, 226)
    assert sum(hunyuan.rope_sections) == 128 and sum(cog.rope_sections) == 64


@pytest.mark.parametrize("name", ["hunyuan-cpu", "cogvideox-cpu"])
def test_tensors(name):
    data = dit_qkv(name, batch=2, dtype=torch.float16)
    shape = SHAPES[name]
    for t in (data.q, data.k, data.v):
        assert t.shape == (2, shape.heads, shape.seq, shape.head_dim) and t.dtype == torch.float16
        assert torch.isfinite(t).all()
    assert data.kinds == DEFAULT_KIND_CYCLE[:shape.heads]
    assert not torch.equal(data.q[0], data.q[1])  # samples differ


def test_seeded():
    a, b, c = dit_qkv(SMALL, seed=3), dit_qkv(SMALL, seed=3), dit_qkv(SMALL, seed=4)
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert not torch.equal(a.q, c.q)


def test_bad_arguments():
    with pytest.raises(ValueError, match="^shape: unknown"):
        dit_qkv("wan-900p")
    with pytest.raises(ValueError, match="^kinds: "):
        dit_qkv(SMALL, kinds=("local",) * 3)
    with pytest.raises(ValueError, match="^kinds: "):
        dit_qkv(SMALL, kinds=("local", "local", "local", "diagonal"))


def _probs_and_positions(kind: str):
    data = dit_qkv(SMALL, kinds=(kind,) * SMALL.heads, dtype=torch.float32)
    q, k = data.q[0], data.k[0]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(SMALL.head_dim), -1)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (SMALL.frames, SMALL.height, SMALL.width)),
                                      indexing="ij"), -1).reshape(-1, 3)
    video = SMALL.video_tokens
    return probs[:, :video], grid, video


def _mass(probs, grid, video, where):
    """Mean over video queries of the mass on the video keys where ``where(query_pos, key_pos)``."""
    selected = where(grid[:, None, :], grid[None, :, :])  # [query, key]
    return (probs[:, :, :video] * selected).sum(-1).mean().item()


def test_head_kinds_have_their_structure():
    probs, grid, video = _probs_and_positions("local")
    near = _mass(probs, grid, video, lambda a, b: ((a - b).abs() <= 1).all(-1))
    assert near > 0.4  # 27 of 416 keys hold most of the mass
    probs, grid, video = _probs_and_positions("spatial")
    assert _mass(probs, grid, video, lambda a, b: a[..., 0] == b[..., 0]) > 0.6  # own frame: 1/4 of the keys
    probs, grid, video = _probs_and_positions("temporal")
    same_place = _mass(probs, grid, video, lambda a, b: ((a[..., 1:] - b[..., 1:]).abs() <= 1).all(-1))
    other_frames = _mass(probs, grid, video, lambda a, b: (a[..., 0] != b[..., 0])
                         & ((a[..., 1:] - b[..., 1:]).abs() <= 1).all(-1))
    assert same_place > 0.4 and other_frames > 0.15
    data = dit_qkv(SMALL, kinds=("sink",) * 4, dtype=torch.float32)
    probs = torch.softmax(data.q[0] @ data.k[0].transpose(-1, -2) / math.sqrt(SMALL.head_dim), -1)
    start, end = SMALL.text_range
    assert probs[:, :, start:end].sum(-1).mean() > 0.5  # 32 of 416 keys


def test_text_first_layout():
    shape = DitShape("t", 2, 4, 4, 8, 2, 64, text_first=True)
    data = dit_qkv(shape, kinds=("sink", "sink"), dtype=torch.float32)
    probs = torch.softmax(data.q[0] @ data.k[0].transpose(-1, -2) / 8.0, -1)
    assert probs[:, :, :8].sum(-1).mean() > 0.5
    assert set(KINDS) == {"local", "spatial", "temporal", "sink"}


# ---------------------------------------------------------------------------------------- families
from fgattn_gen.ditdata import ALL_KINDS, FAMILIES, FAMILY_KINDS  # noqa: E402

NARROW = SHAPES["narrow-cpu"]  # 3 x 12 x 20 + 7 text = 727 tokens, 4 heads, D = 64: 128 rows = 6.4 grid rows
HARD = [f for f in FAMILIES if f != "smooth"]


def _grid(shape):
    return torch.stack(torch.meshgrid(*(torch.arange(n) for n in (shape.frames, shape.height, shape.width)),
                                      indexing="ij"), -1).reshape(-1, 3)


def _probs(data):
    return torch.softmax(data.q[0].float() @ data.k[0].float().transpose(-1, -2) / math.sqrt(data.shape.head_dim), -1)


def test_family_shapes():
    study = SHAPES["study-cpu"]
    assert study.seq == 2317 and all(study.seq % m for m in (16, 32, 64, 128)) and 4 <= study.heads <= 6
    assert NARROW.seq % 128 and NARROW.width * NARROW.height > 128 > NARROW.width  # a block spans > 1 row
    assert set(FAMILY_KINDS) == set(FAMILIES) and FAMILIES[0] == "smooth"
    assert all(set(kinds) <= set(ALL_KINDS) for kinds in FAMILY_KINDS.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_seeded_shapes_dtypes(family):
    a = dit_qkv(NARROW, family=family, seed=1, batch=2, dtype=torch.float16)
    b = dit_qkv(NARROW, family=family, seed=1, batch=2, dtype=torch.float16)
    c = dit_qkv(NARROW, family=family, seed=2, batch=2, dtype=torch.float16)
    for x, y, z in zip((a.q, a.k, a.v), (b.q, b.k, b.v), (c.q, c.k, c.v)):
        assert x.shape == (2, NARROW.heads, NARROW.seq, NARROW.head_dim) and x.dtype == torch.float16
        assert torch.isfinite(x).all() and torch.equal(x, y) and not torch.equal(x, z)
    assert not torch.equal(a.q[0], a.q[1])
    cycle = FAMILY_KINDS[family]
    assert a.family == family and a.kinds == tuple(cycle[i % len(cycle)] for i in range(NARROW.heads))
    if a.labels is not None:
        assert torch.equal(a.labels, b.labels) and a.labels.shape == (2, NARROW.seq)
        start, end = NARROW.text_range
        assert (a.labels[:, start:end] == -1).all() and (a.labels[:, :start] >= 0).all()


def test_smooth_family_is_the_default():
    a, b = dit_qkv(SMALL, seed=7), dit_qkv(SMALL, seed=7, family="smooth")
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert a.labels is None and a.sharpness is None and a.family == "smooth"


def test_bad_family():
    with pytest.raises(ValueError, match="^family: "):
        dit_qkv(SMALL, family="noisy")
    with pytest.raises(ValueError, match="^kinds: "):
        dit_qkv(SMALL, kinds=("semantic", "window", "local", "blur"))


def _blocks(labels, video):
    return [labels[i:i + 128] for i in range(0, video - 127, 128)]


def test_scattered_blocks_mix_many_clusters():
    data = dit_qkv(NARROW, family="scattered")
    labels = data.labels[0, :NARROW.video_tokens]
    for block in _blocks(labels, NARROW.video_tokens):
        counts = torch.bincount(block)
        assert (counts > 0).sum() >= 12  # many clusters in every block
        assert counts.max() < 0.5 * 128  # none dominates
        assert ((counts > 0) & (counts <= 3)).sum() >= 5  # rare clusters: 1-3 queries of the block
    grid = labels.view(NARROW.frames, NARROW.height, NARROW.width)
    assert (grid[..., 1:] == grid[..., :-1]).float().mean() < 0.3  # token by token, not spatial


def test_regions_are_coherent_and_cross_blocks():
    data = dit_qkv(NARROW, family="regions")
    labels = data.labels[0, :NARROW.video_tokens]
    grid = labels.view(NARROW.frames, NARROW.height, NARROW.width)
    same_x = (grid[..., 1:] == grid[..., :-1]).float().mean()
    same_y = (grid[:, 1:] == grid[:, :-1]).float().mean()
    chance = (torch.bincount(labels).float() / labels.numel()).square().sum()
    assert same_x > 0.6 and same_y > 0.6 and chance < 0.35  # spatially coherent, many clusters
    blocks = _blocks(labels, NARROW.video_tokens)
    assert all(len(set(b.tolist())) >= 2 for b in blocks)  # region borders cross every block
    boundaries = labels[128::128][:len(blocks) - 1] == labels[127:-1:128][:len(blocks) - 1]
    assert boundaries.any()  # some region continues across a block boundary


@pytest.mark.parametrize("family", ["scattered", "regions", "content"])
def test_semantic_heads_follow_content(family):
    """Semantic heads put their mass on the query's cluster more than on its grid neighbourhood, and far
    above the cluster's share of the keys; the local head of the same data attends by position."""
    data = dit_qkv(NARROW, family=family, dtype=torch.float32)
    video = NARROW.video_tokens
    probs = _probs(data)[:, :video, :video]
    labels = data.labels[0, :video]
    same = (labels[:, None] == labels[None]).float()
    grid = _grid(NARROW)
    near = ((grid[:, None] - grid[None]).abs() <= 1).all(-1).float()
    for h, kind in enumerate(data.kinds):
        same_mass, near_mass = (probs[h] * same).sum(-1).mean(), (probs[h] * near).sum(-1).mean()
        if kind == "semantic":
            assert same_mass > 0.6 and same_mass > 3 * same.mean() and same_mass > near_mass + 0.3, (h, family)
        if kind in ("local", "window"):
            assert near_mass > 0.4, (h, family)


@pytest.mark.parametrize("family", HARD)
def test_queries_pass_a_similarity_gate(family):
    """The shared query offset: a block's queries have cosine similarity > 0.6 to their mean (a pooled
    predictor's gate keeps them), while q . k is what it would be without it (every key is orthogonal)."""
    data = dit_qkv(NARROW, family=family, dtype=torch.float32)
    blocks = data.q[0, :, :5 * 128].reshape(NARROW.heads, 5, 128, -1)
    similarity = torch.nn.functional.cosine_similarity(blocks, blocks.mean(2, keepdim=True), dim=-1)
    assert similarity.mean() > 0.8


def test_mixed_sharpness_spans_heads():
    data = dit_qkv(NARROW, family="mixed-sharpness", dtype=torch.float32)
    assert max(data.sharpness) / min(data.sharpness) >= 10
    probs = _probs(data)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(-1)  # per head, nats
    assert entropy.max() - entropy.min() > 3.0  # a few keys per query next to most of them
    assert entropy[int(torch.tensor(data.sharpness).argmax())] == entropy.min()


def test_window_heads_are_tighter_than_local():
    data = dit_qkv(SMALL, kinds=("local", "window", "local", "window"), dtype=torch.float32)
    probs = _probs(data)[:, :SMALL.video_tokens, :SMALL.video_tokens]
    grid = _grid(SMALL)
    near = ((grid[:, None] - grid[None]).abs() <= 1).all(-1).float()
    mass = (probs * near).sum(-1).mean(-1)
    assert mass[1] > mass[0] and mass[3] > mass[2]


def test_preset_shapes_come_from_the_presets():
    """The real model shapes are read from fgattn_gen/presets (one table of model shapes), grid and all."""
    from fgattn_gen.ditdata import preset_shape
    from fgattn_gen.models import load_model
    for name, (model, shape) in {"hunyuan-720p": ("hunyuan", "720p-129f"), "wan14b-720p": ("wan-14b", "720p-81f"),
                                 "cogvideox-5b": ("cogvideox-5b", "480p-49f")}.items():
        spec = load_model(model)
        (attention_shape,) = [s for s in spec.shapes if s.name == shape]
        dit = SHAPES[name]
        assert (dit.video_tokens, dit.text_tokens, dit.heads, dit.head_dim) == (
            attention_shape.video_tokens, attention_shape.text_tokens, spec.heads, spec.head_dim)
        assert dit.text_first == spec.text_first
        assert preset_shape(model, shape, name) == dit
    with pytest.raises(ValueError, match="^shape: preset 'hunyuan' has no shape"):
        preset_shape("hunyuan", "8k")


# ---------------------------------------------------------------------------------------- trajectories
def _rel_change(a, b):
    return float((b.float() - a.float()).norm() / a.float().norm())


def _exact_mask(data, block_m=64):
    """bool ``[H, n_qblocks, S]``: keys whose fp32 probability exceeds 2 / S for some query of the block (the
    exact mask's threshold rule)."""
    probs = _probs(data)
    seq = probs.shape[-1]
    padded = torch.nn.functional.pad(probs, (0, 0, 0, -seq % block_m))
    return padded.unflatten(1, (-1, block_m)).amax(2) > 2 / seq


def _iou(a, b):
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_trajectory_settles_fast_early_slow_late(family):
    """q changes more between the first steps than the last ones, in every head, and the exact mask of
    consecutive steps overlaps less early than late; the last step is dit_qkv's scene."""
    traj = trajectory(NARROW, family, steps=12, seed=1, dtype=torch.float32)
    first, second, before_last, last = traj[0], traj[1], traj[-2], traj[-1]
    scene = dit_qkv(NARROW, family=family, seed=1, dtype=torch.float32)
    assert len(traj) == 12 and torch.equal(last.q, scene.q) and torch.equal(last.k, scene.k)
    assert torch.equal(last.v, scene.v) and last.kinds == scene.kinds and last.family == family
    early = [_rel_change(first.q[0, h], second.q[0, h]) for h in range(NARROW.heads)]
    late = [_rel_change(before_last.q[0, h], last.q[0, h]) for h in range(NARROW.heads)]
    assert all(e > 1.5 * lt for e, lt in zip(early, late)), (early, late)
    assert max(early) > 1.3 * min(early)  # heads drift at different speeds
    early_iou = _iou(_exact_mask(first), _exact_mask(second))
    late_iou = _iou(_exact_mask(before_last), _exact_mask(last))
    assert early_iou < late_iou and late_iou > 0.97, (early_iou, late_iou)
    assert all(torch.equal(d.v[:, :, slice(*NARROW.text_range)], scene.v[:, :, slice(*NARROW.text_range)])
               for d in (first, second))  # the prompt is not noised


def test_trajectory_drift_controls_the_change():
    strong = trajectory(NARROW, "content", steps=8, drift=1.0, dtype=torch.float32)
    weak = trajectory(NARROW, "content", steps=8, drift=0.2, dtype=torch.float32)
    assert _rel_change(weak[0].q, weak[1].q) < 0.5 * _rel_change(strong[0].q, strong[1].q)
    frozen = trajectory(NARROW, "content", steps=5, drift=0, dtype=torch.float32)
    scene = dit_qkv(NARROW, family="content", dtype=torch.float32)
    for data in frozen:
        assert torch.equal(data.q, scene.q) and torch.equal(data.k, scene.k) and torch.equal(data.v, scene.v)


def test_trajectory_is_seeded():
    a, b = trajectory(NARROW, "regions", steps=6, seed=4), trajectory(NARROW, "regions", steps=6, seed=4)
    c = trajectory(NARROW, "regions", steps=6, seed=5)
    for t in (0, 3):
        assert torch.equal(a[t].q, b[t].q) and torch.equal(a[t].k, b[t].k) and torch.equal(a[t].v, b[t].v)
        assert not torch.equal(a[t].q, c[t].q)
    assert torch.equal(a[2].q, a[-4].q) and a.shifts == b.shifts
    assert a.sigmas[0] == pytest.approx((1.0,) * NARROW.heads) and a.sigmas[-1] == (0.0,) * NARROW.heads
    assert [d.q.dtype for d in a] == [torch.bfloat16] * 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=1), "^steps: expected an int >= 2"), (dict(steps=4.0), "^steps: "),
    (dict(drift=1.5), r"^drift: expected a number in \[0, 1\]"), (dict(drift=-0.1), "^drift: "),
    (dict(shift=0), "^shift: expected a finite number > 0"), (dict(shift=float("inf")), "^shift: "),
    (dict(seed=-1), "^seed: "), (dict(batch=0), "^batch: "), (dict(dtype=torch.int32), "^dtype: "),
    (dict(family="noisy"), "^family: "), (dict(kinds=("local",)), "^kinds: "),
])
def test_trajectory_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trajectory(NARROW, **kwargs)


def test_trajectory_bad_step():
    traj = trajectory(NARROW, steps=3)
    with pytest.raises(IndexError, match=r"^step: expected an int in \[-3, 3\)"):
        traj[3]
    with pytest.raises(ValueError, match="^shape: unknown"):
        trajectory("wan-900p")
