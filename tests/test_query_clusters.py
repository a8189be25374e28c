"""cluster_order's fused kernels (assignment with running argmax, Lloyd sums by atomics, counting-sort order)
against the torch-ops reference on odd sizes; exact ties, empty clusters, the argsort fallback, strided q,
small launch tiles; ordered_block_means against the mean of the gathered queries."""

import pytest
import torch

from fgattn_gen.predictors import query_clusters
from fgattn_gen.predictors.pooling import group_mean
from fgattn_gen.predictors.query_clusters import cluster_order, cluster_order_torch, ordered_block_means

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def is_permutation(order):
    return torch.equal(order.sort(-1).values.cpu(), torch.arange(order.shape[-1]).expand(order.shape))


@pytest.mark.parametrize("shape, dtype, knobs", [
    ((1, 2, 333, 64), torch.float32, dict(tokens_per_cluster=20, steps=3, subsample=3)),
    ((2, 1, 250, 128), torch.bfloat16, dict(tokens_per_cluster=9, steps=2, subsample=1)),
    ((1, 1, 77, 64), torch.float16, dict(tokens_per_cluster=100, steps=1, subsample=5)),  # one cluster
    ((1, 3, 140, 64), torch.float32, dict(tokens_per_cluster=7, steps=0, subsample=8)),  # no Lloyd step
])
def test_fused_matches_torch(gen, shape, dtype, knobs):
    """The same clusters and the same stable order as the torch ops; every row a permutation. (On the CPU
    both sides compare fp32 scores; on CUDA the torch ops round them to bf16, so only the interpreter run
    checks equality.)"""
    q = (2 * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)
    got = cluster_order(q, **knobs)
    assert got.shape == shape[:3] and got.dtype == torch.int64 and is_permutation(got)
    if DEVICE == "cpu":
        assert torch.equal(got, cluster_order_torch(q, **knobs))


def test_exact_ties_and_empty_clusters(gen, monkeypatch):
    """Queries that are copies of 3 vectors. With no Lloyd step, 40 centroids (3 tiles of 16) are copies too
    and tie exactly: the first centroid of a query's vector wins, so the order is the stable sort of the
    positions by that centroid (torch's CPU matmul rounds duplicate columns differently: not a reference here).
    After Lloyd steps most clusters are empty (their centroid is kept, now a near-tie of the occupied one,
    which rounding, even of identical rows at other positions of a CPU matmul, breaks either way): still a
    permutation."""
    monkeypatch.setattr(query_clusters, "LAUNCH", (16, 16, 4, 1))
    base = torch.randn(3, 64, generator=gen)
    labels = torch.randint(0, 3, (1, 2, 120), generator=gen)
    q = base[labels].to(DEVICE)
    got = cluster_order(q, tokens_per_cluster=3, steps=0)
    first = torch.stack([torch.tensor([[int((row[torch.arange(40) * 3] == v).nonzero()[0]) for v in range(3)]])
                         for row in labels[0]], 1)  # [1, 2, 3]: first centroid of each vector
    want = (first.gather(2, labels) * 120 + torch.arange(120)).argsort(-1)
    assert torch.equal(got.cpu(), want)
    got = cluster_order(q, tokens_per_cluster=10, steps=3, subsample=2)
    assert is_permutation(got)


def test_small_tiles_and_argsort_fallback(gen, monkeypatch):
    """Many query tiles and centroid tiles (16 x 16 launch), and the argsort used when the counts would not
    fit the workspace budget: the same order."""
    q = torch.randn(1, 2, 201, 64, generator=gen).to(DEVICE)
    want = cluster_order(q, tokens_per_cluster=5, steps=2, subsample=2)
    monkeypatch.setattr(query_clusters, "LAUNCH", (16, 16, 4, 1))
    assert torch.equal(cluster_order(q, tokens_per_cluster=5, steps=2, subsample=2), want)
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "0")
    assert torch.equal(cluster_order(q, tokens_per_cluster=5, steps=2, subsample=2), want)


def test_strided_queries(gen):
    """q as [B, S, H, D] storage viewed as [B, H, S, D]: the same order as the contiguous copy."""
    q = torch.randn(1, 150, 3, 64, generator=gen).to(DEVICE).transpose(1, 2)
    assert torch.equal(cluster_order(q, tokens_per_cluster=12), cluster_order(q.contiguous(), tokens_per_cluster=12))


@pytest.mark.parametrize("seq, block", [(333, 128), (100, 16), (50, 64)])
def test_ordered_block_means(gen, seq, block):
    q = (3 * torch.randn(2, 3, seq, 64, generator=gen)).to(torch.bfloat16).to(DEVICE)
    order = torch.stack([torch.randperm(seq, generator=gen) for _ in range(6)]).view(2, 3, seq).to(DEVICE)
    gathered = q.gather(2, order[..., None].expand(-1, -1, -1, 64))
    want = group_mean(gathered.reshape(6, seq, 64), block, impl="torch")
    torch.testing.assert_close(ordered_block_means(q, order, block), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [(dict(tokens_per_cluster=0), "tokens_per_cluster"),
                                           (dict(steps=1.5), "steps"), (dict(subsample=0), "subsample")])
def test_bad_knobs(gen, kwargs, match):
    q = torch.randn(1, 1, 40, 64, generator=gen)
    for fn in (cluster_order, cluster_order_torch):
        with pytest.raises(ValueError, match=f"^{match}: "):
            fn(q, **kwargs)
