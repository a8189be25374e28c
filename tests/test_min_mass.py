"""widen_to_mass: blocks whose estimated captured mass is below min_mass get their sampled rows' top keys (or
every key); the others are untouched; against captured_mass and a slow per-row reference."""

import math

import pytest
import torch

from conftest import ceil_div
from fgattn_gen import KeySet
from fgattn_gen.ditdata import dit_qkv
from fgattn_gen.predictors import captured_mass, min_mass, pooled_top_p, widen_to_mass
from fgattn_gen.predictors.captured_mass import sample_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(gen, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)


def random_keys(gen, b, h, seq_q, seq_k, block_m, block_n, density):
    mask = torch.rand(b, h, ceil_div(seq_q, block_m), ceil_div(seq_k, block_n), generator=gen) < density
    return KeySet.from_mask(mask.to(DEVICE), block_m=block_m, block_n=block_n)


def slow_widen(q, k, keys, min_mass_, samples):
    """Loops: each low block ORs in, per sampled row, the key groups of the row's sorted top keys; it keeps
    every key if the held-out rows (phase 0.5) then keep less than min_mass on average."""
    mask = keys.to_mask().cpu().clone()
    est = captured_mass(q, k, keys, samples=samples).cpu()
    rows, weights = sample_rows(q.shape[2], keys.block_m, samples, q.device)
    held_rows, held_weights = sample_rows(q.shape[2], keys.block_m, samples, q.device, phase=0.5)
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1).cpu()
    b, h, nq, _ = mask.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                if est[bi, hi, i] >= min_mass_:
                    continue
                for row, w in zip(rows[i].tolist(), weights[i].tolist()):
                    if w == 0:
                        continue
                    p = probs[bi, hi, row]
                    ordered = p.sort(descending=True)
                    n = int(((ordered.values.cumsum(0) - ordered.values) < min_mass_).sum())
                    for key in ordered.indices[:n].tolist():
                        mask[bi, hi, i, key // keys.block_n] = True
                keep = mask[bi, hi, i].repeat_interleave(keys.block_n)[:k.shape[2]]
                held = [float(probs[bi, hi, row][keep].sum()) * w for row, w in zip(held_rows[i].tolist(),
                                                                                    held_weights[i].tolist())]
                if sum(held) < min_mass_ * (1 - 1e-5):
                    mask[bi, hi, i] = True
    return mask


@pytest.mark.parametrize("b, h, seq_q, seq_k, block_m, block_n, samples", [
    (1, 2, 100, 77, 32, 1, 4), (2, 1, 130, 150, 64, 8, 8), (1, 2, 70, 131, 16, 3, 16), (1, 1, 9, 33, 4, 5, 2)])
@pytest.mark.parametrize("target", [0.8, 0.95])
def test_widening_reaches_min_mass(gen, b, h, seq_q, seq_k, block_m, block_n, samples, target):
    q, k = randn(gen, b, h, seq_q, 64, scale=2.5), randn(gen, b, h, seq_k, 64)
    keys = random_keys(gen, b, h, seq_q, seq_k, block_m, block_n, density=0.3)
    before = captured_mass(q, k, keys, samples=samples)
    widened, mass = widen_to_mass(q, k, keys, min_mass=target, samples=samples, return_mass=True)
    assert (widened.block_m, widened.block_n, widened.shape) == (block_m, block_n, keys.shape)
    after = captured_mass(q, k, widened, samples=samples)
    old, new = keys.to_mask(), widened.to_mask()
    low = before < target
    assert ((mass >= target * (1 - 1e-5)) | ~low).all()  # held-out estimate of every widened block
    torch.testing.assert_close(mass[~low], before[~low])
    assert (new | old).eq(new).all()  # only adds keys
    assert ((after >= target * (1 - 1e-5)) | new.all(-1)).all()  # reached, or dense
    high = before >= target
    assert torch.equal(new[high], old[high])  # blocks already above: untouched
    assert (before < target).any() and (new != old).any()
    assert torch.equal(new.cpu(), slow_widen(q, k, keys, target, samples))


def test_dense_fallback(gen, monkeypatch):
    """If the sampled rows' top keys do not lift a low block (here: they are taken away), it keeps every key."""
    q, k = randn(gen, 1, 2, 96, 64, scale=2.5), randn(gen, 1, 2, 80, 64)
    keys = random_keys(gen, 1, 2, 96, 80, 32, 1, density=0.2)
    before = captured_mass(q, k, keys)
    monkeypatch.setattr(min_mass, "row_top_keys", lambda probs, mass: torch.zeros_like(probs, dtype=torch.bool))
    widened, mass = widen_to_mass(q, k, keys, min_mass=0.9, return_mass=True)
    low = before < 0.9
    assert low.any() and widened.to_mask()[low].all()
    torch.testing.assert_close(mass[low], torch.ones_like(mass[low]), atol=1e-5, rtol=0)  # dense
    assert torch.equal(widened.to_mask()[~low], keys.to_mask()[~low])


def test_min_mass_one_and_full_keys(gen):
    q, k = randn(gen, 1, 1, 64, 64, scale=2.0), randn(gen, 1, 1, 70, 64)
    empty = KeySet.from_mask(torch.zeros(1, 1, 2, 70, dtype=torch.bool, device=DEVICE), block_m=32)
    widened, mass = widen_to_mass(q, k, empty, min_mass=1.0, return_mass=True)
    assert (mass >= 1 - 1e-5).all()
    full = KeySet.full(1, 1, 64, 70, block_m=32, device=DEVICE)
    assert torch.equal(widen_to_mass(q, k, full, min_mass=1.0).bits, full.bits)


def test_pooled_on_hard_data():
    """pooled_top_p at its defaults on the `scattered` family loses mass; widening lifts every block to the
    target on its held-out rows (or makes it dense), raises the exact mass of all rows, lowers the error."""
    from fgattn_gen import reference_attention
    data = dit_qkv("narrow-cpu", family="scattered", dtype=torch.float32, device=DEVICE)
    q, k, v = data.q, data.k, data.v
    keys = pooled_top_p(q, k, impl="torch")
    widened, mass = widen_to_mass(q, k, keys, return_mass=True)
    assert captured_mass(q, k, keys).min() < 0.9 and (mass >= 0.95 * (1 - 1e-5)).all()
    assert captured_mass(q, k, widened, samples=128).mean() > captured_mass(q, k, keys, samples=128).mean() + 0.05
    dense = reference_attention(q, k, v, KeySet.full(1, data.shape.heads, data.shape.seq, data.shape.seq,
                                                     block_m=128, device=DEVICE))

    def error(ks):
        return ((reference_attention(q, k, v, ks) - dense).norm() / dense.norm()).item()

    assert error(widened) < 0.6 * error(keys)


@pytest.fixture
def qkk(gen):
    q, k = randn(gen, 1, 2, 40, 64), randn(gen, 1, 2, 50, 64)
    return q, k, random_keys(gen, 1, 2, 40, 50, 16, 1, density=0.3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_mass=0.0), "min_mass"), (dict(min_mass=1.01), "min_mass"), (dict(min_mass=-0.5), "min_mass"),
    (dict(min_mass=float("nan")), "min_mass"), (dict(min_mass=True), "min_mass"), (dict(min_mass="0.9"), "min_mass"),
    (dict(samples=0), "samples"), (dict(scale=-1.0), "scale"), (dict(return_mass=1), "return_mass"),
    (dict(generator="seed"), "generator"),
])
def test_bad_arguments(qkk, kwargs, match):
    with pytest.raises(ValueError, match=rf"^{match}: "):
        widen_to_mass(*qkk, **kwargs)


def test_bad_keys(qkk, gen):
    q, k, _ = qkk
    with pytest.raises(ValueError, match="^keys: "):
        widen_to_mass(q, k, random_keys(gen, 1, 2, 40, 90, 16, 1, density=0.3))
    with pytest.raises(TypeError, match="^keys: "):
        widen_to_mass(q, k, None)
