"""Clustered query blocks: an order of each head's queries in which a block of ``block_m`` holds similar ones.

Semantically similar tokens of a video DiT are scattered in raster order, so a raster block of 128 queries
mixes several content clusters and its union of keys is wide (Sparse VideoGen 2). ``cluster_order`` runs
spherical k-means on each head's queries (``S / tokens_per_cluster`` centroids, strided start, ``steps``
Lloyd steps on every ``subsample``-th query, then one assignment of every query; the assignments are
bf16/fp16 GEMMs on the tensor cores) and orders the queries by cluster,
raster order inside a cluster, so each cluster's queries fill consecutive blocks and keep their spatial
locality. The order goes into a KeySet (``KeySet.query_order``); ``attention`` gathers and scatters the rows.
"""

from __future__ import annotations

import torch

from ..compaction import workspace_budget
from ..query_order import mark_permutation

_BYTES_PER_SCORE = 4  # per (query, centroid): the bf16 score and the argmax temporaries


def cluster_order(q: torch.Tensor, *, tokens_per_cluster: int = 256, steps: int = 4,
                  subsample: int = 8) -> torch.Tensor:
    """int64 ``[B, H, Sq]``: per head a permutation of the queries, grouped by k-means cluster.

    Args:
        q: ``[B, H, Sq, D]`` bf16/fp16/fp32.
        tokens_per_cluster: queries per centroid on average (>= 1); the number of centroids is
            ``max(1, Sq // tokens_per_cluster)``.
        steps: Lloyd steps (>= 0) after the strided initialisation.
        subsample: the Lloyd steps see every ``subsample``-th query (>= 1); the final assignment sees all.
    No host synchronisation; heads run in chunks whose score matrix stays under the index workspace budget.
    """
    for name, value, low in (("tokens_per_cluster", tokens_per_cluster, 1), ("steps", steps, 0),
                             ("subsample", subsample, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    b, h, seq, d = q.shape
    n_clusters = max(1, seq // tokens_per_cluster)
    x = q.reshape(b * h, seq, d)
    on_tensor_cores = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    order = torch.empty(b * h, seq, dtype=torch.int64, device=q.device)
    chunk = max(1, workspace_budget() // max(1, seq * n_clusters * _BYTES_PER_SCORE))
    position = torch.arange(seq, device=q.device)
    for start in range(0, b * h, chunk):
        # the assignment argmax_c x . c does not depend on |x|: the points are used as they are
        points = x[start:start + chunk] if on_tensor_cores else x[start:start + chunk].float()
        centroids = _unit(points[:, position[:n_clusters] * seq // n_clusters].float())
        few = points[:, ::subsample]
        for _step in range(steps):
            assign = torch.matmul(few, centroids.to(points.dtype).transpose(1, 2)).argmax(-1)  # [n, S/sub]
            sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, d), few.float())
            centroids = torch.where(sums.norm(dim=-1, keepdim=True) > 0, _unit(sums), centroids)
        assign = torch.matmul(points, centroids.to(points.dtype).transpose(1, 2)).argmax(-1)  # [n, S]
        order[start:start + chunk] = (assign * seq + position).argsort(-1)
    return mark_permutation(order.view(b, h, seq))  # argsorts: a permutation per head


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
