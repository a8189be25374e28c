"""Training-free predictors of the keys each query block needs.

Every predictor is a ``Predictor`` (``base``): ``predict(q, k, v) -> Prediction`` (a ``KeySet``, and the
output when the predictor computed it); ``names.make_predictor`` resolves the names ``attention(...,
predictor="name")`` and the diffusers integration take (``PREDICTORS``).

- ``predict(q, k, ...)``: the default (``"default"``): clustered query blocks (``query_clusters``), the pooled
  threshold rule, and blocks whose ``captured_mass`` estimate is below ``min_mass`` made dense.
- ``pooled_top_p(q, k, ...)``: mean query of each pooled group, top-p (or a threshold) over softmax(q̄ . k̄)
  (cheap, every step).
- ``exact_mask(q, k, v, ...)``: one dense pass returns the output and the exact mask of its probabilities.
- ``CachedMask``: exact masks refreshed at fixed steps (``FixedRefresh``) or when the cached mask keeps too
  little mass (``AdaptiveRefresh``), reused per layer and CFG branch in between.
- ``SetKeys``: every key, or a synthetic local mask of a density (benchmarks).
- ``captured_mass(q, k, keys)``: per query block, the softmax mass a KeySet keeps, from a few exact rows.
- ``widen_to_mass(q, k, keys, min_mass=0.95)``: widens the blocks whose estimated mass is below min_mass.
- ``calibrate(samples, target_error=...)``: per-layer, per-head threshold knobs that reach a target output
  error at the least density (``calibration``; served from the tuned YAML by the registry).

Kernels and helpers: ``top_p_search`` (top-p threshold by bisection), ``threshold_rule`` (fixed probability
threshold, fused Triton kernel), ``block_stats`` (exact per-block statistics of the probabilities), ``dense``
(dense pass with LSE), ``pooling`` (group means, self-similarity, variance), ``always_keep`` (text ranges,
local window), ``words`` (KeySet words built on the device), ``checks`` (argument errors naming the argument).

All of them run on the inputs' device without host synchronisation; the Triton kernels also run on the CPU
under ``TRITON_INTERPRET=1``, and without it the same functions fall back to torch ops.
"""

from .base import PerCall, Prediction, Predictor
from .cached_mask import AdaptiveRefresh, CachedMask, FixedRefresh
from .calibration import Calibration, UnreachableTarget, calibrate
from .captured_mass import captured_mass
from .default import predict
from .exact_mask import exact_mask
from .min_mass import widen_to_mass
from .names import PREDICTORS, knob_names, make_predictor
from .pooled_top_p import pooled_top_p
from .query_clusters import cluster_order
from .set_keys import SetKeys

__all__ = ["AdaptiveRefresh", "CachedMask", "Calibration", "FixedRefresh", "PREDICTORS", "PerCall", "Prediction", "Predictor",
           "SetKeys", "UnreachableTarget", "calibrate", "captured_mass", "cluster_order", "exact_mask", "knob_names",
           "make_predictor", "pooled_top_p", "predict", "widen_to_mass"]
