"""Kernel backends: one folder per kernel family, each implementing the same interface.

- ``<name>/spec.py``: a ``BackendSpec`` (template, tunable parameters, validity and shared-memory rules,
  defaults, the files its kernels are made of); pure rules, importable without a GPU.
- ``<name>/launch.py``: ``run(variant, q, k, v, keys, scale, out, lse)`` (render, build, load, launch).

Adding a backend: a folder here with both files, its template under ``templates/<name>/``, and one line in
``SPECS``. The variant keys, the search space, the registry and ``attention(backend=...)`` follow.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .cuda.spec import CUDA, HOPPER_SMEM
from .spec import BackendSpec
from .triton.spec import TRITON

SPECS: dict[str, BackendSpec] = {spec.name: spec for spec in (TRITON, CUDA)}
BACKENDS = tuple(SPECS)
HEAD_DIMS = tuple(sorted({d for spec in SPECS.values() for d in spec.head_dims}))

__all__ = ["BACKENDS", "HEAD_DIMS", "HOPPER_SMEM", "SPECS", "BackendSpec", "launcher", "spec"]


def spec(name: str) -> BackendSpec:
    """The ``BackendSpec`` of backend ``name``; ValueError naming ``backend`` for an unknown one."""
    if name not in SPECS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return SPECS[name]


def launcher(name: str) -> ModuleType:
    """The launch module of backend ``name`` (``run``), imported on first use."""
    return importlib.import_module(f".{spec(name).name}.launch", __name__)
