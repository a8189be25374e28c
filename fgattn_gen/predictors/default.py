"""The default per-call predictor, ``predict``: clustered query blocks, pooled scores, and a check of what
it keeps.

1. ``cluster_order``: each head's queries ordered by k-means cluster, so a block of ``block_m`` holds similar
   queries (``KeySet.query_order``; ``attention`` gathers and scatters the rows).
2. ``pooled_top_p`` with the threshold rule on the ordered queries: the mean query of each block scores every
   key (one fused pass, scores never written) and keeps the keys whose pooled probability exceeds
   ``threshold`` (default ``threshold_scale / Sk``). No similarity gate: a clustered block's mean query is
   representative.
3. ``captured_mass`` of ``samples`` sampled rows of each block (one fused pass): a block whose estimate is below
   ``min_mass`` keeps every key, so the call cannot silently lose most of a block's attention.

Everything runs on q's device without host synchronisation.
"""

from __future__ import annotations

import torch

from ..keyset import KeySet
from . import checks
from .base import Prediction, Predictor
from .captured_mass import captured_mass
from .min_mass import check_min_mass
from .pooled_top_p import pooled_top_p
from .query_clusters import cluster_order
from .threshold_rule import head_thresholds
from .words import full_row_words


def predict(q: torch.Tensor, k: torch.Tensor, *, block_m: int = 128, block_n: int = 1,
            threshold_scale: float | list[float] = 1.5, tokens_per_cluster: int | None = 256, cluster_steps: int = 4,
            min_mass: float | None = 0.3, samples: int = 2,
            keep_keys: tuple[int, int] | list[tuple[int, int]] | None = None, scale: float | None = None,
            return_mass: bool = False) -> KeySet | tuple[KeySet, torch.Tensor | None]:
    """Predict each (clustered) query block's keys; see the module docstring.

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Sk, D]``; bf16/fp16 (fp32 on the CPU), D in {64, 128}.
        block_m, block_n: the KeySet layout.
        threshold_scale: keep keys whose pooled probability exceeds ``threshold_scale / Sk`` (> 0; larger:
            sparser); or a list (1-D tensor) of H such values, one per head (``calibrate``).
        tokens_per_cluster: queries per k-means centroid, or None for raster query blocks (no permutation).
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
    threshold = head_thresholds(threshold_scale, q.shape[1], "threshold_scale", upper=k.shape[2]) / k.shape[2]
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.tolist()
    if min_mass is not None:
        min_mass = check_min_mass(min_mass)
    samples = checks.check_positive_int(samples, "samples")
    order = None if tokens_per_cluster is None else cluster_order(q, tokens_per_cluster=tokens_per_cluster,
                                                                   steps=cluster_steps)
    ordered = q if order is None else q.gather(2, order[..., None].expand(-1, -1, -1, q.shape[-1]))
    keys = pooled_top_p(ordered, k, block_m=block_m, block_n=block_n, threshold=threshold,
                        sim_threshold=-1.0, pool=block_m, keep_keys=keep_keys, scale=scale)
    keys = KeySet(keys.bits, keys.n_kblocks, block_m, block_n, query_order=order)
    mass = None
    if min_mass is not None:
        mass = captured_mass(q, k, keys, samples=samples, scale=scale)
        low = (mass < min_mass)[..., None]
        full = full_row_words(keys.n_kblocks, keys.device)
        keys = KeySet(torch.where(low, full, keys.bits), keys.n_kblocks, block_m, block_n, query_order=order)
    return (keys, mass) if return_mass else keys


class Default(Predictor):
    """``predict`` as a ``Predictor`` (``attention(q, k, v, predictor="default")``): the KeySet and the
    captured-mass estimate of each call. Without an explicit ``threshold_scale`` it takes the calibrated
    knobs the registry serves for this shape (``registry.served_knobs``; of the layer bound by ``at(layer=)``,
    else ``"*"``), under the knobs given here; with none served, ``predict``'s defaults."""

    def __init__(self, **knobs):
        self.knobs = knobs
        self.layer: int | None = None

    def at(self, *, step: int = 0, layer: int = 0, branch: int = 0) -> "Default":
        bound = Default(**self.knobs)
        bound.layer = layer
        return bound

    def predict(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prediction:
        knobs = self.knobs
        if "threshold_scale" not in knobs and q.device.type in ("cpu", "cuda") and q.dim() == 4 and k.dim() == 4:
            from ..registry import served_knobs

            served = served_knobs(device=q.device, predictor="default", heads=q.shape[1], seq_q=q.shape[2],
                                  seq_k=k.shape[2], head_dim=q.shape[3], block_m=knobs.get("block_m", 128),
                                  block_n=knobs.get("block_n", 1), layer=self.layer)
            knobs = {**served, **knobs} if served else knobs
        keys, mass = predict(q, k, return_mass=True, **knobs)
        return Prediction(keys, captured_mass=mass)
