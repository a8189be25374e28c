"""DiT-like attention data: shapes, seeding, and the attention structure each head kind promises."""

import math

import pytest
import torch

from fgattn_gen.ditdata import DEFAULT_KIND_CYCLE, KINDS, SHAPES, DitShape, dit_qkv

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
