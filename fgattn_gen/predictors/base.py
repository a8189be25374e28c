"""The interface of every key predictor.

A predictor is an object with ``predict(q, k, v) -> Prediction``: the KeySet of a call and, when the
predictor computed the attention output on the way (an exact-mask refresh), that output too.
Stateful predictors (``CachedMask``) are bound to a denoising step, layer and CFG branch with
``at(step=, layer=, branch=)``; for the others ``at`` returns the predictor itself. Names resolve through
``names.make_predictor``; ``attention(..., predictor=...)`` and the diffusers integration both use it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from ..keyset import KeySet


@dataclass(frozen=True)
class Prediction:
    """The keys of one attention call; ``out`` ``[B, H, Sq, D]`` when the predictor already computed the
    output (then no sparse kernel needs to run); ``captured_mass`` fp32 ``[B, H, n_query_blocks]`` when it
    estimated the softmax mass its keys hold (``captured_mass``)."""

    keys: KeySet
    out: torch.Tensor | None = None
    captured_mass: torch.Tensor | None = None


class Predictor(ABC):
    """Base of the predictor objects: ``predict(q, k, v) -> Prediction``; ``at(...)`` binds a step.

    ``head_range``: None, or ``(first, total)`` when the calls' q heads are heads ``first ..`` of a layer of
    ``total`` heads (a rank under Ulysses context parallelism, set by the integration): calibrated knobs
    (``registry.served_knobs``) are then those of the whole layer, sliced to these heads.
    """

    head_range: tuple[int, int] | None = None

    @abstractmethod
    def predict(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prediction:
        """q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]`` -> the call's ``Prediction``."""

    def at(self, *, step: int = 0, layer: int = 0, branch: int = 0) -> "Predictor":
        """The predictor for one denoising step, layer and CFG branch (stateless predictors: itself)."""
        return self


class PerCall(Predictor):
    """A function ``fn(q, k, **knobs) -> KeySet`` run at every call (``pooled_top_p``, or any callable)."""

    def __init__(self, fn: Callable[..., KeySet], **knobs):
        self.fn, self.knobs = fn, knobs

    def predict(self, q, k, v) -> Prediction:
        keys = self.fn(q, k, **self.knobs)
        if not isinstance(keys, KeySet):
            raise TypeError(f"predictor: returned {type(keys).__name__}, expected a fgattn_gen.KeySet")
        return Prediction(keys)
