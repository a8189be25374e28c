"""``CachedMask``: exact masks computed at a few denoising steps and reused by the steps in between.

At a refresh step a layer runs ``exact_mask`` (dense output + new KeySet); at the other steps the KeySet cached
for that layer (and CFG branch, unless branches share one) is reused. Cached KeySets can be kept on the CPU
(pinned, copied back asynchronously when a layer needs its mask). A ``Predictor``: use
``attention(q, k, v, predictor=cache.at(step=s, layer=i, branch=j))``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import torch

from ..keyset import KeySet
from .base import Prediction, Predictor
from .checks import _is_int
from .exact_mask import exact_mask


def _copy_to(keys: KeySet, device: torch.device) -> KeySet:
    """Asynchronous copy (pinned host memory when the target is the CPU and CUDA is present)."""
    if keys.device == device:
        return keys
    pin = device.type == "cpu" and torch.cuda.is_available()
    bits = torch.empty(keys.bits.shape, dtype=keys.bits.dtype, device=device, pin_memory=pin)
    bits.copy_(keys.bits, non_blocking=True)
    return KeySet(bits, keys.n_kblocks, keys.block_m, keys.block_n, keys.density_hint)


class _Density:
    """A KeySet's density, computed on its device and copied to pinned host memory without waiting: read
    only once the copy has finished (``value``), so no call ever synchronises for it."""

    def __init__(self, keys: KeySet):
        b, h, nq, nk = keys.shape
        fraction = keys.counts().sum(dtype=torch.float64) / (b * h * nq * nk)
        self._ready = None
        if keys.device.type == "cuda":
            host = torch.empty((), dtype=torch.float64, pin_memory=True)
            host.copy_(fraction, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            fraction = host
        self._host = fraction

    def value(self) -> float | None:
        """The density once known (None before the copy finished, or for an empty KeySet)."""
        if self._ready is not None and not self._ready.query():
            return None
        density = float(self._host)
        return density if density > 0 else None


@dataclass
class _Entry:
    keys: KeySet
    step: int  # the step whose dense pass produced the mask
    density: _Density


class CachedMask(Predictor):
    """Per-layer (and per-CFG-branch) exact masks with a refresh schedule.

    Args:
        refresh_steps: denoising steps at which every layer recomputes its mask with a dense pass. A layer
            with no cached mask yet also refreshes.
        share_branches: one mask per layer for all CFG branches (the first branch to reach a refresh step
            computes it).
        offload: keep cached masks on the CPU between uses.
        block_m, block_n, threshold, top_p, keep_keys, local_window, scale, score_precision: as in
            ``exact_mask``; ``scale`` is also the sparse steps' softmax scale.

    Use ``attention(q, k, v, predictor=cache.at(step=s, layer=i, branch=j))`` in place of the attention call.
    """

    def __init__(self, refresh_steps: Iterable[int], *, share_branches: bool = False, offload: bool = False,
                 block_m: int = 128, block_n: int = 1, threshold: float | None = None, top_p: float | None = None,
                 keep_keys=None, local_window: int | None = None, scale: float | None = None,
                 score_precision: str = "auto"):
        steps = tuple(refresh_steps) if isinstance(refresh_steps, Iterable) else None
        if not steps or not all(_is_int(s) and s >= 0 for s in steps):
            raise ValueError(f"refresh_steps: expected a non-empty collection of step numbers >= 0, "
                             f"got {refresh_steps!r}")
        self.refresh_steps = frozenset(steps)
        self.share_branches = bool(share_branches)
        self.offload_masks = bool(offload)
        self.scale = scale
        self.mask_options = dict(block_m=block_m, block_n=block_n, threshold=threshold, top_p=top_p,
                                 keep_keys=keep_keys, local_window=local_window, scale=scale,
                                 score_precision=score_precision)
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._last_step: dict[tuple[int, int], int] = {}

    def _slot(self, layer: int, branch: int) -> tuple[int, int]:
        if not _is_int(layer) or not _is_int(branch):
            raise TypeError(f"layer, branch: expected ints, got {layer!r}, {branch!r}")
        return layer, 0 if self.share_branches else branch

    def needs_refresh(self, step: int, layer: int, branch: int = 0) -> bool:
        """Whether the slot runs the dense refresh pass at ``step``: it has no mask yet, ``step`` is a refresh
        step its mask was not made at, or ``step`` is earlier than the slot's last one (a new generation;
        ``reset()`` says so explicitly)."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step: expected a step number >= 0, got {step!r}")
        slot = self._slot(layer, branch)
        entry = self._entries.get(slot)
        return (entry is None or step < self._last_step.get(slot, step)
                or (step in self.refresh_steps and entry.step != step))

    def at(self, *, step: int = 0, layer: int = 0, branch: int = 0) -> Predictor:
        """This cache at one denoising step, layer and CFG branch (``needs_refresh`` says what it will do)."""
        return _CacheSlot(self, step, layer, branch)

    def predict(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prediction:
        """``at()`` (step 0, layer 0, branch 0)."""
        return self.at().predict(q, k, v)

    def lookup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, step: int, layer: int,
               branch: int = 0) -> Prediction:
        """The cached KeySet of the slot on q's device; at a refresh, the new one and the dense output."""
        slot = self._slot(layer, branch)
        refresh = self.needs_refresh(step, layer, branch)
        self._last_step[slot] = step
        if refresh:
            out, keys = exact_mask(q, k, v, **self._served(q, k, layer))
            stored = _copy_to(keys, torch.device("cpu")) if self.offload_masks else keys
            self._entries[slot] = _Entry(stored, step, _Density(keys))
            return Prediction(keys, out)
        entry = self._entries[slot]
        return Prediction(replace(_copy_to(entry.keys, q.device), density_hint=entry.density.value()))

    def _served(self, q: torch.Tensor, k: torch.Tensor, layer: int) -> dict:
        """``mask_options``, with the calibrated per-head ``threshold`` of ``layer`` the registry serves for
        this shape (``registry.served_knobs``) when neither ``threshold`` nor ``top_p`` was given."""
        options = self.mask_options
        if options["threshold"] is not None or options["top_p"] is not None or q.device.type not in ("cpu", "cuda"):
            return options
        from ..registry import served_knobs

        served = served_knobs(device=q.device, predictor="cached_exact", heads=q.shape[1], seq_q=q.shape[2],
                              seq_k=k.shape[2], head_dim=q.shape[3], block_m=options["block_m"],
                              block_n=options["block_n"], layer=layer)
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

    def reset(self) -> None:
        """Start a new generation: every layer refreshes at its next call."""
        self.clear()


class _CacheSlot(Predictor):
    """A ``CachedMask`` bound to one step, layer and branch."""

    def __init__(self, cache: CachedMask, step: int, layer: int, branch: int):
        self.cache, self.step, self.layer, self.branch = cache, step, layer, branch

    def predict(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prediction:
        return self.cache.lookup(q, k, v, step=self.step, layer=self.layer, branch=self.branch)
