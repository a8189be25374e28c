"""The Optuna objective: one trial = one candidate variant on one workload, checked, then timed.

- The process running the trial goes to user attrs ``worker_pid``, ``worker_host``, ``worker_token`` first
  (``storage.this_process``; ``study.recover_stale_trials`` reads them after a crash).
- The variant is sampled from the SearchSpace; its key goes to user attr ``variant``.
- If a finished trial of the study already evaluated that variant (TPE may sample a point again, a resumed
  or parallel run may race on one), its result is reused and nothing is launched; a variant that crashed
  the CUDA context before is pruned without being launched again.
- A compile or launch failure (``triton.TritonError``: OutOfResources, CompilationError, PTXASError...;
  ``RuntimeError``: CUDA out of memory...) or a wrong result (NaN, or rel-L2 >= ``REL_L2_LIMIT`` on the
  checked slice) prunes the trial with the reason in user attr ``pruned_reason``: samplers rank it as
  bad and the study goes on.
- An error that poisons the CUDA context (illegal address, launch failure, device assert) is raised: every
  later launch in this process would fail too. The trial is recorded as FAIL with user attr ``fatal_error``
  and a rerun resumes the study.
- Otherwise the value is the median ms; ``ms_p20`` and ``ms_p80`` go to user attrs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import optuna
import torch
import triton
from optuna.trial import TrialState

from ..attention_api import attention
from .space import SearchSpace
from .storage import this_process
from .study import FINISHED
from .workload import Workload

REL_L2_LIMIT = 2e-2
CANDIDATE_ERRORS = (triton.TritonError, RuntimeError)
_CONTEXT_FATAL = ("illegal memory access", "illegal address", "misaligned address", "unspecified launch failure",
                  "device-side assert")

TimeFn = Callable[[Callable[..., object], Sequence[tuple]], dict]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32 over all elements."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _prune(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("pruned_reason", reason)
    raise optuna.TrialPruned(reason)


class VariantObjective:
    """Callable for ``study.optimize``: returns the median ms of the sampled variant on ``workload``.

    ``time_fn(fn, arg_sets)`` returns ``{"ms", "ms_p20", "ms_p80"}`` (``timing.time_ms`` on a GPU,
    ``cpu_timing.wall_time_ms`` under the interpreter)."""

    def __init__(self, space: SearchSpace, workload: Workload, time_fn: TimeFn):
        self.space = space
        self.workload = workload
        self.time_fn = time_fn

    def _reuse(self, trial: optuna.Trial, key: str) -> float | None:
        for earlier in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL)):
            if earlier.user_attrs.get("variant") != key:
                continue
            if earlier.state == TrialState.FAIL:
                if "fatal_error" in earlier.user_attrs:
                    trial.set_user_attr("reused_from", earlier.number)
                    _prune(trial, f"crashed in trial {earlier.number}: {earlier.user_attrs['fatal_error']}")
                continue
            trial.set_user_attr("reused_from", earlier.number)
            if earlier.state == TrialState.PRUNED:
                _prune(trial, earlier.user_attrs.get("pruned_reason", f"pruned in trial {earlier.number}"))
            for name in ("ms_p20", "ms_p80"):
                trial.set_user_attr(name, earlier.user_attrs[name])
            return earlier.value
        return None

    def __call__(self, trial: optuna.Trial) -> float:
        for name, value in this_process().items():  # first: recover_stale_trials tells a dead owner by them
            trial.set_user_attr(name, value)
        variant = self.space.suggest(trial)
        trial.set_user_attr("variant", variant.key)
        reused = self._reuse(trial, variant.key)
        if reused is not None:
            return reused
        w = self.workload
        try:
            problem = self._check(attention(*w.inputs[0], w.keys, variant=variant))
            if problem is None:
                times = self.time_fn(lambda q, k, v: attention(q, k, v, w.keys, variant=variant), w.inputs)
        except CANDIDATE_ERRORS as exc:
            if any(s in str(exc) for s in _CONTEXT_FATAL):
                trial.set_user_attr("fatal_error", _short(exc))
                raise
            problem = _short(exc)
        if problem is not None:
            _prune(trial, problem)
        trial.set_user_attr("ms_p20", times["ms_p20"])
        trial.set_user_attr("ms_p80", times["ms_p80"])
        return times["ms"]

    def _check(self, out: torch.Tensor) -> str | None:
        """Why ``out`` ``[B, H, Sq, D]`` is wrong (None when it passes the gate)."""
        if out.isnan().any():
            return "NaN in the output"
        w = self.workload
        error = rel_l2(out[:, :w.check_heads, :w.check_queries], w.reference)
        if not error < REL_L2_LIMIT:
            return f"wrong result: rel-L2 {error:.3g} >= {REL_L2_LIMIT:g} against the fp32 reference"
        return None
