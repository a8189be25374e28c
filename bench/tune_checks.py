"""Tuner checks on one GPU, written to bench/results/<name>.json and .md:

1. TPE against an exhaustive sweep on one (shape, density): the exhaustive study measures every valid
   variant; TPE studies (several seeds, each on its own storage) get 30 % of that many trials. Reported:
   each TPE best within x % of the exhaustive best.
2. Two workers sharing one study (two fgattn-tune processes on one GPU with one ``--storage`` journal):
   trials per worker and whether any variant was measured twice.

    PYTHONPATH=. python bench/tune_checks.py --name tune_checks_h200 [--model wan-1.3b --density 0.3]
"""

from __future__ import annotations

import argparse
import datetime
import math
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from benchlib import write_results



def tune_argv(model: str, density: float, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fgattn_gen.cli", "--model", model, "--densities", str(density), "--out", str(out),
            *extra, *([] if torch.cuda.is_available() else ["--interpret"])]  # CPU: a dry run of the script


def tune(model: str, density: float, out: Path, *extra: str) -> None:
    subprocess.run(tune_argv(model, density, out, *extra), check=True)


def studies(out: Path) -> list[optuna.Study]:
    journals = list(out.glob(".studies/*/*.journal"))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journals[0])))
    return [optuna.load_study(study_name=s.study_name, storage=storage) for s in optuna.get_all_study_summaries(storage)]


def measured(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that launched their variant (not copied from an earlier trial of the same variant)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if "reused_from" not in t.user_attrs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default="wan-1.3b")
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fgattn-tune-checks-"))

    tune(args.model, args.density, root / "exhaustive", "--sampler", "exhaustive", "--trials", "1000")
    (full,) = studies(root / "exhaustive")
    n_space = len(measured(full))
    best = full.best_value
    budget = max(1, math.floor(0.3 * n_space))
    tpe = []
    for seed in range(args.seeds):
        out = root / f"tpe{seed}"
        tune(args.model, args.density, out, "--sampler", "tpe", "--trials", str(budget), "--seed", str(seed))
        (study,) = studies(out)
        tpe.append({"seed": seed, "trials": len(study.trials), "best_ms": study.best_value,
                    "best_variant": study.best_trial.user_attrs["variant"],
                    "gap_pct": 100 * (study.best_value / best - 1)})

    journal = root / "shared.journal"  # two independent processes on one GPU, one study
    workers = [subprocess.Popen(tune_argv(args.model, args.density, root / f"worker{i}", "--storage",
                                          f"journal:{journal}", "--sampler", "tpe", "--trials", "16", "--seed", str(i)))
               for i in range(2)]
    if any(w.wait() != 0 for w in workers):
        raise RuntimeError("a tuning worker failed")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (shared,) = [optuna.load_study(study_name=s.study_name, storage=storage)
                 for s in optuna.get_all_study_summaries(storage)]
    runs = measured(shared)
    per_worker = Counter(t.user_attrs["worker_pid"] for t in runs)
    repeated = [k for k, n in Counter(t.user_attrs["variant"] for t in runs).items() if n > 1]

    result = dict(
        name=args.name, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "triton-interpreter", date=datetime.date.today().isoformat(),
        versions=dict(torch=torch.__version__, optuna=optuna.__version__),
        model=args.model, density=args.density,
        exhaustive=dict(trials=n_space, best_ms=best, best_variant=full.best_trial.user_attrs["variant"]),
        tpe=dict(trials_each=budget, fraction_of_exhaustive=budget / n_space, runs=tpe),
        two_workers=dict(finished_trials=len(shared.trials), measured=len(runs),
                         measured_per_worker=sorted(per_worker.values()), variants_measured_twice=repeated),
    )
    lines = [f"# {args.name}", "", f"Card: {result['device']}. Date: {result['date']}. torch {torch.__version__}, "
             f"optuna {optuna.__version__}. Model {args.model}, density {args.density}.", "",
             f"Exhaustive: {n_space} variants, best {best:.4f} ms ({result['exhaustive']['best_variant']}).", "",
             f"TPE with {budget} trials ({100 * budget / n_space:.0f} % of exhaustive):", "",
             "| seed | best ms | variant | gap to exhaustive best |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['best_ms']:.4f} | {r['best_variant']} | {r['gap_pct']:+.2f} % |" for r in tpe]
    lines += ["", f"Two fgattn-tune processes on one study (one GPU, shared `--storage journal:`): {len(shared.trials)} trials, {len(runs)} measured, "
              f"per worker {sorted(per_worker.values())}, variants measured twice: {repeated or 'none'}."]
    write_results(args.name, result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
