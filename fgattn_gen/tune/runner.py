"""One ``fgattn-tune`` run for one model: tune every (shape, density) study, then export, plot and summarise.

Order: studies are tuned in-process (one GPU, or the interpreter) or by ``--gpus`` workers; then, in this
process, each study's peers are timed at the same shape (GPU only), the tuned file is written atomically,
plots are drawn and the summary is printed. A ``--worker`` process only tunes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import optuna
import torch
from rich.console import Console
from rich.markup import escape

from ..models import AttentionShape, ModelSpec, load_model
from ..timing import time_ms
from ..tuned import write_tuned
from ..variant import DTYPES, default_variant
from .cpu_timing import wall_time_ms
from .device import Device, detect_device, search_backends
from .export import metadata, move_aside, previous_entries, study_entry, tuned_document, tuned_path
from .objective import VariantObjective
from .options import TuneOptions
from .peers import measure_peers
from .plot import save_history
from .report import progress_bar, summary_tables
from .space import SearchSpace, build_space
from .storage import (StorageError, StorageLease, StorageSpec, default_journal, open_storage, parse_storage,
                      repair_journal, studies_dir)
from .study import (FINISHED, finished_trials, is_exhaustive, open_study, recover_stale_trials, run_study,
                    study_name, trial_budget)
from .workers import run_workers
from .workload import MeasuredShape, build_workload, measured_shape

WORKER_SEED_STRIDE = 10_007  # worker i samples with seed + i * stride (+ the trials already in the study)


@dataclass(frozen=True)
class StudyPlan:
    """One study: a model shape at one density, timed at ``measured``."""

    shape: AttentionShape
    density: float
    measured: MeasuredShape
    name: str


class _Run:
    """State shared by the steps of one run (model, device, space, storage, plans)."""

    def __init__(self, options: TuneOptions, console: Console):
        self.options = options
        self.console = console
        self.model: ModelSpec = load_model(options.model)
        if options.gpus and not options.interpret:
            torch.cuda.set_device(options.gpus[0])
        self.device: Device = detect_device(options.interpret)
        m = self.model
        self.space: SearchSpace = build_space(search_backends(options.backend, self.device), dtype=m.dtype,
                                              head_dim=m.head_dim, block_m=m.block_m, block_n=m.block_n,
                                              smem_limit=self.device.smem_limit)
        self.storage_spec: StorageSpec = (parse_storage(options.storage) if options.storage
                                          else default_journal(options.out, self.device.slug, m.name))
        if self.storage_spec.local_file is not None:
            self.storage_spec.local_file.parent.mkdir(parents=True, exist_ok=True)
        self.lease = StorageLease(self.storage_spec)  # held while this process lives (recover_stale_trials)
        try:
            if options.repair:
                self._repair()
            self.storage = open_storage(self.storage_spec)
        except BaseException:
            self.lease.close()
            raise
        self.sampler_seed = options.seed + WORKER_SEED_STRIDE * (options.worker or 0)
        self.exhaustive = is_exhaustive(options.sampler, len(self.space), options.exhaustive_below, options.trials)
        self.budget = trial_budget(options.trials, len(self.space), self.exhaustive)
        self.time_fn = wall_time_ms if self.device.interpret else time_ms
        self.plans = []
        for shape in m.shapes:
            measured = measured_shape(m, shape, self.device)
            for density in options.densities or m.densities:
                name = study_name(self.device.slug, m.name, shape.name, measured, density, self.space.hash)
                self.plans.append(StudyPlan(shape, density, measured, name))

    def _repair(self) -> None:
        """``--repair``: cut a damaged journal before its first bad line (after a backup), only when no other
        process uses it."""
        if self.storage_spec.kind != "journal":
            raise StorageError(f"--repair: only a journal file can be repaired, not {self.storage_spec.url}")
        if not self.lease.alone():
            raise StorageError(f"--repair: another process is using {self.storage_spec.target}; "
                               f"repair it when that process has ended")
        try:
            repaired = repair_journal(self.storage_spec.target)
        finally:
            self.lease.shared()
        if repaired is None:
            self.console.print(f"--repair: {escape(self.storage_spec.target)} reads back whole; nothing to repair")
        else:
            backup, dropped = repaired
            self.console.print(f"[yellow]--repair: cut {escape(self.storage_spec.target)} before its first bad line "
                               f"({dropped} line(s) dropped); the whole file is kept in {escape(str(backup))}")

    def recover(self, study: optuna.Study) -> None:
        """Fail the trials of dead processes (``study.recover_stale_trials``); their variants run again."""
        stale = recover_stale_trials(study, self.lease)
        if stale:
            self.console.print(f"[yellow]{escape(study.study_name)}: trial(s) {', '.join(map(str, stale))} of a process "
                               f"that died were left RUNNING; marked FAIL, their variants run again")

    def study(self, plan: StudyPlan) -> optuna.Study:
        return open_study(self.storage, plan.name, exhaustive=self.exhaustive, seed=self.sampler_seed)

    def n_finished(self) -> int:
        return sum(min(self.budget, len(finished_trials(self.study(p)))) for p in self.plans)


def _tune_in_process(run: _Run, progress=None, task=None) -> None:
    """Run every study here, one after the other, advancing ``progress`` per finished trial."""
    m = run.model
    limit = {} if run.device.smem_limit is None else {"smem_limit": run.device.smem_limit}
    first = tuple(default_variant(dtype=DTYPES[m.dtype], head_dim=m.head_dim, block_m=m.block_m, block_n=m.block_n,
                                  backend=backend, **limit) for backend in run.space.backends)

    def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is not None and trial.state in FINISHED:
            progress.advance(task)

    total = run.budget * len(run.plans)
    for plan in run.plans:
        if progress is not None:
            progress.update(task, description=f"{m.name} {plan.shape.name} density={plan.density:g}")
        study = run.study(plan)
        run.recover(study)
        workload = build_workload(m, plan.measured, plan.density, run.device)
        run_study(study, run.space, VariantObjective(run.space, workload, run.time_fn), budget=run.budget,
                  timeout=run.options.timeout, first=first, callbacks=(advance,))
        del workload
        n_finished = len(finished_trials(study))
        if progress is not None:  # a study may end short of its budget (space exhausted, timeout)
            total -= run.budget - min(run.budget, n_finished)
            progress.update(task, total=total, completed=run.n_finished())
        else:
            run.console.print(f"{plan.name}: {n_finished} finished trials")


def _tune(run: _Run) -> None:
    """Tune all studies under a progress bar, in-process or through ``--gpus`` workers."""
    with progress_bar(run.console) as progress:
        task = progress.add_task(run.model.name, total=run.budget * len(run.plans), completed=run.n_finished())
        if not run.options.gpus or len(run.options.gpus) < 2:
            _tune_in_process(run, progress, task)
            return
        for plan in run.plans:  # create every study before the workers race to
            run.recover(run.study(plan))
        log_dir = studies_dir(run.options.out, run.device.slug) / "logs"
        progress.update(task, description=f"{run.model.name} on GPUs {','.join(map(str, run.options.gpus))}")
        results = run_workers(run.options, run.storage_spec.url, log_dir,
                              lambda: progress.update(task, completed=run.n_finished()))
    failed = [r for r in results if r.returncode != 0]
    for r in failed:
        tail = "\n".join(r.log.read_text().splitlines()[-15:])
        run.console.print(f"[red]worker on GPU {r.gpu} exited with {r.returncode}; log {r.log}:[/red]\n{tail}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} workers failed")


def _failure_reason(study: optuna.Study) -> str:
    reasons = collections.Counter(t.user_attrs.get("pruned_reason", "?") for t in finished_trials(study))
    if not reasons:
        return "no trial finished"
    reason, count = reasons.most_common(1)[0]
    return f"{count} pruned, e.g. {reason}"


def _export(run: _Run) -> int:
    """Time the peers, write the tuned file and plots, print the summary; 1 if a study has no best variant."""
    entries, failures = [], {}
    for plan in run.plans:
        study = run.study(plan)
        baselines = {}
        if not run.device.interpret:
            workload = build_workload(run.model, plan.measured, plan.density, run.device)
            baselines, errors = measure_peers(workload, plan.density, run.time_fn)
            del workload
            for name, error in errors.items():
                run.console.print(f"[yellow]{plan.shape.name} density={plan.density:g}: {name} left out: {error}")
        entry = study_entry(study, run.space, run.model, plan.shape, plan.density, plan.measured, baselines)
        if entry is None:
            failures[(plan.shape.name, plan.density)] = _failure_reason(study)
        else:
            entries.append(entry)
        if run.options.plot and entry is not None:
            png = (tuned_path(run.options.out, run.device.slug, run.model.name).parent / "plots"
                   / f"{run.model.name}_{plan.shape.name}_d{plan.density:g}.png")
            save_history(study, png, plan.name)
    path = tuned_path(run.options.out, run.device.slug, run.model.name)
    meta = metadata(run.model, run.device, run.space)
    previous = previous_entries(path, meta, entries)
    kept = previous.kept
    if previous.unreadable:
        why = escape(previous.unreadable)
        if entries:
            aside = move_aside(path)
            run.console.print(f"[yellow]warning: the existing tuned file {escape(str(path))} cannot be read ({why}); "
                              f"kept aside as {escape(str(aside))}, a new {escape(str(path))} is written")
        else:
            run.console.print(f"[yellow]warning: the existing tuned file {escape(str(path))} cannot be read ({why}); "
                              f"left as it is (nothing new to write)")
    elif previous.not_kept and entries:
        run.console.print(f"[yellow]note: {escape(str(path))} was tuned with other settings "
                          f"({escape(previous.not_kept)}); its entries are replaced by this run's")
    if entries or kept:
        write_tuned(path, tuned_document(meta, entries + kept, previous.knobs))
    for table in summary_tables(run.model, run.space, entries, failures):
        run.console.print(table)
    if run.device.interpret:
        run.console.print("[yellow]interpreter run: times are CPU wall-clock on a scaled-down shape "
                          "(file marked interpret: true); they rank nothing on a GPU.")
    if entries or kept:
        note = f" (kept {len(kept)} entries of other shapes/densities)" if kept else ""
        run.console.print(f"wrote {path}{note}")
    run.console.print(f"studies: {run.storage_spec.url}")
    return 1 if failures else 0


def tune_model(options: TuneOptions, console: Console) -> int:
    """Run ``fgattn-tune`` for ``options``; returns the exit code (0 ok, 1 a study found no correct variant).

    Raises ModelSpecError / StorageError / EmptySpaceError for bad settings (before any trial runs; a
    StorageError also for a journal that cannot be replayed, naming ``--repair``), RuntimeError for failed
    workers."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = _Run(options, console)
    try:
        if options.worker is not None:
            _tune_in_process(run)
            return 0
        _tune(run)
        return _export(run)
    finally:
        run.lease.close()
