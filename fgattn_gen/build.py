"""Build and load rendered variants, cached on disk by content hash.

Triton variants: the rendered module is written once to
``<cache>/triton/<key>-<hash>.py`` (atomic rename, so concurrent processes never see a partial file)
and imported from there; Triton then compiles it on first launch and caches the binary itself.
Within a process a variant is rendered and imported once (``load``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

from . import __version__
from .render import render, source_hash
from .variant import Variant


def cache_dir() -> Path:
    """``$FGATTN_CACHE_DIR`` or ``~/.cache/fgattn/<version>``."""
    root = os.environ.get("FGATTN_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fgattn" / __version__


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def source_path(variant: Variant, *, interpret: bool = False) -> Path:
    """Render ``variant`` and make sure its source is on disk; returns the file."""
    source = render(variant, interpret=interpret)
    path = cache_dir() / variant.backend / f"{variant.key}-{source_hash(source)}.py"
    if not path.exists():
        _write_atomic(path, source)
    return path


@functools.cache
def load(variant: Variant, *, interpret: bool = False) -> ModuleType:
    """The imported module of a Triton variant (``module.kernel`` plus its pinned constants)."""
    path = source_path(variant, interpret=interpret)
    spec = importlib.util.spec_from_file_location(f"fgattn_variant_{path.stem.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
