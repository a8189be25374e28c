"""What the installation and the process environment decide: where templates and tuned files are, where
built kernels are cached, and whether Triton runs in its CPU interpreter.

Data roots: an installed wheel carries ``templates/`` and ``tuned/`` inside the package
(``fgattn_gen/templates``, ``fgattn_gen/tuned``; see ``pyproject.toml``); a checkout has them beside the
package. Either way the same functions answer.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from . import __version__

_PACKAGE = Path(__file__).resolve().parent


@functools.cache
def data_dir(name: str) -> Path:
    """``fgattn_gen/<name>`` in an installed package, else ``<checkout>/<name>`` (``templates``, ``tuned``)."""
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


def templates_dir() -> Path:
    """The template root: ``$FGATTN_TEMPLATES`` or the shipped ``templates/``."""
    override = os.environ.get("FGATTN_TEMPLATES")
    return Path(override) if override else data_dir("templates")


def tuned_dir() -> Path:
    """The shipped tuned files, ``tuned/<gpu-slug>/<model>.yaml``."""
    return data_dir("tuned")


def presets_dir() -> Path:
    """Model presets (``fgattn-tune --model NAME``), ``<name>.yaml``."""
    return _PACKAGE / "presets"


def cache_dir() -> Path:
    """``$FGATTN_CACHE_DIR`` or ``~/.cache/fgattn/<version>``: rendered sources and cubins."""
    root = os.environ.get("FGATTN_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fgattn" / __version__


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
