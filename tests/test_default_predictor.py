"""The default predictor (``predictors.predict``, ``attention(..., predictor="default")``): clustered query
blocks, the pooled threshold rule (split-K passes against the torch rule), the captured-mass check (the fused
widening against the torch path); clear errors for bad knobs. Its error against the
exact mask at the same density, on every data family, is measured by ``bench/bench_attention_call.py``."""

import importlib

import pytest
import torch

from fgattn_gen import KeySet, attention
from fgattn_gen.ditdata import dit_qkv
from fgattn_gen.predictors import captured_mass, cluster_order, mass_kernel, predict, threshold_rule
from fgattn_gen.predictors.default import coherent_blocks
from fgattn_gen.predictors.query_clusters import ordered_block_means
from fgattn_gen.predictors.captured_mass import fused_mass, sample_rows
from fgattn_gen.predictors.key_splits import key_splits, sm_count

captured_mass_module = importlib.import_module("fgattn_gen.predictors.captured_mass")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def test_coherent_blocks_picks_the_more_coherent_order_per_head(gen):
    """Head 0 drifts smoothly along the sequence (a local head: raster blocks are coherent), its candidate order
    a random permutation; head 1 holds 6 directions shuffled, its candidate order sorted by direction. Head 0
    keeps the raster order, head 1 takes its candidate; the means are the chosen blocks' means."""
    seq, d, block_m = 601, 64, 64
    drift = torch.cumsum(0.2 * torch.randn(seq, d, generator=gen), 0)
    centers = torch.randn(6, d, generator=gen)
    labels = torch.randint(0, 6, (seq,), generator=gen)
    q = torch.stack([drift, centers[labels] + 0.05 * torch.randn(seq, d, generator=gen)])[None].to(torch.bfloat16)
    candidate = torch.stack([torch.randperm(seq, generator=gen), torch.argsort(labels, stable=True)])[None]
    order, means = coherent_blocks(q.to(DEVICE), candidate.to(DEVICE), block_m)
    assert torch.equal(order[0, 0].cpu(), torch.arange(seq)) and torch.equal(order[0, 1].cpu(), candidate[0, 1])
    torch.testing.assert_close(means, ordered_block_means(q.to(DEVICE), order, block_m))


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


@pytest.mark.parametrize("n_keys, block_k, programs, per_sm, min_steps", [
    (1, 64, 10, 4, 8), (300, 64, 1, 64, 1), (1000, 32, 3, 8, 4), (119_056, 64, 192, 4, 8), (65, 64, 1, 99, 1)])
def test_key_splits_cover_the_keys(n_keys, block_k, programs, per_sm, min_steps):
    """Chunks of whole steps, none empty, covering [0, n_keys); at least min_steps steps each unless the
    range is shorter; no more programs than asked for (beyond one split)."""
    splits, per = key_splits(n_keys, block_k, programs, torch.device("cpu"), programs_per_sm=per_sm,
                             min_steps=min_steps)
    assert per % block_k == 0 and (splits - 1) * per < n_keys <= splits * per
    steps = -(-n_keys // block_k)
    assert splits == 1 or per // block_k >= min(min_steps, steps)
    assert splits == 1 or programs * (splits - 1) < per_sm * sm_count(torch.device("cpu"))


@pytest.mark.parametrize("n_keys, rows_per_block, with_var", [(300, 1, False), (301, 2, True), (97, 4, False)])
def test_threshold_words_split_keys(gen, monkeypatch, n_keys, rows_per_block, with_var):
    """The two split-K passes (every key range split into single steps, several row tiles) give the torch
    rule's words: the per-split partial (max, sum) merge is the row's log-sum-exp."""
    monkeypatch.setattr(threshold_rule, "MIN_SPLIT_STEPS", 1)
    monkeypatch.setattr(threshold_rule, "PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(threshold_rule, "LAUNCH", {False: (16, 32, 4, 1), True: (16, 32, 4, 1)})
    groups = 45
    n_blocks = -(-groups // rows_per_block)
    q_mean = torch.randn(2, groups, 64, generator=gen).to(DEVICE)
    q_var = torch.randn(2, groups, 64, generator=gen).abs().to(DEVICE) if with_var else None
    k_mean = 3 * torch.randn(2, n_keys, 64, generator=gen).to(DEVICE)
    for t in (0.5, 3.0):
        args = (q_mean, k_mean, 1 / 8, min(1.0, t / n_keys))
        kw = dict(rows_per_block=rows_per_block, n_blocks=n_blocks, dtype=torch.float32, q_var=q_var)
        got = KeySet(threshold_rule.pooled_threshold_words(*args, impl="kernels", **kw)[None], n_keys, 1).to_mask()
        want = KeySet(threshold_rule.pooled_threshold_words(*args, impl="torch", **kw)[None], n_keys, 1).to_mask()
        if DEVICE == "cpu":
            assert torch.equal(got, want)
        else:  # other exp and summation order than the torch rule: near-ties may differ
            assert (got != want).float().mean() <= 2e-3


def test_fused_widening_matches_torch(gen, monkeypatch):
    """The merge kernel's widening (blocks below min_mass get every key, in place) equals captured_mass and a
    torch.where on the torch path; split keys, a query order, a ragged last key word."""
    monkeypatch.setattr(mass_kernel, "MIN_SPLIT_STEPS", 1)
    monkeypatch.setattr(mass_kernel, "PROGRAMS_PER_SM", 64)
    data = dit_qkv("narrow-cpu", family="mixed-sharpness", seed=2, device=DEVICE)
    q, k = data.q, data.k
    keys = predict(q, k, threshold_scale=20.0, min_mass=None)
    assert keys.n_kblocks % 32 != 0
    rows, weights = sample_rows(q.shape[2], 128, 2, q.device)
    bits = keys.bits.clone()
    widened = KeySet(bits, keys.n_kblocks, 128, 1, query_order=keys.query_order)
    mass = fused_mass(q, k, widened, rows, weights, scale=q.shape[-1] ** -0.5, min_mass=0.3)
    monkeypatch.setattr(captured_mass_module, "runs_fused", lambda q: False)
    torch.testing.assert_close(mass, captured_mass(q, k, keys, samples=2), atol=2e-5, rtol=1e-4)
    low = mass < 0.3
    assert low.any() and (~low).any()
    full = KeySet.full(*q.shape[:3], k.shape[2], block_m=128, device=q.device).bits
    assert torch.equal(bits, torch.where(low[..., None], full, keys.bits))


@pytest.mark.gpu
def test_predict_runs_without_host_sync_and_in_a_cuda_graph():
    """Per-head thresholds (what a calibration serves) and text keys: after a first call (which makes the
    cached sample rows, text words and threshold tensor), ``predict`` neither synchronises the host nor breaks
    CUDA-graph capture, and the replayed graph gives the eager call's KeySet."""
    data = dit_qkv("narrow-cpu", family="scattered", seed=5, dtype=torch.bfloat16, device="cuda")
    q, k = data.q, data.k
    heads, seq = q.shape[1], k.shape[2]
    # cluster_steps=0 for the equalities: the Lloyd steps sum with atomics (order-dependent fp32 rounding)
    knobs = dict(threshold_scale=[0.5 + i for i in range(heads)], keep_keys=[(seq - 40, seq)], cluster_steps=0)
    eager = predict(q, k, **knobs)
    predict(q, k, **{**knobs, "cluster_steps": 4})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = predict(q, k, **knobs)
        predict(q, k, **{**knobs, "cluster_steps": 4})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(again.bits, eager.bits) and torch.equal(again.query_order, eager.query_order)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = predict(q, k, **knobs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.bits, eager.bits) and torch.equal(captured.query_order, eager.query_order)
