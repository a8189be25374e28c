"""Compile CUDA source to a cubin with NVRTC (cuda-python), cache it on disk, launch it on torch's stream.

Cache key: source hash (and the named headers passed with it), NVRTC version, target arch and options; entries live under
``<cache>/cuda/<name>-<key>-<sha>.cubin``, written under a file lock and renamed into place, so concurrent
processes neither race nor see a partial cubin. ``<sha>`` is the hash of the cubin's own bytes: a cached cubin
is loaded only if its bytes hash to it, and one that does not (edited, truncated, corrupt) is removed and built
again, with one warning. A compile failure raises with NVRTC's log.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import warnings
from pathlib import Path
from typing import Callable

import torch

from .environment import cache_dir, write_atomic


class CudaCompileError(RuntimeError):
    """NVRTC rejected a source; the message carries the compiler log."""


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed with {err!r}")
    return rest[0] if len(rest) == 1 else rest


def _nvrtc():
    from cuda.bindings import nvrtc
    return nvrtc


def nvrtc_version() -> str:
    major, minor = _check(_nvrtc().nvrtcVersion(), "nvrtcVersion")
    return f"{major}.{minor}"


def arch_of(device: torch.device) -> str:
    """``sm_90a`` on Hopper (wgmma needs the arch-specific target), ``sm_XY`` elsewhere."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


def _content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _read_verified(folder: Path, stem: str) -> bytes | None:
    """The cached ``<stem>-<sha>.cubin`` whose bytes hash to its ``<sha>``; others are removed with a warning."""
    for path in sorted(folder.glob(f"{stem}-*.cubin")):
        try:
            data = path.read_bytes()
        except OSError as exc:
            data, problem = None, f"unreadable: {exc}"
        else:
            problem = None if _content_hash(data) == path.stem.rsplit("-", 1)[1] else "its bytes do not hash to the name"
        if problem is None:
            return data
        warnings.warn(f"fgattn: cached cubin {path} is not what was built ({problem}); building it again",
                      RuntimeWarning, stacklevel=4)
        try:
            path.unlink()
        except OSError:
            pass
    return None


def cached_build(stem: str, build: Callable[[], bytes]) -> bytes:
    """The cubin cached as ``<cache>/cuda/<stem>-<sha>.cubin``, verified against ``<sha>``; else ``build()``,
    stored under a file lock (one build per key across processes) and an atomic rename."""
    folder = cache_dir() / "cuda"
    if folder.is_dir():
        cached = _read_verified(folder, stem)
        if cached is not None:
            return cached
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_verified(folder, stem)  # another process may have built it while we waited
        if cached is not None:
            return cached
        cubin = build()
        write_atomic(folder / f"{stem}-{_content_hash(cubin)}.cubin", cubin)
        return cubin


def compile_cubin(source: str, name: str, arch: str, options: tuple[str, ...] = (),
                  headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """NVRTC ``source`` for ``arch``; returns the cubin (cached on disk, verified on load).

    ``headers``: ``(include name, text)`` pairs that ``#include "name"`` resolves to (no include path is
    searched for them); their text is part of the cache key.
    """
    nvrtc = _nvrtc()
    opts = (f"--gpu-architecture={arch}", "-std=c++17", *options)
    header_parts = tuple(part for name_text in headers for part in name_text)
    key = hashlib.sha256("\0".join((source, nvrtc_version(), *opts, "headers", *header_parts)).encode()).hexdigest()[:16]

    def build() -> bytes:
        prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), len(headers),
                                               [text.encode() for _, text in headers],
                                               [inc.encode() for inc, _ in headers]), "nvrtcCreateProgram")
        try:
            (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
            if int(err) != 0:
                size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
                log = b" " * size
                nvrtc.nvrtcGetProgramLog(prog, log)
                raise CudaCompileError(f"NVRTC failed to compile {name} for {arch}:\n{log.decode(errors='replace')}")
            size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            cubin = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        return bytes(cubin)

    return cached_build(f"{name}-{key}", build)


@functools.lru_cache(maxsize=None)
def _primary_context(index: int):
    """The device's primary context (the one torch uses), retained once per process."""
    from cuda.bindings import driver
    device = _check(driver.cuDeviceGet(index), "cuDeviceGet")
    return _check(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")


class CudaKernel:
    """A loaded ``extern "C"`` kernel; ``kernel(grid, block, *args)`` launches on torch's current stream
    (tensors pass as pointers, Python floats as ``float``, anything else as ``int``)."""

    def __init__(self, cubin: bytes, name: str, device: torch.device):
        from cuda.bindings import driver
        self._driver = driver
        torch.cuda.init()
        with torch.cuda.device(device):
            # torch's primary context, current on this thread (a worker thread of a parallel build has none)
            _check(driver.cuCtxSetCurrent(_primary_context(torch.cuda.current_device())), "cuCtxSetCurrent")
            self._module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
            self._function = _check(driver.cuModuleGetFunction(self._module, name.encode()), "cuModuleGetFunction")

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        """Allow launches with ``nbytes`` of dynamic shared memory (needed above 48 KB)."""
        attr = self._driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(self._driver.cuFuncSetAttribute(self._function, attr, nbytes), "cuFuncSetAttribute")

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], *args, shared_mem: int = 0) -> None:
        """Arguments: a tensor passes its data pointer, a ctypes scalar (``ctypes.c_longlong(x)``) its own
        type, a float a C float, any other int a C int."""
        values, types = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                values.append(a.data_ptr())
                types.append(ctypes.c_void_p)
            elif isinstance(a, ctypes._SimpleCData):
                values.append(a.value)
                types.append(type(a))
            elif isinstance(a, float):
                values.append(a)
                types.append(ctypes.c_float)
            else:
                values.append(int(a))
                types.append(ctypes.c_int)
        stream = self._driver.CUstream(torch.cuda.current_stream().cuda_stream)
        _check(self._driver.cuLaunchKernel(self._function, *grid, *block, shared_mem, stream,
                                           (tuple(values), tuple(types)), 0), "cuLaunchKernel")


@functools.cache
def load_kernel(source_file: Path, name: str, device_index: int, defines: tuple[tuple[str, int], ...] = (),
                headers: tuple[tuple[str, str], ...] = ()) -> CudaKernel:
    """Compile (cached) and load kernel ``name`` of ``source_file`` for CUDA device ``device_index``;
    ``headers`` as in ``compile_cubin``."""
    device = torch.device("cuda", device_index)
    options = tuple(f"-D{k}={v}" for k, v in defines)
    cubin = compile_cubin(source_file.read_text(), name, arch_of(device), options, headers=headers)
    return CudaKernel(cubin, name, device)
