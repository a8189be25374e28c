"""One Optuna study per (device, model, shape, density): its name, sampler, seeding, budget and resume.

- Sampler: ``BruteForceSampler`` when ``exhaustive`` is asked for, or for ``auto`` when the valid space is
  small (at most ``exhaustive_below`` points) and the trial budget covers it; otherwise
  ``TPESampler(multivariate=True, group=True)`` (its ``constant_liar`` default spreads parallel workers).
  Both read the same trials, so a study can switch between them.
- Seeding (``PerTrialSeed``): before each trial the sampler is made anew, seeded from the run's seed and the
  number of trials the study has finished. A trial therefore draws the same random point whether the study
  ran in one go or was killed and resumed (with the same trials finished before it), and a resumed study
  never replays the draws of its first trials. Each ``--gpus`` worker has its own run seed.
- The default variant of each searched backend is enqueued first (``skip_if_exists``), so every study
  measures them.
- Resume after any death: ``recover_stale_trials`` fails the RUNNING trials no live process can own (a
  process killed by SIGKILL leaves them RUNNING forever otherwise). Every FAIL trial without the objective's
  ``fatal_error`` attr (Ctrl-C, a killed process, an RDB heartbeat timeout) has its variant enqueued again with
  the same params, from its ``variant`` attr or, when it died before sampling, the ``fixed_params`` it was
  enqueued with; both samplers would otherwise never come back to it (BruteForce treats FAIL as explored).
  A variant that crashed the CUDA context (``fatal_error``) counts as evaluated and is not run again.
- Budget: ``budget`` finished (COMPLETE or PRUNED) trials per study, counted over all runs and workers.
  A rerun only runs what is missing, stops once every candidate has been evaluated, and
  ``MaxTrialsCallback`` stops every worker when the shared study reaches the budget (RUNNING trials of
  other workers count, so parallel workers do not overshoot). On a storage with heartbeats (PostgreSQL,
  MySQL: workers on several hosts) a worker that reaches the budget waits while other workers' trials are
  RUNNING; a trial whose worker died goes stale after the grace period, is failed, retried once (the
  storage's retry callback) and run by a surviving worker, so the study ends complete.
"""

from __future__ import annotations

import datetime
import time
import warnings
from typing import Any, Callable, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..variant import Variant
from .space import SearchSpace
from .storage import StorageLease, process_alive
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


def trial_seed(seed: int, n_finished: int) -> int:
    """The sampler seed of a trial that starts after ``n_finished`` finished trials (distinct per run seed and
    count within 10**6 trials; below 2**32 as numpy needs)."""
    return (seed * 1_000_003 + n_finished) % 2**32


class PerTrialSeed(optuna.samplers.BaseSampler):
    """``make_sampler(exhaustive, trial_seed(seed, n))`` made anew before each trial, ``n`` being the trials
    the study has finished then (see the module docstring); everything else is the inner sampler's."""

    def __init__(self, exhaustive: bool, seed: int):
        self._exhaustive = exhaustive
        self._seed = seed
        self._inner = make_sampler(exhaustive, trial_seed(seed, 0))

    @property
    def inner(self) -> optuna.samplers.BaseSampler:
        return self._inner

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        n_finished = len(study._storage.get_all_trials(study._study_id, deepcopy=False, states=FINISHED))
        self._inner = make_sampler(self._exhaustive, trial_seed(self._seed, n_finished))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def open_study(storage: optuna.storages.BaseStorage, name: str, *, exhaustive: bool, seed: int) -> optuna.Study:
    """Create the study ``name`` in ``storage``, or load it with all its trials; its sampler is
    ``PerTrialSeed(exhaustive, seed)``."""
    optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=PerTrialSeed(exhaustive, seed))


UNOWNED_GRACE_S = 600.0  # a RUNNING trial with no owner recorded this long after its start is stale


def recover_stale_trials(study: optuna.Study, lease: StorageLease | None, *,
                         unowned_grace_s: float = UNOWNED_GRACE_S) -> list[int]:
    """Fail the RUNNING trials of ``study`` that no live process can own; returns their numbers.

    A trial's process is named by the user attrs the objective records first (``storage.this_process``:
    host, PID and the PID's start time). A RUNNING trial is stale when

    1. no other process holds ``lease`` (every tuning process on this storage holds it while it lives, and
       the kernel drops it when a process dies, however it dies): nobody can be running the trial; or else
    2. its process was on this host and is gone (PID not running, or reused by a later process); or
    3. it records no process and started more than ``unowned_grace_s`` ago (the attrs are written within
       milliseconds of a trial's start, so only a process that died in between leaves such a trial).

    A trial of a live process on another host is left to it (an RDB storage's heartbeat fails it when that
    process dies). Stale trials become FAIL with user attr ``stale`` saying why; ``run_study`` enqueues
    their variants again.
    """
    running = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    alone = lease is not None and lease.alone()
    now = datetime.datetime.now()
    failed = []
    try:
        for trial in running:
            owner = trial.user_attrs
            if alone:
                why = "no live tuning process held the study storage"
            elif process_alive(owner) is False:
                why = f"its process {owner.get('worker_pid')} on {owner.get('worker_host')} is gone"
            elif ("worker_host" not in owner and trial.datetime_start is not None
                  and (now - trial.datetime_start).total_seconds() > unowned_grace_s):
                why = f"no process recorded {unowned_grace_s:g} s after its start"
            else:
                continue
            try:
                study._storage.set_trial_user_attr(trial._trial_id, "stale", why)
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # its process finished it after all
                continue
            failed.append(trial.number)
    finally:
        if alone:
            lease.shared()
    return failed


def trial_variant_key(trial: FrozenTrial, space: SearchSpace) -> str | None:
    """The variant a trial ran or was about to run: its ``variant`` attr, else the params it was enqueued with
    (a trial that died before sampling has only those); None when neither names a candidate of ``space``."""
    key = trial.user_attrs.get("variant")
    if key is not None:
        return key
    fixed = trial.system_attrs.get("fixed_params")
    if not fixed:
        return None
    try:
        return space.suggest(optuna.trial.FixedTrial(fixed)).key
    except (ValueError, KeyError):
        return None


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
    waiting = [t.system_attrs.get("fixed_params") or t.params for t in trials if t.state == TrialState.WAITING]
    interrupted = {trial_variant_key(t, space) for t in trials if t.state == TrialState.FAIL} - settled
    for key in sorted(interrupted & space.keys):
        params = space.trial_params(space.variant(key))
        if params not in waiting:
            study.enqueue_trial(params)
    stop_at_budget = optuna.study.MaxTrialsCallback(budget, states=(*FINISHED, TrialState.RUNNING))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        study.optimize(objective, n_trials=remaining, timeout=left, callbacks=[stop_at_budget, *callbacks])
        remaining = _wait_for_other_workers(study, space, budget, deadline)
        if remaining <= 0:
            return


def _heartbeat_interval(study: optuna.Study) -> int | None:
    storage = study._storage
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    return interval or None


def _wait_for_other_workers(study: optuna.Study, space: SearchSpace, budget: int, deadline: float | None) -> int:
    """After this worker stopped at the budget: on a storage with heartbeats (a database shared by workers on
    several hosts), wait while other workers' trials are RUNNING, failing those whose heartbeat stopped
    (``fail_stale_trials``; the storage's retry callback enqueues them once again). Returns the trials still
    to run here (> 0 when a retry waits and the study is short of its budget), else 0."""
    interval = _heartbeat_interval(study)
    if interval is None:
        return 0
    while deadline is None or time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        n_finished = sum(t.state in FINISHED for t in trials)
        settled = {t.user_attrs.get("variant") for t in trials
                   if t.state in FINISHED or "fatal_error" in t.user_attrs}
        if n_finished >= budget or space.keys <= settled:
            return 0
        if any(t.state == TrialState.WAITING for t in trials):
            return budget - n_finished
        if not any(t.state == TrialState.RUNNING for t in trials):
            return 0
        time.sleep(min(interval, 1.0))
        optuna.storages.fail_stale_trials(study)
    return 0
