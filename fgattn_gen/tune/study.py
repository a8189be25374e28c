"""One Optuna study per (device, model, shape, density): its name, sampler, seeding, budget and resume.

- Sampler: ``BruteForceSampler`` when the valid space is small (``auto`` and at most ``exhaustive_below``
  points) or ``exhaustive`` is asked for; otherwise ``TPESampler(multivariate=True, group=True)`` (its
  ``constant_liar`` default spreads parallel workers). Each worker gets its own seed.
- The default variant is enqueued first (``skip_if_exists``), so every study measures it.
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

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("auto", "tpe", "exhaustive")


def study_name(device_slug: str, model: str, shape_name: str, density: float, space_hash: str) -> str:
    """``"<device>/<model>/<shape>/density=<d>/space=<hash12>"``: a new template or space starts a new study."""
    return f"{device_slug}/{model}/{shape_name}/density={density:g}/space={space_hash[:12]}"


def make_sampler(kind: str, space_size: int, exhaustive_below: int, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler for ``--sampler kind`` (``auto``, ``tpe`` or ``exhaustive``) over ``space_size`` points."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {kind!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "exhaustive" or (kind == "auto" and space_size <= exhaustive_below):
            return optuna.samplers.BruteForceSampler(seed=seed)
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)


def open_study(storage: optuna.storages.BaseStorage, name: str,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study ``name`` in ``storage``, or load it with all its trials."""
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize",
                               load_if_exists=True)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE and PRUNED trials, in trial order."""
    return study.get_trials(deepcopy=False, states=FINISHED)


def run_study(study: optuna.Study, space: SearchSpace, objective: Callable[[optuna.Trial], float], *,
              budget: int, timeout: float | None, first: Variant | None,
              callbacks: tuple[Callable[[optuna.Study, FrozenTrial], None], ...] = ()) -> None:
    """Run ``study`` until it holds ``budget`` finished trials, every candidate is evaluated, or ``timeout``
    seconds pass; ``first`` (if in the space) is enqueued as the first point."""
    finished = finished_trials(study)
    evaluated = {t.user_attrs.get("variant") for t in finished}
    remaining = budget - len(finished)
    if remaining <= 0 or space.keys <= evaluated:
        return
    if first is not None and first.key in space.keys:
        study.enqueue_trial(space.trial_params(first), skip_if_exists=True)
    stop_at_budget = optuna.study.MaxTrialsCallback(budget, states=(*FINISHED, TrialState.RUNNING))
    study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=[stop_at_budget, *callbacks])
