"""What the installation and the process environment decide: where templates and tuned files are, where
built kernels are cached, and whether Triton runs in its CPU interpreter.

Data roots: an installed wheel carries ``templates/`` and ``tuned/`` inside the package
(``fgattn_gen/templates``, ``fgattn_gen/tuned``; see ``pyproject.toml``); a checkout has them beside the
package. Either way the same functions answer.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import threading
import warnings
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


def configured_cache_dir() -> Path:
    """``$FGATTN_CACHE_DIR`` or ``~/.cache/fgattn/<version>``, whether or not it can be written."""
    root = os.environ.get("FGATTN_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fgattn" / __version__


def cache_problem(root: Path) -> str | None:
    """Why the cache directory ``root`` cannot be used (None when it can): it is created if missing, then a
    file is created in it and removed again."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".fgattn-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return None


_CACHE_ROOTS: dict[Path, Path] = {}
_CACHE_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where rendered sources and cubins are cached: ``configured_cache_dir()`` when it can be written, else
    (with one warning naming ``FGATTN_CACHE_DIR``) a temporary directory of this process, removed at exit."""
    root = configured_cache_dir()
    with _CACHE_LOCK:
        if root not in _CACHE_ROOTS:
            problem = cache_problem(root)
            if problem is None:
                _CACHE_ROOTS[root] = root
            else:
                fallback = Path(tempfile.mkdtemp(prefix="fgattn-cache-"))
                atexit.register(shutil.rmtree, fallback, ignore_errors=True)
                warnings.warn(f"fgattn: the kernel cache directory {root} cannot be written ({problem}); caching "
                              f"in {fallback} for this process only. Set FGATTN_CACHE_DIR to a writable "
                              f"directory to keep built kernels between runs.", RuntimeWarning, stacklevel=2)
                _CACHE_ROOTS[root] = fallback
        return _CACHE_ROOTS[root]


def writable_dir_problem(folder: Path, *, create: bool) -> str | None:
    """Why files cannot be created in ``folder`` (None when they can). ``create``: the folder may be missing if
    its first existing ancestor is a writable folder (nothing is created here)."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        if not create:
            return f"folder {folder} does not exist"
        if probe.parent == probe:
            return f"no existing folder above {folder}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"folder {probe} is not writable"
    return None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, which races with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes, *, fsync: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file in the same folder and a rename:
    readers never see a partial file. The file gets the mode a new file would (0666 less the umask), not
    the temporary file's 0600. ``fsync``: flush the file and then its folder to disk, so that a crash
    leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@functools.cache
def cuda_sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index``, looked up once."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def cuda_total_memory(device_index: int) -> int:
    """Bytes of memory of CUDA device ``device_index``, looked up once."""
    import torch

    return torch.cuda.get_device_properties(device_index).total_memory
