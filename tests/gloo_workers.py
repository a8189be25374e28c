"""Spawn a test file as ``world`` worker processes of a gloo process group (the multi-process CPU tests).

Each worker runs ``python <script> <rank> <world> <init_file> <tmp_path>`` with ``TRITON_INTERPRET=1`` (the
interpreter is chosen before Triton is imported) and the checkout on ``PYTHONPATH``, and saves what it
computed to ``<tmp_path>/rank<r>.pt``.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch


@contextlib.contextmanager
def process_group(rank: int, world: int, init_file: str):
    """A worker's gloo process group for the ``with`` body. A clean exit waits at a barrier before tearing the
    group down: a rank that destroys its group (closing its sockets) while a peer's gloo thread is still
    finishing the last exchange makes that peer abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(worker) -> None:
    """A worker script's entry: ``worker(rank, world, init_file, out_dir)`` from the command line, then exit at
    once. Skipping the interpreter's finalization is deliberate: gloo's C++ threads can still hold Python
    objects then, and tearing them down can abort the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#179291) after its work was saved. An exception still exits non-zero."""
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(script: str, world: int, tmp_path: Path, *, timeout: float) -> list[dict]:
    """Run the workers to completion (killed after ``timeout`` seconds); assert each exited 0 (its log in the
    message otherwise) and return what each saved, by rank."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    init_file = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(init_file), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} of {world} exited with {p.returncode}:\n{log}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
