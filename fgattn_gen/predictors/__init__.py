"""Training-free predictors of the keys each query block needs (they return a ``KeySet``).

- ``pooled_top_p(q, k, ...)``: mean query of each pooled group, top-p (or a threshold) over softmax(q̄ . k̄)
  (cheap, every step).
- ``exact_mask(q, k, v, ...)``: one dense pass returns the output and the exact mask of its probabilities.
- ``CachedMask``: exact masks at a few refresh steps, reused per layer and CFG branch in between.
- ``captured_mass(q, k, keys)``: per query block, the softmax mass a KeySet keeps, from a few exact rows.
- ``widen_to_mass(q, k, keys, min_mass=0.95)``: widens the blocks whose estimated mass is below min_mass.

Modules: ``pooled_top_p``, ``exact_mask``, ``cached_mask`` (the predictors); ``threshold`` (top-p search by
bisection), ``prob_threshold`` (fixed probability threshold), ``block_stats`` (exact per-block statistics of the probabilities), ``dense`` (dense pass with
LSE), ``pooling`` (group means, self-similarity, variance), ``always_keep`` (text ranges, local window), ``words``
(KeySet words built on the device), ``checks`` (argument errors naming the argument).

All of them run on the inputs' device without host synchronisation; the Triton kernels also run on the CPU
under ``TRITON_INTERPRET=1``, and without it the same functions fall back to torch ops.
"""

from .cached_mask import CachedMask
from .captured_mass import captured_mass
from .exact_mask import exact_mask
from .min_mass import widen_to_mass
from .pooled_top_p import pooled_top_p

__all__ = ["CachedMask", "captured_mass", "exact_mask", "pooled_top_p", "widen_to_mass"]
