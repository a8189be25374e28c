"""``--gpus 0,1,...``: one tuning worker subprocess per GPU on the same storage; the parent waits.

Each worker is ``python -m fgattn_gen.cli ... --worker I`` with ``CUDA_VISIBLE_DEVICES`` set to its GPU and
its own sampler seed; it runs the same studies (the shared storage holds the trials, ``MaxTrialsCallback``
keeps the global budget) and writes its output to ``<log_dir>/worker<I>-gpu<G>.log``. The parent polls
the storage for progress. If the parent stops early (Ctrl-C, an error), it interrupts the workers it started
with SIGINT, so that Optuna records their running trials as FAIL (enqueued again on the next run), and
kills those that have not exited after ``STOP_GRACE_S``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .options import TuneOptions

POLL_S = 1.0
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class WorkerResult:
    gpu: int
    returncode: int
    log: Path


def check_gpus(gpus: tuple[int, ...]) -> None:
    """Raise ValueError unless every index is a CUDA device and all are the same GPU model (so that all
    workers tune the same studies)."""
    count = torch.cuda.device_count()
    bad = [g for g in gpus if not 0 <= g < count]
    if bad:
        raise ValueError(f"--gpus: no CUDA device {bad} (this machine has {count})")
    names = {torch.cuda.get_device_name(g) for g in gpus}
    if len(names) > 1:
        raise ValueError(f"--gpus: all GPUs must be the same model, got {sorted(names)}")


def worker_argv(options: TuneOptions, storage_url: str, index: int) -> list[str]:
    """Command line of worker ``index`` (the parent's options, its storage, no plots, no export)."""
    argv = [sys.executable, "-m", "fgattn_gen.cli", "--model", options.model, "--trials", str(options.trials),
            "--out", str(options.out), "--sampler", options.sampler,
            "--exhaustive-below", str(options.exhaustive_below), "--storage", storage_url,
            "--seed", str(options.seed), "--worker", str(index), "--backend", options.backend]
    if options.timeout is not None:
        argv += ["--timeout", str(options.timeout)]
    if options.densities is not None:
        argv += ["--densities", ",".join(f"{d:g}" for d in options.densities)]
    if options.interpret:
        argv.append("--interpret")
    return argv


def run_workers(options: TuneOptions, storage_url: str, log_dir: Path, on_poll: Callable[[], None]) -> list[WorkerResult]:
    """Start one worker per ``options.gpus`` entry, call ``on_poll`` every ``POLL_S`` s until all exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for index, gpu in enumerate(options.gpus):
            log = log_dir / f"worker{index}-gpu{gpu}.log"
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
            with open(log, "w") as f:
                proc = subprocess.Popen(worker_argv(options, storage_url, index), env=env, stdout=f,
                                        stderr=subprocess.STDOUT)
            started.append((gpu, proc, log))
        while any(proc.poll() is None for _, proc, _ in started):
            on_poll()
            time.sleep(POLL_S)
        on_poll()
    finally:
        running = [proc for _, proc, _ in started if proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGINT)
        for proc in running:
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return [WorkerResult(gpu, proc.returncode, log) for gpu, proc, log in started]
