"""The catalogue of kernel variants: every valid tunable point of one or more backends for one layout
(dtype, head dim, KeySet block_m x block_n), and the hash that identifies that space.

It sits below both serving and tuning: the tuner samples from ``layout_variants`` and records
``space_hash`` in each tuned file; the registry serves a file only while its recorded hash equals the
current one. The hash covers the valid variant keys and the bytes of every file their kernels are made
of (``BackendSpec.template_files``: the template and the headers it includes, nothing else), so it is
computed without rendering, the same on every device, and unchanged by edits to kernels that are not
part of the attention variants (the predictors' CUDA kernels).
"""

from __future__ import annotations

import hashlib
import itertools
import json

from .backends import SPECS, spec
from .environment import templates_dir
from .variant import Variant


def backend_names(backends: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``backends`` as a tuple of known backend names, without repeats; ValueError naming ``backend``."""
    names = (backends,) if isinstance(backends, str) else tuple(dict.fromkeys(backends))
    unknown = [b for b in names if b not in SPECS]
    if not names or unknown:
        raise ValueError(f"backend: no search space for {unknown or names!r}; known: {', '.join(SPECS)}")
    return names


def layout_variants(backends: str | tuple[str, ...], *, dtype: str, head_dim: int, block_m: int,
                    block_n: int) -> list[Variant]:
    """Every tunable point (``BackendSpec.tunable``) of ``backends`` that ``Variant`` accepts for this layout."""
    variants = []
    for backend in backend_names(backends):
        tunable = spec(backend).tunable
        for values in itertools.product(*tunable.values()):
            try:
                variants.append(Variant(backend=backend, dtype=dtype, head_dim=head_dim, block_m=block_m,
                                        block_n=block_n, **dict(zip(tunable, values))))
            except ValueError:  # Variant.problems() is not empty
                continue
    return variants


def _template_hash(backend: str) -> str:
    """sha256 over the bytes of the backend's template files (named relative to the template root)."""
    root = templates_dir()
    parts = [(p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
             for p in spec(backend).template_files(root)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def space_hash(backends: str | tuple[str, ...], *, dtype: str, head_dim: int, block_m: int, block_n: int) -> str:
    """sha256 of the layout's valid variant keys (of every backend in ``backends``) and of the files their
    kernels are made of. It changes when a template or a header it includes, the tunable values or the
    validity rules change; the device's shared-memory limit is not part of it."""
    names = backend_names(backends)
    keys = sorted(v.key for v in layout_variants(names, dtype=dtype, head_dim=head_dim, block_m=block_m,
                                                 block_n=block_n))
    return hashlib.sha256(json.dumps([keys, [_template_hash(b) for b in sorted(names)]]).encode()).hexdigest()
