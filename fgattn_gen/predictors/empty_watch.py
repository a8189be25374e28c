"""A warning, without a host sync, when a predictor's knob leaves every query block without keys (an
all-zero output): the check is enqueued on the device and read once the device has passed it, at the next
prediction (on the CPU: at once). Each predictor warns once per process."""

from __future__ import annotations

import warnings

import torch

from ..keyset import KeySet


class EmptyWatch:
    """``watch(keys)`` after each prediction; warns once (naming ``knob``) when a watched KeySet was empty."""

    def __init__(self, predictor: str, knob: str):
        self.predictor, self.knob = predictor, knob
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None, str]] = []
        self._warned = False

    def watch(self, keys: KeySet, setting: str) -> None:
        """Check ``keys`` (made with the knob value ``setting``): any selected key at all?"""
        if self._warned:
            return
        self._report_finished()
        empty = keys.bits.eq(0).all()
        event = None
        if empty.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(empty, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            empty = host
        self._pending.append((empty, event, setting))
        self._report_finished()

    def _report_finished(self) -> None:
        still = []
        for empty, event, setting in self._pending:
            if event is not None and not event.query():
                still.append((empty, event, setting))
            elif bool(empty) and not self._warned:
                self._warned = True
                warnings.warn(f"{self.predictor}: {self.knob}={setting} kept no key for any query block (every "
                              f"output row is zero); lower {self.knob}", stacklevel=4)
        self._pending = [] if self._warned else still
