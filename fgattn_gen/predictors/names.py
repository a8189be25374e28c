"""The table of predictor names: ``attention(..., predictor="name")`` and the diffusers integration resolve
names (and check knobs) here.

- ``"default"``: ``predict`` at every call: clustered query blocks, pooled threshold rule, captured-mass
  check (knobs: its keyword arguments).
- ``"pooled_top_p"``: ``pooled_top_p`` at every call (knobs: its keyword arguments).
- ``"cached_exact"``: ``CachedMask``: exact masks at refresh steps, reused in between (its arguments).
- ``"dense"``: every key (``KeySet.full``); no knobs.
- ``"fixed_density"``: a synthetic local mask of ``density`` (one seed per head from ``seed``), built once per
  shape: set, not predicted (benchmarks).
"""

from __future__ import annotations

import inspect
from typing import Callable

from .base import PerCall, Predictor
from .cached_mask import CachedMask
from .default import Default, predict
from .pooled_top_p import pooled_top_p
from .set_keys import SetKeys

LAYOUT = {"block_m", "block_n", "keep_keys", "scale"}  # set by the caller, not knobs


def _fixed_density(*, density=None, **rest) -> Predictor:
    if density is None:
        raise ValueError("density: fixed_density needs a key density in (0, 1], got None")
    return SetKeys(density=density, **rest)


PREDICTORS: dict[str, Callable[..., Predictor]] = {
    "default": Default,
    "pooled_top_p": lambda **knobs: PerCall(pooled_top_p, **knobs),
    "cached_exact": CachedMask,
    "dense": SetKeys,
    "fixed_density": _fixed_density,
}
_KNOBS = {
    "default": lambda: frozenset(inspect.signature(predict).parameters) - LAYOUT - {"q", "k", "return_mass"},
    "pooled_top_p": lambda: frozenset(inspect.signature(pooled_top_p).parameters) - LAYOUT - {"q", "k"},
    "cached_exact": lambda: frozenset(inspect.signature(CachedMask).parameters) - LAYOUT,
    "dense": lambda: frozenset(),
    "fixed_density": lambda: frozenset({"density", "seed"}),
}


def knob_names(name: str) -> frozenset[str]:
    """The knobs predictor ``name`` takes (besides the layout: block_m, block_n, keep_keys, scale)."""
    if name not in PREDICTORS:
        raise ValueError(f"predictor: expected one of {tuple(PREDICTORS)}, got {name!r}")
    return _KNOBS[name]()


def make_predictor(predictor, **knobs) -> Predictor:
    """A ``Predictor`` from a name in ``PREDICTORS`` (with its knobs and layout), a ``Predictor`` object,
    or a callable ``(q, k) -> KeySet``. TypeError naming the predictor for unknown knobs."""
    if isinstance(predictor, Predictor):
        return predictor
    if isinstance(predictor, str):
        allowed = knob_names(predictor) | LAYOUT
        unknown = set(knobs) - allowed
        if unknown:
            raise TypeError(f"{predictor}: unknown knob(s) {sorted(unknown)}; it takes {sorted(allowed)}")
        return PREDICTORS[predictor](**knobs)
    if callable(predictor):
        return PerCall(predictor, **knobs)
    raise ValueError(f"predictor: expected a name from {tuple(PREDICTORS)}, a Predictor or a callable "
                     f"(q, k) -> KeySet, got {predictor!r}")
