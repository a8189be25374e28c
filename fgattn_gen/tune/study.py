"""One Optuna study per (device, model, shape, density): its name, sampler, seeding, budget and resume.

- Sampler: ``BruteForceSampler`` when ``exhaustive`` is asked for, or for ``auto`` when the valid space is
  small (at most ``exhaustive_below`` points) and the trial budget covers it; otherwise
  ``TPESampler(multivariate=True, group=True)`` (its ``constant_liar`` default spreads parallel workers).
  Each worker gets its own seed, and a resumed study a new one. Both samplers read the same trials, so a
  study can switch between them.
- The default variant of each searched backend is enqueued first (``skip_if_exists``), so every study
  measures them.
- A trial interrupted by Ctrl-C (or marked FAIL by an RDB heartbeat after its worker died) is FAIL without
  the objective's ``fatal_error`` attr; its variant is enqueued again on the next run, since both samplers
  would otherwise never come back to it (BruteForce treats FAIL as explored). A variant that crashed the
  CUDA context (``fatal_error``) counts as evaluated and is not run again.
- Budget: ``budget`` finished (COMPLETE or PRUNED) trials per study, counted over all runs and workers.
  A rerun only runs what is missing, stops once every candidate has been evaluated, and
  ``MaxTrialsCallback`` stops every worker when the shared study reaches the budget (RUNNING trials of
  other workers count, so parallel workers do not overshoot).
"""

from __future__ import annotations

import warnings
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..variant import Variant
from .space import SearchSpace
from .workload import MeasuredShape

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("auto", "tpe", "exhaustive")


def study_name(device_slug: str, model: str, shape_name: str, measured: MeasuredShape, density: float,
               space_hash: str) -> str:
    """``"<device>/<model>/<shape>/<timed B,H,Sq,Sk>/density=<d>/space=<hash12>"``: all trials of a study are
    timed on the same inputs, and a new template or search space starts a new study."""
    timed = f"b{measured.batch}h{measured.heads}s{measured.seq_q}x{measured.seq_k}"
    return f"{device_slug}/{model}/{shape_name}/{timed}/density={density:g}/space={space_hash[:12]}"


def is_exhaustive(kind: str, space_size: int, exhaustive_below: int, trials: int) -> bool:
    """Whether ``--sampler kind`` (``auto``, ``tpe`` or ``exhaustive``) enumerates a space of ``space_size``.

    ``auto`` enumerates only when the space is small (at most ``exhaustive_below`` points) and the budget
    covers it: BruteForceSampler walks the space branch by branch, so a budget cut short would leave it
    in one corner, where TPE's random start-up trials spread out."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {kind!r}")
    return kind == "exhaustive" or (kind == "auto" and space_size <= min(exhaustive_below, trials))


def trial_budget(trials: int, space_size: int, exhaustive: bool) -> int:
    """Finished trials to aim for per study: ``trials``, at most the space size when enumerating it."""
    return min(trials, space_size) if exhaustive else trials


N_STARTUP = 4  # TPE's random start-up trials (after the enqueued default): small, as the spaces are small


def make_sampler(exhaustive: bool, seed: int) -> optuna.samplers.BaseSampler:
    """BruteForceSampler if ``exhaustive``, else multivariate grouped TPE; seeded with ``seed``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if exhaustive:
            return optuna.samplers.BruteForceSampler(seed=seed)
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=N_STARTUP)


def open_study(storage: optuna.storages.BaseStorage, name: str, *, exhaustive: bool, seed: int) -> optuna.Study:
    """Create the study ``name`` in ``storage``, or load it with all its trials.

    Its sampler is seeded with ``seed`` plus the number of trials already in the study: a resumed study
    continues with fresh random points instead of replaying the first run's start-up sequence."""
    existing = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    sampler = make_sampler(exhaustive, seed + len(existing.get_trials(deepcopy=False)))
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE and PRUNED trials, in trial order."""
    return study.get_trials(deepcopy=False, states=FINISHED)


def run_study(study: optuna.Study, space: SearchSpace, objective: Callable[[optuna.Trial], float], *,
              budget: int, timeout: float | None, first: tuple[Variant, ...] = (),
              callbacks: tuple[Callable[[optuna.Study, FrozenTrial], None], ...] = ()) -> None:
    """Run ``study`` until it holds ``budget`` finished trials, every candidate is evaluated, or ``timeout``
    seconds pass; the ``first`` points (those in the space) are enqueued first, interrupted points again."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    settled = {t.user_attrs.get("variant") for t in trials if t.state in FINISHED or "fatal_error" in t.user_attrs}
    remaining = budget - len(finished)
    if remaining <= 0 or space.keys <= settled:
        return
    for variant in first:
        if variant.key in space.keys:
            study.enqueue_trial(space.trial_params(variant), skip_if_exists=True)
    waiting = [t.system_attrs.get("fixed_params") for t in trials if t.state == TrialState.WAITING]
    interrupted = {t.user_attrs.get("variant") for t in trials if t.state == TrialState.FAIL} - settled
    for key in sorted(interrupted & space.keys):
        params = space.trial_params(space.variant(key))
        if params not in waiting:
            study.enqueue_trial(params)
    stop_at_budget = optuna.study.MaxTrialsCallback(budget, states=(*FINISHED, TrialState.RUNNING))
    study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=[stop_at_budget, *callbacks])
