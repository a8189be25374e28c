"""``CachedMask``: exact masks computed at a few denoising steps and reused by the steps in between.

At a refresh a layer runs ``exact_mask`` (dense output + new KeySet); at the other steps the KeySet cached for
that layer (and CFG branch, unless branches share one) is reused. When a layer refreshes is its policy's call:

- ``FixedRefresh(steps)`` (``refresh_steps=``): at the given steps.
- ``AdaptiveRefresh(refresh_below, warmup=, max_age=, samples=, sync=)``: the first ``warmup`` steps are dense
  (the last of them refreshes: dense output + mask); afterwards each call first estimates, with
  ``captured_mass`` (``samples`` rows per query block, one fused pass over the keys: about ``samples / 128`` of
  a dense call's q k^T work), the softmax mass that the cached KeySet keeps on the current step's q and k, and
  compares it with the mass the same KeySet kept on the step it was made at (estimated there the same way).
  The layer's score is the lowest, over batch and heads, of that ratio of the means over query blocks; below
  ``refresh_below`` the layer refreshes, as it does when its mask is ``max_age`` steps old. The ratio, not the
  mass itself: an exact mask at a threshold keeps a fixed share of its own step's mass (0.6-0.95, depending
  on the threshold and the head), so an absolute bar would refresh a sparse mask at every step or a dense
  one never; the ratio measures what the steps since the refresh lost.

  The decision is a host-side bool. ``sync=True`` (default) reads the score at once: one host synchronisation
  per layer call at the reuse steps (it waits for the queued GPU work, then the next launches start from an
  empty queue: tens of microseconds per call against attention calls of 10-100 ms at video sizes), and a stale
  mask is never used. ``sync=False`` copies the score to pinned host memory without waiting and reads it at
  the layer's next call, which refreshes if it was low: no synchronisation, one step late (the call that
  measured the low mass still uses the stale mask), or later while the copy has not finished (the pending
  score is then the minimum of the scores since the refresh, computed on the device: a low one is never lost).

Cached KeySets can be kept on the CPU (pinned, copied back asynchronously when a layer needs its mask).
A ``Predictor``: use ``attention(q, k, v, predictor=cache.at(step=s, layer=i, branch=j))``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import torch

from ..keyset import KeySet
from . import checks
from .base import Prediction, Predictor
from .captured_mass import captured_mass
from .checks import _is_int
from .dense import dense_attention_with_lse
from .exact_mask import exact_mask

ACTIONS = ("dense", "refresh", "reuse")  # what a call did: dense output only, dense + new mask, cached mask


@dataclass(frozen=True)
class FixedRefresh:
    """Refresh at ``steps`` (a slot with no mask yet refreshes at any step)."""

    steps: frozenset

    def __post_init__(self):
        steps = tuple(self.steps) if isinstance(self.steps, Iterable) else None
        if not steps or not all(_is_int(s) and s >= 0 for s in steps):
            raise ValueError(f"refresh_steps: expected a non-empty collection of step numbers >= 0, "
                             f"got {self.steps!r}")
        object.__setattr__(self, "steps", frozenset(steps))


@dataclass(frozen=True)
class AdaptiveRefresh:
    """Refresh when the cached mask keeps too little mass on the current step (module docstring).

    Args:
        refresh_below: in (0, 1]: refresh when the cached mask keeps less than this fraction of the mass it
            kept on its own step (the layer's score, module docstring); e.g. 0.95.
        warmup: steps >= 0 computed dense at the start of a generation (step ``warmup - 1`` also builds the
            mask; 0 and 1 both refresh at step 0).
        max_age: refresh a mask this many steps (>= 1) after it was made, or None for no limit.
        samples: query rows per block of the mass estimate, >= 1.
        sync: decide at once (one host sync per reuse call) or from the previous call's score (no sync).
    """

    refresh_below: float
    warmup: int = 1
    max_age: int | None = None
    samples: int = 2
    sync: bool = True

    def __post_init__(self):
        if not checks._is_real(self.refresh_below) or not 0.0 < self.refresh_below <= 1.0:
            raise ValueError(f"refresh_below: expected a fraction in (0, 1] of the fresh mask's captured mass, "
                             f"got {self.refresh_below!r}")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise ValueError(f"warmup: expected a number of dense steps >= 0, got {self.warmup!r}")
        if self.max_age is not None and (not _is_int(self.max_age) or self.max_age < 1):
            raise ValueError(f"max_age: expected None or a number of steps >= 1, got {self.max_age!r}")
        checks.check_positive_int(self.samples, "samples")
        checks.check_bool(self.sync, "sync")


def _copy_to(keys: KeySet, device: torch.device) -> KeySet:
    """Asynchronous copy (pinned host memory when the target is the CPU and CUDA is present)."""
    if keys.device == device:
        return keys
    pin = device.type == "cpu" and torch.cuda.is_available()
    bits = torch.empty(keys.bits.shape, dtype=keys.bits.dtype, device=device, pin_memory=pin)
    bits.copy_(keys.bits, non_blocking=True)
    return KeySet(bits, keys.n_kblocks, keys.block_m, keys.block_n, keys.density_hint)


class _HostScalar:
    """A scalar tensor computed on its device, copied to pinned host memory without waiting: ``value(wait)``
    reads it, waiting for the copy only when asked to; without waiting it is None until the copy is done, so
    a caller that never waits never synchronises."""

    def __init__(self, value: torch.Tensor):
        self.source = value  # the device tensor
        self._ready = None
        if value.device.type == "cuda":
            host = torch.empty((), dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            value = host
        self._host = value

    def value(self, wait: bool = False) -> float | None:
        if self._ready is not None:
            if wait:
                self._ready.synchronize()
            elif not self._ready.query():
                return None
        return float(self._host)


def _density(keys: KeySet) -> _HostScalar:
    """A KeySet's density (read with ``value()``: None until known; 0 for an empty KeySet)."""
    b, h, nq, nk = keys.shape
    return _HostScalar(keys.counts().sum(dtype=torch.float64) / (b * h * nq * nk))


@dataclass
class _Entry:
    keys: KeySet
    step: int  # the step whose dense pass produced the mask
    density: _HostScalar  # of the KeySet
    fresh: torch.Tensor | None = None  # adaptive: fp32 [B, H] mean captured mass on the step it was made at
    pending: _HostScalar | None = None  # sync=False: the lowest score since the refresh, read at the next call


class CachedMask(Predictor):
    """Per-layer (and per-CFG-branch) exact masks with a refresh policy.

    Args:
        refresh_steps: ``FixedRefresh``'s steps: every layer recomputes its mask with a dense pass at these
            denoising steps. Give this or ``policy``.
        policy: ``FixedRefresh`` or ``AdaptiveRefresh`` (module docstring). A layer with no cached mask
            always refreshes (or, during an adaptive warm-up, runs dense).
        share_branches: one mask per layer for all CFG branches (the first branch to reach a refresh step
            computes it).
        offload: keep cached masks on the CPU between uses.
        block_m, block_n, threshold, top_p, keep_keys, local_window, scale, score_precision: as in
            ``exact_mask``; ``scale`` is also the sparse steps' softmax scale.

    Use ``attention(q, k, v, predictor=cache.at(step=s, layer=i, branch=j))`` in place of the attention call;
    ``history(layer, branch)`` lists what each call of a slot did.
    """

    def __init__(self, refresh_steps: Iterable[int] | None = None, *,
                 policy: FixedRefresh | AdaptiveRefresh | None = None, share_branches: bool = False,
                 offload: bool = False, block_m: int = 128, block_n: int = 1, threshold: float | None = None,
                 top_p: float | None = None, keep_keys=None, local_window: int | None = None,
                 scale: float | None = None, score_precision: str = "auto"):
        if (refresh_steps is None) == (policy is None):
            raise ValueError("refresh_steps, policy: give refresh_steps (a fixed schedule) or policy "
                             "(FixedRefresh / AdaptiveRefresh), not both and not neither")
        if policy is None:
            policy = FixedRefresh(refresh_steps)
        elif not isinstance(policy, (FixedRefresh, AdaptiveRefresh)):
            raise TypeError(f"policy: expected a FixedRefresh or AdaptiveRefresh, got {type(policy).__name__}")
        self.policy = policy
        self.share_branches = bool(share_branches)
        self.offload_masks = bool(offload)
        self.scale = scale
        self.mask_options = dict(block_m=block_m, block_n=block_n, threshold=threshold, top_p=top_p,
                                 keep_keys=keep_keys, local_window=local_window, scale=scale,
                                 score_precision=score_precision)
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._last_step: dict[tuple[int, int], int] = {}
        self._history: dict[tuple[int, int], list[tuple[int, str]]] = {}

    @property
    def refresh_steps(self) -> frozenset | None:
        """The fixed schedule's steps (None for an adaptive policy)."""
        return self.policy.steps if isinstance(self.policy, FixedRefresh) else None

    def _slot(self, layer: int, branch: int) -> tuple[int, int]:
        if not _is_int(layer) or not _is_int(branch):
            raise TypeError(f"layer, branch: expected ints, got {layer!r}, {branch!r}")
        return layer, 0 if self.share_branches else branch

    def _plan(self, step: int, slot: tuple[int, int]) -> str:
        """``"dense"``, ``"refresh"``, ``"reuse"`` or ``"check"`` (adaptive: reuse unless the mass is low)."""
        entry = self._entries.get(slot)
        if entry is not None and step < self._last_step.get(slot, step):
            entry = None  # a new generation
        policy = self.policy
        if isinstance(policy, FixedRefresh):
            return "refresh" if entry is None or (step in policy.steps and entry.step != step) else "reuse"
        if step < policy.warmup - 1:
            return "dense"
        if entry is None or step == policy.warmup - 1:
            return "refresh" if entry is None or entry.step != step else "reuse"
        if entry.step == step:
            return "reuse"  # another branch made it at this step
        if policy.max_age is not None and step - entry.step >= policy.max_age:
            return "refresh"
        if not policy.sync and entry.pending is not None:
            score = entry.pending.value(wait=False)
            if score is not None and score < policy.refresh_below:
                return "refresh"
        return "check"

    def needs_refresh(self, step: int, layer: int, branch: int = 0) -> bool:
        """Whether the slot computes dense at ``step`` whatever q and k are: it has no mask yet (or ``step``
        is earlier than its last one: a new generation; ``reset()`` says so explicitly), ``step`` is a fixed
        refresh step its mask was not made at, an adaptive warm-up step, the mask reached ``max_age``, or
        (``sync=False``) the previous call's score was low. An adaptive policy's mass check may still refresh
        a call for which this is False."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step: expected a step number >= 0, got {step!r}")
        return self._plan(step, self._slot(layer, branch)) in ("dense", "refresh")

    def at(self, *, step: int = 0, layer: int = 0, branch: int = 0) -> Predictor:
        """This cache at one denoising step, layer and CFG branch (``needs_refresh`` says what it will do)."""
        return _CacheSlot(self, step, layer, branch)

    def predict(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prediction:
        """``at()`` (step 0, layer 0, branch 0)."""
        return self.at().predict(q, k, v)

    def lookup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, step: int, layer: int,
               branch: int = 0) -> Prediction:
        """The cached KeySet of the slot on q's device (with the captured-mass estimate when the policy
        checked it); at a refresh, the new one and the dense output; during an adaptive warm-up, a full
        KeySet and the dense output."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step: expected a step number >= 0, got {step!r}")
        slot = self._slot(layer, branch)
        action = self._plan(step, slot)
        if step < self._last_step.get(slot, step):
            self._entries.pop(slot, None)
            self._history.pop(slot, None)
        self._last_step[slot] = step
        mass = checked = None
        if action == "check":
            entry = self._entries[slot]
            checked = _copy_to(entry.keys, q.device)
            mass = captured_mass(q, k, checked, samples=self.policy.samples, scale=self.scale)
            ratio = (mass.mean(-1) / entry.fresh.to(mass.device)).amin()
            if entry.pending is not None:  # sync=False, the previous score not read yet: neither is lost
                ratio = torch.minimum(ratio, entry.pending.source.to(ratio.device))
            score = _HostScalar(ratio)
            if self.policy.sync:
                low = score.value(wait=True) < self.policy.refresh_below
                action = "refresh" if low else "reuse"
            else:
                entry.pending, action = score, "reuse"
        self._history.setdefault(slot, []).append((step, action))
        if action == "dense":
            b, h, seq_q, d = q.shape
            out, _ = dense_attention_with_lse(q, k, v, checks.check_scale(self.scale, d))
            return Prediction(KeySet.full(b, h, seq_q, k.shape[2], block_m=self.mask_options["block_m"],
                                          block_n=self.mask_options["block_n"], device=q.device), out)
        if action == "refresh":
            out, keys = exact_mask(q, k, v, **self._served(q, k, layer))
            stored = _copy_to(keys, torch.device("cpu")) if self.offload_masks else keys
            fresh = None
            if isinstance(self.policy, AdaptiveRefresh):
                mass = captured_mass(q, k, keys, samples=self.policy.samples, scale=self.scale)
                fresh = mass.mean(-1).clamp_min(torch.finfo(torch.float32).tiny)
            self._entries[slot] = _Entry(stored, step, _density(keys), fresh)
            return Prediction(keys, out)
        entry = self._entries[slot]
        keys = checked if checked is not None else _copy_to(entry.keys, q.device)
        return Prediction(replace(keys, density_hint=entry.density.value() or None), captured_mass=mass)

    def history(self, layer: int, branch: int = 0) -> list[tuple[int, str]]:
        """``(step, action)`` of every call of the slot in this generation, action in ``ACTIONS``."""
        return list(self._history.get(self._slot(layer, branch), ()))

    def _served(self, q: torch.Tensor, k: torch.Tensor, layer: int) -> dict:
        """``mask_options``, with the calibrated per-head ``threshold`` of ``layer`` the registry serves for
        this shape (``registry.served_knobs``) when neither ``threshold`` nor ``top_p`` was given."""
        options = self.mask_options
        if options["threshold"] is not None or options["top_p"] is not None or q.device.type not in ("cpu", "cuda"):
            return options
        from ..registry import served_knobs

        served = served_knobs(device=q.device, predictor="cached_exact", heads=q.shape[1], seq_q=q.shape[2],
                              seq_k=k.shape[2], head_dim=q.shape[3], block_m=options["block_m"],
                              block_n=options["block_n"], layer=layer, head_range=self.head_range)
        return options if served is None else {**options, "threshold": served["threshold"]}

    def keys(self, layer: int, branch: int = 0) -> KeySet | None:
        """The cached KeySet of a layer (and branch), wherever it lives, or None."""
        entry = self._entries.get(self._slot(layer, branch))
        return entry.keys if entry is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes of all cached KeySets."""
        return sum(e.keys.nbytes for e in self._entries.values())

    def memory_report(self) -> dict:
        """``{"masks": n, "bytes": total, "bytes_by_device": {device: bytes}}`` of the cached KeySets."""
        by_device: dict[str, int] = {}
        for e in self._entries.values():
            by_device[str(e.keys.device)] = by_device.get(str(e.keys.device), 0) + e.keys.nbytes
        return {"masks": len(self._entries), "bytes": self.nbytes, "bytes_by_device": by_device}

    def offload(self) -> None:
        """Move every cached KeySet to the CPU; later ones go there too."""
        self.offload_masks = True
        for e in self._entries.values():
            e.keys = _copy_to(e.keys, torch.device("cpu"))

    def restore(self, device: torch.device | str) -> None:
        """Move every cached KeySet to ``device``; later ones stay on the inputs' device."""
        self.offload_masks = False
        for e in self._entries.values():
            e.keys = _copy_to(e.keys, torch.device(device))

    def clear(self) -> None:
        """Forget every cached mask (the next call of each layer refreshes)."""
        self._entries.clear()
        self._last_step.clear()
        self._history.clear()

    def reset(self) -> None:
        """Start a new generation: every layer refreshes at its next call."""
        self.clear()


class _CacheSlot(Predictor):
    """A ``CachedMask`` bound to one step, layer and branch."""

    def __init__(self, cache: CachedMask, step: int, layer: int, branch: int):
        self.cache, self.step, self.layer, self.branch = cache, step, layer, branch

    def predict(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prediction:
        return self.cache.lookup(q, k, v, step=self.step, layer=self.layer, branch=self.branch)
