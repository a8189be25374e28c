"""The default predictor (``predictors.predict``, ``attention(..., predictor="default")``): clustered query
blocks, the pooled threshold rule, the captured-mass check; clear errors for bad knobs. Its error against the
exact mask at the same density, on every data family, is measured by ``bench/bench_attention_call.py``."""

import pytest
import torch

from fgattn_gen import attention
from fgattn_gen.ditdata import dit_qkv
from fgattn_gen.predictors import captured_mass, cluster_order, predict


def test_cluster_order_groups_clusters(gen):
    """Queries drawn around 6 directions, shuffled: along the order the direction changes about as often as
    there are clusters (raster order: at almost every query)."""
    centers = torch.randn(6, 64, generator=gen)
    labels = torch.randint(0, 6, (2, 3, 600), generator=gen)
    q = (centers[labels] + 0.05 * torch.randn(2, 3, 600, 64, generator=gen)).to(torch.bfloat16)
    order = cluster_order(q, tokens_per_cluster=50, steps=10, subsample=1)
    assert order.shape == (2, 3, 600) and order.dtype == torch.int64
    assert torch.equal(order.sort(-1).values, torch.arange(600).expand(2, 3, 600))

    def changes(lab):
        return (lab[..., 1:] != lab[..., :-1]).sum(-1).float().mean()

    assert changes(labels) > 400
    assert changes(labels.gather(2, order)) < 50


def test_predict_in_attention(gen):
    data = dit_qkv("narrow-cpu", family="scattered", seed=3)
    q, k, v = data.q, data.k, data.v
    keys, mass = predict(q, k, return_mass=True)
    assert keys.query_order is not None and mass.shape == keys.shape[:3]
    out, stats = attention(q, k, v, predictor="default", return_stats=True)
    torch.testing.assert_close(out, attention(q, k, v, keys), atol=0, rtol=0)
    torch.testing.assert_close(stats.captured_mass, mass)
    assert 0 < stats.density < 1
    raster = predict(q, k, tokens_per_cluster=None)
    assert raster.query_order is None


def test_min_mass_makes_low_blocks_dense(gen):
    """A very high threshold keeps few keys; blocks whose estimate is below min_mass then keep every key and
    the others are untouched."""
    data = dit_qkv("narrow-cpu", family="mixed-sharpness", seed=1)
    q, k = data.q, data.k
    sparse = predict(q, k, threshold_scale=20.0, min_mass=None)
    widened, mass = predict(q, k, threshold_scale=20.0, min_mass=0.3, return_mass=True)
    torch.testing.assert_close(mass, captured_mass(q, k, sparse, samples=2))
    low = mass < 0.3
    assert low.any() and (~low).any()
    mask = widened.to_mask()
    assert mask[low].all()
    assert torch.equal(mask[~low], sparse.to_mask()[~low])


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold_scale=0), "^threshold_scale: "), (dict(threshold_scale=-1.0), "^threshold_scale: "),
    (dict(tokens_per_cluster=0), "^tokens_per_cluster: "), (dict(cluster_steps=-1), "^steps: "),
    (dict(min_mass=1.5), "^min_mass: "), (dict(samples=0), "^samples: "),
])
def test_bad_knobs(gen, kwargs, match):
    q = torch.randn(1, 2, 100, 64, generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        predict(q, q, **kwargs)
