"""One study shared by two ``fgattn-tune --storage postgresql://...`` workers, against a real PostgreSQL server
started for the test (a throwaway cluster in a temporary folder: ``initdb``, ``pg_ctl start`` on a free
localhost port, removed afterwards). One worker is killed with SIGKILL inside a trial: the other finishes the
study, the killed trial is retried once (heartbeat + the storage's retry callback), no variant is measured
twice, and any process can export the complete tuned file from the shared study.

Skipped, with the reason, when the PostgreSQL server binaries (Debian: ``apt-get install postgresql``) or the
``psycopg2`` driver (``pip install 'fgattn[test]'``) are missing. ``initdb`` refuses to run as root: as root
the cluster is made and run as user ``nobody`` (``runuser``)."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from fgattn_gen import cli
from fgattn_gen.tuned import load_tuned
from test_tune import MODE, fail_on_launch, finished, tiny  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
RUNNING, FAIL = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL
TRIALS = 6
HEARTBEAT_S = 1  # FGATTN_HEARTBEAT_S of the workers: a dead worker's trial is stale 2 s after its last beat


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """``postgresql+psycopg2://postgres@127.0.0.1:PORT/fgattn`` of a throwaway server; stopped and removed after."""
    psycopg2 = pytest.importorskip("psycopg2", reason="PostgreSQL test needs the psycopg2 driver: "
                                                      "pip install 'fgattn[test]' (psycopg2-binary)")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="fgattn-pg-"))
    if os.geteuid() == 0:  # initdb refuses root
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root)
            pytest.skip("running as root and no runuser to start PostgreSQL as an unprivileged user")
        as_user = [runuser, "-u", "nobody", "--"]
        os.chown(root, 65534, 65534)
        os.chmod(root, 0o700)
    data, sockets, port = root / "data", root / "sockets", _free_port()

    def run(*argv):
        return subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=120, cwd=root)

    started = False
    try:
        made = run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if made.returncode != 0:
            pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
        run("mkdir", "-m", "700", str(sockets))
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off")
        start = run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "-t", "60", "start")
        started = start.returncode == 0
        assert started, f"pg_ctl start failed: {start.stderr}\n{(root / 'server.log').read_text()[-2000:]}"
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE fgattn")
        conn.close()
        url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/fgattn"
        optuna.storages.RDBStorage(url).engine.dispose()  # the tables, before workers race to create them
        yield url
    finally:
        if started:
            run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _study(url: str) -> optuna.Study:
    storage = optuna.storages.RDBStorage(url)
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def _wait_for_own_trial(url: str, proc: subprocess.Popen, limit_s: float = 120.0) -> int:
    """Until ``proc`` runs a trial with its variant sampled; returns the trial's number."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the worker exited with {proc.returncode} before running a trial"
        try:
            study = _study(url)
        except (ValueError, KeyError):  # no study yet
            study = None
        if study is not None:
            for t in study.get_trials(deepcopy=False, states=(RUNNING,)):
                if t.user_attrs.get("worker_pid") == proc.pid and "variant" in t.user_attrs:
                    return t.number
        time.sleep(0.05)
    raise AssertionError("the worker never ran a trial")


@pytest.mark.skipif(MODE != ["--interpret"], reason="interpreter-mode test (a CUDA machine tunes on the GPU)")
def test_two_workers_on_postgres_one_killed(tiny, tmp_path, postgres_url, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(REPO), "FGATTN_HEARTBEAT_S": str(HEARTBEAT_S)}

    def worker(name: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "fgattn_gen.cli", "--model", str(tiny), "--out", str(tmp_path / name),
                "--interpret", "--storage", postgres_url, "--trials", str(TRIALS), "--seed", str(len(name))]
        log = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)

    doomed, survivor = worker("a"), worker("bb")
    try:
        while True:  # stop the worker inside one of its trials (a tiny trial can end between seeing and killing)
            killed = _wait_for_own_trial(postgres_url, doomed)
            doomed.send_signal(signal.SIGSTOP)  # frozen: the trial can neither finish nor send a heartbeat
            if {t.number: t.state for t in _study(postgres_url).get_trials(deepcopy=False)}[killed] == RUNNING:
                break
            doomed.send_signal(signal.SIGCONT)  # that trial ended before the stop: wait for its next one
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    try:
        assert survivor.wait(timeout=240) == 0, (tmp_path / "bb.log").read_text()[-3000:]
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()

    study = _study(postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == RUNNING]
    (dead,) = [t for t in trials if t.state == FAIL]  # only the killed trial failed
    assert dead.number == killed
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state in (optuna.trial.TrialState.COMPLETE,
                                                      optuna.trial.TrialState.PRUNED)
    assert retries[0].params == dead.params  # the same variant again
    assert retries[0].user_attrs["worker_pid"] == survivor.pid
    assert len(finished(study)) == TRIALS
    runs = [t.user_attrs["variant"] for t in finished(study) if "reused_from" not in t.user_attrs]
    assert len(set(runs)) == len(runs), "a variant was measured twice"

    # the survivor exported the whole study, and any other process can export it again without a trial
    (exported,) = (tmp_path / "bb").glob("*/tiny.yaml")
    (entry,) = load_tuned(exported)["entries"]
    assert entry["n_trials"] == TRIALS
    fail_on_launch(monkeypatch)
    out = tmp_path / "c"
    assert cli.main(["--model", str(tiny), "--out", str(out), "--interpret", "--storage", postgres_url,
                     "--trials", str(TRIALS)]) == 0
    (again,) = out.glob("*/tiny.yaml")
    (entry_again,) = load_tuned(again)["entries"]
    assert entry_again["best"] == entry["best"] and entry_again["n_trials"] == TRIALS
