"""``fgattn-tune`` after a death: trials left RUNNING by a killed process are failed and run again, a damaged
journal is reported with its path and ``--repair``, and a run killed with SIGKILL at random points inside
trials, then rerun, ends with the same study and tuned entries as an uninterrupted run.

Without CUDA the runs use ``--interpret`` on the tiny model of test_tune.py (about a second per trial)."""

import datetime
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import HAS_CUDA
from fgattn_gen.tune import storage as tune_storage
from fgattn_gen.tune.study import recover_stale_trials
from fgattn_gen.tuned import load_tuned
from test_tune import MODE, SMALL_VARIANTS, DEFAULT_KEY, finished, studies, tiny, tune, tuned_file  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
RUNNING, FAIL = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def owner(pid: int) -> dict:
    return {"worker_pid": pid, "worker_host": socket.gethostname(), "worker_token": tune_storage.process_token(pid)}


def journal_of(out: Path) -> Path:
    (journal,) = out.glob(".studies/*/tiny.journal")
    return journal


def measured(study) -> list[str]:
    """Variants a study actually ran (finished, not reused from an earlier trial), one item per run."""
    return sorted(t.user_attrs["variant"] for t in finished(study) if "reused_from" not in t.user_attrs)


# ---------------------------------------------------------------------------------------- stale trials
def test_trials_left_running_by_a_killed_process_run_again(tiny, tmp_path):
    """The issue's case: the killed trial stayed RUNNING forever, the rerun finished short of the budget and
    the killed variant (the default, enqueued first) was never measured."""
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "1") == 0  # the default variant
    (study,) = studies(out)
    template = study.trials[0]
    key, params = next((k, p) for k, p in SMALL_VARIANTS.items() if k != DEFAULT_KEY)
    pid = dead_pid()
    study.add_trial(optuna.trial.create_trial(  # killed after sampling: params and the variant recorded
        state=RUNNING, params=params, distributions=template.distributions,
        user_attrs={**owner(pid), "variant": key}))
    other, other_params = next((k, p) for k, p in SMALL_VARIANTS.items() if k not in (DEFAULT_KEY, key))
    study.enqueue_trial(other_params)  # killed before sampling: only the enqueued params
    assert study._pop_waiting_trial_id() is not None and study.trials[-1].state == RUNNING

    assert tune(tiny, out, "--trials", "3") == 0
    (study,) = studies(out)
    assert not study.get_trials(states=(RUNNING,))
    stale = study.get_trials(states=(FAIL,))
    assert len(stale) == 2 and all("stale" in t.user_attrs for t in stale)
    runs = measured(study)
    assert len(finished(study)) == 3 and sorted(runs) == sorted({DEFAULT_KEY, key, other})
    assert load_tuned(tuned_file(out))["entries"][0]["n_trials"] == 3


class _Shared:
    """A lease some other live process also holds."""

    def alone(self) -> bool:
        return False

    def shared(self) -> None:
        raise AssertionError("not alone: nothing to give back")


def test_stale_rules_when_other_processes_use_the_storage():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.CategoricalDistribution([1, 2])}
    old = datetime.datetime.now() - datetime.timedelta(hours=1)
    cases = {  # name: (user attrs, started, expected stale)
        "dead owner": (owner(dead_pid()), None, True),
        "live owner": (owner(os.getpid()), None, False),
        "reused pid": ({**owner(os.getpid()), "worker_token": "not-this-process"}, None, True),
        "other host": ({**owner(dead_pid()), "worker_host": "another-host.example"}, None, False),
        "no owner, old": ({}, old, True),
        "no owner, just started": ({}, None, False),
    }
    for name, (attrs, started, _) in cases.items():
        trial = optuna.trial.create_trial(state=RUNNING, params={"x": 1}, distributions=dist,
                                          user_attrs={**attrs, "name": name})
        if started is not None:
            trial.datetime_start = started
        study.add_trial(trial)
    failed = recover_stale_trials(study, _Shared())
    assert sorted(study.trials[n].user_attrs["name"] for n in failed) == sorted(
        name for name, (_, _, stale) in cases.items() if stale)
    assert all(study.trials[n].state == FAIL and study.trials[n].user_attrs["stale"] for n in failed)


def test_lease_tells_whether_another_process_uses_the_storage(tmp_path):
    spec = tune_storage.StorageSpec("journal", str(tmp_path / "s.journal"))
    lease = tune_storage.StorageLease(spec)
    try:
        assert lease.alone()
        lease.shared()
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lease.path)!r}, os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_SH)\nprint('held', flush=True)\ntime.sleep(60)\n")],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            assert not lease.alone()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        assert lease.alone()  # the kernel dropped the killed process's lock
        lease.shared()
    finally:
        lease.close()


# ---------------------------------------------------------------------------------------- damaged journals
def test_damaged_journal_is_reported_then_repaired(tiny, tmp_path, capsys):
    """A garbage line (a torn write, a disk error): a raw JSONDecodeError naming no file on every rerun, before."""
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "1") == 0
    journal = journal_of(out)
    lines = journal.read_bytes().splitlines(keepends=True)
    bad_line = len(lines) // 2
    broken = b"".join(lines[: bad_line - 1]) + b"\x00\x01 not json\n" + b"".join(lines[bad_line - 1:])
    journal.write_bytes(broken)
    capsys.readouterr()

    assert tune(tiny, out, "--trials", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "JSONDecodeError" not in err
    assert str(journal) in err and f"line {bad_line} " in err and "--repair" in err
    assert journal.read_bytes() == broken  # nothing changed without --repair

    assert tune(tiny, out, "--trials", "2", "--repair") == 0
    (backup,) = journal.parent.glob("tiny.journal.bak-*")
    assert backup.read_bytes() == broken  # everything that was dropped is kept
    (study,) = studies(out)
    runs = measured(study)
    assert len(finished(study)) == 2 and len(set(runs)) == len(runs)
    assert load_tuned(tuned_file(out))["entries"][0]["n_trials"] == 2


def _small_journal(path: Path) -> bytes:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=tune_storage.FlockLock(str(path))))
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a record", "good"])
def test_check_and_repair_journal(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(tune_storage, "_PARTIAL_LINE_WAIT_S", 0.0)
    path = tmp_path / "s.journal"
    lines = _small_journal(path).splitlines(keepends=True)
    keep = {"truncated": len(lines) - 1, "garbage": 3, "not a record": 4, "good": len(lines)}[damage]
    tail = {"truncated": lines[-1][:-5], "garbage": b"{\"op_code\": 4, \n", "not a record": b"[1, 2]\n", "good": b""}
    broken = b"".join(lines[:keep]) + tail[damage] + b"".join(lines[keep + 1:] if damage != "truncated" else [])
    path.write_bytes(broken)
    if damage == "good":
        tune_storage.check_journal(path)
        assert tune_storage.repair_journal(path) is None
        return
    with pytest.raises(tune_storage.JournalError, match=rf"study journal {path}: line {keep + 1} of") as info:
        tune_storage.check_journal(path)
    assert "--repair" in str(info.value) and "--storage journal:" in str(info.value)
    with pytest.raises(tune_storage.JournalError):  # open_storage checks first: no raw JSONDecodeError
        tune_storage.open_storage(tune_storage.StorageSpec("journal", str(path)))
    backup, dropped = tune_storage.repair_journal(path)
    assert backup.read_bytes() == broken and dropped == len(broken.splitlines(keepends=True)) - keep
    assert path.read_bytes() == b"".join(lines[:keep])
    tune_storage.check_journal(path)
    storage = tune_storage.open_storage(tune_storage.StorageSpec("journal", str(path)))
    assert optuna.get_all_study_names(storage) == ["s"]


# ---------------------------------------------------------------------------------------- crash test
def _wait_for_trial(out: Path, number: int, proc: subprocess.Popen, limit_s: float = 240.0) -> None:
    """Until trial ``number`` of the study under ``out`` is RUNNING with its variant sampled."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the tuner exited with {proc.returncode} before trial {number}"
        journal = next(iter(out.glob(".studies/*/tiny.journal")), None)
        if journal is not None:
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
            for name in optuna.get_all_study_names(storage):
                trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
                if any(t.number == number and t.state == RUNNING and "variant" in t.user_attrs for t in trials):
                    return
        time.sleep(0.02)
    raise AssertionError(f"trial {number} never started")


def test_sigkill_at_random_points_then_rerun_matches_an_uninterrupted_run(tiny, tmp_path):
    rng = random.Random(17)
    reference = tmp_path / "reference"
    assert tune(tiny, reference, "--trials", "3") == 0

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fgattn_gen.cli", "--model", str(tiny), "--out", str(out), *MODE, "--trials", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # kill inside trial 0 (the default variant, enqueued first), then inside trial 1 or 2 of the rerun (1
    # re-measures the default, 2 is sampled), each after a seeded random delay
    killed = 0
    for number in (0, rng.choice((1, 2))):
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_trial(out, number, proc)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        (study,) = studies(out)
        killed += len(study.get_trials(states=(RUNNING,)))
    assert HAS_CUDA or killed == 2  # each kill left its trial RUNNING
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (ref_study,), (study,) = studies(reference), studies(out)
    assert not study.get_trials(states=(RUNNING,))
    assert all("stale" in t.user_attrs for t in study.get_trials(states=(FAIL,)))
    runs = measured(study)
    assert len(set(runs)) == len(runs), "a variant was measured twice"
    assert len(finished(study)) == len(finished(ref_study)) == 3
    assert set(runs) == set(measured(ref_study)) or HAS_CUDA  # GPU times steer TPE differently; CPU: all random

    def comparable(path: Path) -> list[dict]:
        entries = load_tuned(path)["entries"]
        return [{**{k: e[k] for k in ("label", "shape", "measured", "density", "n_trials", "n_pruned")},
                 "variants": sorted(r["key"] for r in (e["best"], *e["runners_up"]))} for e in entries]

    assert comparable(tuned_file(out)) == comparable(tuned_file(reference))
