"""The default per-call predictor, ``predict``: clustered query blocks, pooled scores, and a check of what
it keeps.

1. ``cluster_order``: each head's queries ordered by k-means cluster, so a block of ``block_m`` holds similar
   queries (``KeySet.query_order``; ``attention`` gathers and scatters the rows). Per head, the raster order is
   kept instead where its blocks are more coherent (``coherent_blocks``: local and positional heads, whose
   neighbours in the sequence are their neighbours in q).
2. The threshold rule of ``pooled_top_p`` on the ordered blocks: the mean query of each block
   (``ordered_block_means``: q read through the order, never gathered) scores every key (fused passes, scores
   never written) and keeps the keys whose pooled probability exceeds ``threshold`` (default
   ``threshold_scale / Sk``). No similarity gate: a clustered block's mean query is representative.
3. ``captured_mass`` of ``samples`` sampled rows of each block (fused; the rows read through the order): a block
   whose estimate is below ``min_mass`` keeps every key (in the same kernel on the fused path), so the call
   cannot silently lose most of a block's attention.

Everything runs on q's device without host synchronisation; on CUDA about 20 kernel launches
(``bench/predict_stages.py`` times each stage).
"""

from __future__ import annotations

import functools

import torch

from ..keyset import KeySet
from . import checks
from .always_keep import always_keep_words
from .base import Prediction, Predictor
from .captured_mass import captured_mass, fused_mass, sample_rows
from .empty_watch import EmptyWatch
from .mass_kernel import runs_fused
from .min_mass import check_min_mass
from .pooling import group_mean
from .query_clusters import cluster_order, ordered_block_means
from .threshold_rule import device_thresholds, pooled_threshold_words
from .words import full_row_words

_EMPTY = EmptyWatch("predict", "threshold_scale")


def predict(q: torch.Tensor, k: torch.Tensor, *, block_m: int = 128, block_n: int = 1,
            threshold_scale: float | list[float] = 1.5, tokens_per_cluster: int | None = 256, cluster_steps: int = 4,
            min_mass: float | None = 0.3, samples: int = 2,
            keep_keys: tuple[int, int] | list[tuple[int, int]] | None = None, scale: float | None = None,
            return_mass: bool = False) -> KeySet | tuple[KeySet, torch.Tensor | None]:
    """Predict each (clustered) query block's keys; see the module docstring.

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Sk, D]``; bf16/fp16 (fp32 on the CPU), D in {64, 128}.
        block_m, block_n: the KeySet layout.
        threshold_scale: keep keys whose pooled probability exceeds ``threshold_scale / Sk`` (in (0, Sk]; larger:
            sparser), or a list of H such values (one per head: what ``calibrate`` picks).
        tokens_per_cluster: queries per k-means centroid (each head then takes the k-means or the raster order,
            whichever makes more coherent blocks), or None for raster query blocks (no permutation).
        cluster_steps: Lloyd steps of the clustering.
        min_mass: in (0, 1], or None for no check: blocks whose estimated captured mass is below it keep
            every key.
        samples: sampled rows per block of the mass estimate (>= 1).
        keep_keys: key ranges every block keeps (e.g. the text tokens), as in ``pooled_top_p``.
        scale: softmax scale, default ``D ** -0.5``.
        return_mass: also return the estimate fp32 ``[B, H, n_qblocks]`` (None without ``min_mass``), taken
            before widening.
    Returns:
        KeySet ``[B, H, ceil(Sq/block_m), ceil(Sk/block_n)]`` with ``query_order`` (unless
        ``tokens_per_cluster`` is None), and with ``return_mass`` the estimate.
    """
    checks.check_tensors(q=q, k=k)
    block_m = checks.check_positive_int(block_m, "block_m")
    block_n = checks.check_positive_int(block_n, "block_n")
    threshold = device_thresholds(threshold_scale, q.shape[1], q.device, name="threshold_scale", upper=k.shape[2],
                                  divisor=k.shape[2])
    if min_mass is not None:
        min_mass = check_min_mass(min_mass)
    samples = checks.check_positive_int(samples, "samples")
    b, h, seq_q, d = q.shape
    seq_k = k.shape[2]
    keep_keys = checks.check_keep_keys(keep_keys, seq_k)
    scale = checks.check_scale(scale, d)
    impl = checks.resolve_impl(None, q.device)
    n_qblocks, n_kblocks = -(-seq_q // block_m), -(-seq_k // block_n)
    if tokens_per_cluster is None:
        order = None
        q_mean = group_mean(q.reshape(b * h, seq_q, d), block_m, impl=impl)
    else:
        clustered = cluster_order(q, tokens_per_cluster=tokens_per_cluster, steps=cluster_steps)
        order, q_mean = coherent_blocks(q, clustered, block_m)
    words = []
    for bi in range(b):  # k[bi] is a view for any strides of k
        k_mean = k[bi] if block_n == 1 else group_mean(k[bi], block_n, impl=impl)
        words.append(pooled_threshold_words(q_mean[bi * h:(bi + 1) * h], k_mean, scale, threshold,
                                            rows_per_block=1, n_blocks=n_qblocks, impl=impl, dtype=q.dtype))
    bits = words[0][None] if b == 1 else torch.stack(words)
    extra = _always_keep(seq_q, seq_k, block_m, block_n, keep_keys, q.device)
    if extra is not None:
        bits |= extra
    keys = KeySet(bits, n_kblocks, block_m, block_n, query_order=order)
    mass = None
    if min_mass is None:
        _EMPTY.watch(keys, str(threshold_scale))
    elif runs_fused(q):  # estimate, and make the blocks below min_mass dense in place, in one pass
        rows, weights = _fixed_rows(seq_q, block_m, samples, q.device)
        mass = fused_mass(q, k, keys, rows, weights, scale=scale, min_mass=min_mass)
    else:
        mass = captured_mass(q, k, keys, samples=samples, scale=scale)
        low = (mass < min_mass)[..., None]
        keys = KeySet(torch.where(low, full_row_words(n_kblocks, q.device), bits), n_kblocks, block_m, block_n,
                      query_order=order)
    return (keys, mass) if return_mass else keys


def coherent_blocks(q: torch.Tensor, clustered: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the query order whose blocks of ``block_m`` are more coherent: ``clustered`` or the raster order,
    whichever has the larger between-block scatter ``sum_b n_b |mean_b|^2`` (the heads' total scatter minus the
    within-block scatter, which a block's mean query cannot represent: k-means' own objective, at block
    granularity). No host synchronisation.

    Args:
        q: ``[B, H, Sq, D]``; clustered: int64 ``[B, H, Sq]``, a permutation of each head's rows.
    Returns:
        order int64 ``[B, H, Sq]`` (the raster rows ``arange(Sq)`` for the heads that keep them) and the block
        means fp32 ``[B * H, ceil(Sq / block_m), D]`` of that order.
    """
    b, h, seq_q, _ = q.shape
    raster = _raster_order(b, h, seq_q, q.device)
    means = ordered_block_means(q, clustered, block_m)
    raster_means = ordered_block_means(q, raster, block_m)
    counts = (seq_q - torch.arange(means.shape[1], device=q.device) * block_m).clamp_max(block_m)

    def between(m: torch.Tensor) -> torch.Tensor:
        return (m.square().sum(-1) * counts).sum(-1)

    use_clusters = between(means) > between(raster_means)  # [B * H]
    order = torch.where(use_clusters.view(b, h, 1), clustered, raster)
    return order, torch.where(use_clusters[:, None, None], means, raster_means)


def _raster_order(b: int, h: int, seq_q: int, device: torch.device) -> torch.Tensor:
    """int64 ``[B, H, Sq]`` contiguous: ``arange(Sq)`` per head, made once per shape and device (23 MB at
    HunyuanVideo 720p), except while a CUDA graph is captured."""
    if _capturing(device):
        return torch.arange(seq_q, device=device).expand(b, h, seq_q).contiguous()
    return _cached_raster(b, h, seq_q, device)


@functools.lru_cache(maxsize=8)
def _cached_raster(b, h, seq_q, device):
    return torch.arange(seq_q, device=device).expand(b, h, seq_q).contiguous()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fixed_rows(seq_q: int, block_m: int, samples: int, device: torch.device):
    """``sample_rows`` without a generator (a pure function of its arguments): made once per shape and device,
    not on every call (about 15 small kernels), except while a CUDA graph is captured."""
    if _capturing(device):
        return sample_rows(seq_q, block_m, samples, device)
    return _cached_rows(seq_q, block_m, samples, device)


@functools.lru_cache(maxsize=32)
def _cached_rows(seq_q, block_m, samples, device):
    return sample_rows(seq_q, block_m, samples, device)


def _always_keep(seq_q, seq_k, block_m, block_n, keep_keys, device):
    """``always_keep_words`` for ``keep_keys`` (no local window), cached per shape like ``_fixed_rows``."""
    if not keep_keys:
        return None
    if _capturing(device):
        return always_keep_words(seq_q=seq_q, seq_k=seq_k, block_m=block_m, block_n=block_n, keep_keys=keep_keys,
                                 local_window=None, device=device)
    return _cached_keep(seq_q, seq_k, block_m, block_n, keep_keys, device)


@functools.lru_cache(maxsize=32)
def _cached_keep(seq_q, seq_k, block_m, block_n, keep_keys, device):
    return always_keep_words(seq_q=seq_q, seq_k=seq_k, block_m=block_m, block_n=block_n, keep_keys=keep_keys,
                             local_window=None, device=device)


class Default(Predictor):
    """``predict`` as a ``Predictor`` (``attention(q, k, v, predictor="default")``): the KeySet and the
    captured-mass estimate of each call. Without an explicit ``threshold_scale`` it takes the calibrated
    knobs the registry serves for this shape (``registry.served_knobs``; of the layer bound by ``at(layer=)``,
    else ``"*"``), under the knobs given here; with none served, ``predict``'s defaults."""

    def __init__(self, **knobs):
        self.knobs = knobs
        self.layer: int | None = None

    def at(self, *, step: int = 0, layer: int = 0, branch: int = 0) -> "Default":
        """This predictor bound to ``layer`` (whose calibrated knobs it takes); step and branch do not matter."""
        bound = Default(**self.knobs)
        bound.layer, bound.head_range = layer, self.head_range
        return bound

    def predict(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prediction:
        knobs = self.knobs
        if "threshold_scale" not in knobs and q.device.type in ("cpu", "cuda") and q.dim() == 4 and k.dim() == 4:
            from ..registry import served_knobs

            served = served_knobs(device=q.device, predictor="default", heads=q.shape[1], seq_q=q.shape[2],
                                  seq_k=k.shape[2], head_dim=q.shape[3], block_m=knobs.get("block_m", 128),
                                  block_n=knobs.get("block_n", 1), layer=self.layer, head_range=self.head_range)
            knobs = {**served, **knobs} if served else knobs
        keys, mass = predict(q, k, return_mass=True, **knobs)
        return Prediction(keys, captured_mass=mass)
