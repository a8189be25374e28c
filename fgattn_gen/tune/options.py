"""The settings of one ``fgattn-tune`` run, as parsed by ``fgattn_gen.cli``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKEND_CHOICES = ("auto", "triton", "cuda", "all")  # --backend (auto, all, or one of backends.BACKENDS); see device.search_backends


@dataclass(frozen=True)
class TuneOptions:
    """Attributes mirror the CLI flags.

    Attributes:
        model: a preset name or the absolute path of a model spec YAML.
        trials: finished trials per (shape, density) study, over all runs and workers.
        timeout: seconds per study and process (None: no limit).
        out: output root; the tuned file goes to ``<out>/<device-slug>/<model>.yaml``.
        densities: override the model's densities (None: the model's).
        sampler: ``auto``, ``tpe`` or ``exhaustive``; ``exhaustive_below``: auto's size threshold.
        storage: a ``--storage`` URL (None: the default journal under ``out``).
        gpus: CUDA device indices, one worker each when more than one (None: the current device).
        plot: write search-history PNGs.
        interpret: run through Triton's CPU interpreter on a scaled-down shape.
        seed: sampler seed (see ``study.open_study`` and ``runner.WORKER_SEED_STRIDE`` for how it varies).
        worker: set in ``--gpus`` worker subprocesses: tune only, no export.
        backend: ``auto`` (Triton, plus the CUDA kernel on an sm_80+ GPU), ``triton``, ``cuda`` or ``all``.
        repair: cut a damaged study journal before its first bad line (after a backup) instead of stopping.
    """

    model: str
    trials: int
    timeout: float | None
    out: Path
    densities: tuple[float, ...] | None
    sampler: str
    exhaustive_below: int
    storage: str | None
    gpus: tuple[int, ...] | None
    plot: bool
    interpret: bool
    seed: int
    worker: int | None = None
    backend: str = "auto"
    repair: bool = False
