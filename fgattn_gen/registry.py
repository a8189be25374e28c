"""Runtime registry: which tuned kernel variant serves an attention call on this GPU.

Sources: the shipped tuned YAMLs (``tuned/<gpu-slug>/<model>.yaml``, written by ``fgattn-tune``; package data
of an installed wheel) and
every directory in ``FGATTN_TUNED_PATH`` (``os.pathsep``-separated). A file is served only if it was
tuned on a GPU (not the interpreter), on this GPU model, with this fgattn minor version, this Triton
version and the current search space (``catalogue.space_hash``: variant keys and template files, hashed
without rendering); any other file is skipped with one warning. Shipped files of other GPUs are not
considered at all. Nothing here imports the tuner.

Lookup order for ``lookup(device=, dtype=, head_dim=, seq_q=, seq_k=, density=, block_n=)``:
1. an entry of exactly this shape and density;
2. the nearest entry of this layout: sequence lengths first (log distance), then density (log distance;
   an unknown density counts as 1.0, the density of dense attention);
3. the variant most often best for this layout across entries;
4. ``default_variant``, which exists for every layout.
Results are cached per argument tuple (thread-safe), so a warm lookup is a dictionary hit.

Calibrated predictor knobs (``predictor_knobs`` of a tuned file, ``fgattn-tune --calibrate``):
``served_knobs(device=, predictor=, heads=, seq_q=, seq_k=, head_dim=, block_m=, block_n=, layer=,
head_range=)`` returns
the knobs of the calibration of ``predictor`` with these heads, head dim and KeySet layout whose sequence
lengths are nearest (log distance, within a factor of two), for ``layer`` (its own values, else ``"*"``), or
None (per-head values are Python lists; ``head_range`` slices them for a rank holding some of the layer's
heads). A file's knobs are served to calls on the GPU it names; the files of ``--interpret`` runs (gpu
``"triton-interpreter"``) to calls on CPU tensors; they need the same fgattn minor version, but not the
kernel checks above (Triton version, search space), which concern the kernel entries only. The predictors
ask for them (``predictors.default.Default``, ``CachedMask``) when the user gave no value for the knob: a
bare ``attention(q, k, v, predictor="default")`` gets layer ``"*"``; ``integrations.install`` binds each layer's
index (``Predictor.at(layer=...)``), so every layer gets its own values.

``registry/`` (in the checkout) holds the rendered source of every variant the shipped tuned files name,
once per variant key (``registry/<variant-key>.py`` or ``.cu``), so a reader sees exactly the kernel that runs;
``python -m fgattn_gen.registry`` regenerates it (``fgattn-tune`` users run it after committing new
tuned files) and a test fails when it drifts from ``templates/``.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from . import __version__
from .backends import BACKENDS, spec
from .catalogue import space_hash
from .checks import check_density
from .environment import tuned_dir
from .render import render
from .tuned import gpu_slug, load_tuned
from .variant import DTYPE_NAMES, DTYPES, HEAD_DIMS, HOPPER_SMEM, Variant, default_variant, dtype_name

SHIPPED = tuned_dir()
SOURCES = Path(__file__).resolve().parent.parent / "registry"  # the checkout's rendered sources


@dataclass(frozen=True)
class TunedChoice:
    """One tuned (shape, density) -> variant result served by the registry."""

    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    seq_q: int
    seq_k: int
    density: float
    variant: Variant
    source: str


@dataclass(frozen=True)
class CalibratedKnobs:
    """One ``predictor_knobs.<predictor>`` section of a tuned file (``tuned.py``) served by the registry."""

    predictor: str
    shape: tuple  # (heads, seq_q, seq_k, head_dim, block_m, block_n)
    knob: str
    fixed: dict
    layers: dict  # layer index or "*" -> per-head values
    source: str

    def knobs(self, layer: int | None) -> dict:
        """``{**fixed, knob: [per-head values]}`` of ``layer`` (``"*"`` for layers not calibrated)."""
        values = self.layers.get(layer, self.layers["*"])
        return {**self.fixed, self.knob: list(values)}


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _mismatch(meta: dict, gpu: str, layouts: set[tuple]) -> str | None:
    """Why a file's metadata rules it out for ``gpu`` (None if it may be served)."""
    if meta["interpret"]:
        return "it was tuned in Triton's CPU interpreter"
    if meta["gpu"] != gpu:
        return f"it was tuned on {meta['gpu']!r}, this GPU is {gpu!r}"
    if _minor(meta["fgattn"]) != _minor(__version__):
        return f"fgattn {meta['fgattn']} wrote it, this is {__version__}"
    if meta["triton"] != triton.__version__:
        return f"Triton {meta['triton']} compiled its kernels, this is {triton.__version__}"
    searched = meta.get("search_backends")  # files from before multi-backend tuning: the best's backend
    stale = [layout for layout in layouts
             if space_hash(tuple(searched or layout[:1]), dtype=layout[1], head_dim=layout[2], block_m=layout[3],
                           block_n=layout[4]) != meta["search_space_hash"]]
    if stale:
        return "its search space (variants or template sources) differs from the current one"
    return None


class Registry:
    """Tuned choices per GPU name, loaded lazily from ``dirs``; see the module docstring."""

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs
        self._lock = threading.Lock()
        self._choices: dict[str, list[TunedChoice]] = {}
        self._knobs: dict[str, list[CalibratedKnobs]] = {}
        self._warned: set[str] = set()

    def _files(self, gpu: str) -> list[Path]:
        """The tuned YAMLs to read: regular files only (a FIFO or device named ``*.yaml`` would block or
        never end when read: skipped with one warning); a search directory that does not exist or is not a
        directory is reported once."""
        files = []
        for root in self.dirs:
            if root == SHIPPED:  # shipped files are sorted by GPU: only this GPU's folder applies
                folder = root / gpu_slug(gpu)
                found = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
            elif root.is_dir():
                found = sorted(root.rglob("*.yaml"))
            else:
                why = "does not exist" if not root.exists() else "is not a directory"
                self._warn_once(root, f"FGATTN_TUNED_PATH entry {why}", what="ignoring")
                continue
            for path in found:
                if path.is_file():
                    files.append(path)
                elif path.exists():
                    self._warn_once(path, "not a regular file (never opened)")
        return files

    def _warn_once(self, path: Path, why: str, what: str = "skipping") -> None:
        if str(path) not in self._warned:
            self._warned.add(str(path))
            warnings.warn(f"fgattn registry: {what} {path}: {why}", stacklevel=4)

    def choices(self, gpu: str) -> list[TunedChoice]:
        """Every servable tuned choice for GPU name ``gpu`` (loaded once)."""
        with self._lock:
            if gpu not in self._choices:
                self._choices[gpu], self._knobs[gpu] = self._load(gpu)
            return self._choices[gpu]

    def calibrations(self, gpu: str) -> list[CalibratedKnobs]:
        """Every servable calibration for GPU name ``gpu`` (``INTERPRETER_GPU``: calls on CPU tensors), loaded once."""
        self.choices(gpu)
        return self._knobs[gpu]

    def _load(self, gpu: str) -> tuple[list[TunedChoice], list[CalibratedKnobs]]:
        out, knobs = [], []
        for path in self._files(gpu):
            try:
                data = load_tuned(path)
            except (OSError, ValueError) as exc:
                self._warn_once(path, f"not a valid tuned file ({exc})")
                continue
            meta = data["metadata"]
            if meta["gpu"] == gpu and _minor(meta["fgattn"]) == _minor(__version__):
                for predictor, c in data.get("predictor_knobs", {}).items():
                    shape = tuple(c["shape"][n] for n in ("heads", "seq_q", "seq_k", "head_dim", "block_m",
                                                          "block_n"))
                    layers = {layer: tuple(values[c["knob"]]) for layer, values in c["layers"].items()}
                    knobs.append(CalibratedKnobs(predictor, shape, c["knob"], dict(c["fixed"]), layers, str(path)))
            if gpu == INTERPRETER_GPU or not data["entries"]:  # no kernel entries to serve (or none here)
                continue
            layouts = {(e["best"]["backend"], e["shape"]["dtype"], e["shape"]["head_dim"], e["shape"]["block_m"],
                        e["shape"]["block_n"]) for e in data["entries"]}
            why = _mismatch(data["metadata"], gpu, layouts)
            if why:
                self._warn_once(path, why)
                continue
            for e in data["entries"]:
                s = e["shape"]
                out.append(TunedChoice(s["dtype"], s["head_dim"], s["block_m"], s["block_n"], s["seq_q"], s["seq_k"],
                                       float(e["density"]), Variant(**e["best"]["params"]), str(path)))
        return out, knobs

    def calibration(self, *, gpu: str, predictor: str, heads: int, seq_q: int, seq_k: int, head_dim: int,
                    block_m: int, block_n: int) -> CalibratedKnobs | None:
        """The calibration of ``predictor`` for this shape and layout (module docstring), or None."""
        found = [c for c in self.calibrations(gpu) if c.predictor == predictor
                 and (c.shape[0], c.shape[3], c.shape[4], c.shape[5]) == (heads, head_dim, block_m, block_n)]
        if not found:
            return None

        def distance(c: CalibratedKnobs) -> float:
            return abs(math.log(c.shape[1] / seq_q)) + abs(math.log(c.shape[2] / seq_k))

        nearest = min(found, key=distance)
        return nearest if distance(nearest) <= math.log(2.0) else None

    def lookup(self, *, gpu: str, dtype: str, head_dim: int, seq_q: int, seq_k: int, density: float | None,
               block_m: int, block_n: int, smem_limit: int = HOPPER_SMEM, backend: str | None = None) -> Variant:
        """The variant for this call (of ``backend`` only, when given); see the module docstring."""
        layout = [c for c in self.choices(gpu)
                  if (c.dtype, c.head_dim, c.block_m, c.block_n) == (dtype, head_dim, block_m, block_n)
                  and backend in (None, c.variant.backend)]
        if not layout:
            return default_variant(dtype=DTYPES[dtype], head_dim=head_dim, block_m=block_m, block_n=block_n,
                                   smem_limit=smem_limit, backend=backend or "triton")
        d = 1.0 if density is None else density

        def distance(c: TunedChoice) -> tuple[float, float]:
            seq = abs(math.log(c.seq_q / seq_q)) + abs(math.log(c.seq_k / seq_k))
            return round(seq, 6), round(abs(math.log(c.density / d)), 6)

        exact = [c for c in layout if (c.seq_q, c.seq_k) == (seq_q, seq_k)]
        if exact:
            return min(exact, key=distance).variant

        nearest = min(layout, key=distance)
        if distance(nearest)[0] <= math.log(2.0):  # within a factor of two in sequence length
            return nearest.variant
        return Counter(c.variant for c in layout).most_common(1)[0][0]


INTERPRETER_GPU = "triton-interpreter"  # metadata.gpu of --interpret runs: their knobs serve calls on CPU tensors


def search_dirs() -> list[Path]:
    """``FGATTN_TUNED_PATH`` directories, then the shipped ``tuned/``."""
    extra = [Path(p) for p in os.environ.get("FGATTN_TUNED_PATH", "").split(os.pathsep) if p]
    return extra + [SHIPPED]


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry over ``search_dirs()`` (``reload()`` rebuilds it)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry(search_dirs())
        return _REGISTRY


def reload() -> None:
    """Forget loaded files and cached lookups (after FGATTN_TUNED_PATH or tuned files change)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        _REGISTRY = None
    _cached_lookup.cache_clear()
    _cached_knobs.cache_clear()
    _device_info.cache_clear()
    _cuda_gpu.cache_clear()
    _gpu_of.cache_clear()


@functools.lru_cache(maxsize=64)
def _device_info(device: torch.device) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(device)
    return props.name, props.shared_memory_per_block_optin


@functools.lru_cache(maxsize=4096)
def _cached_lookup(gpu: str, dtype: str, head_dim: int, seq_q: int, seq_k: int, density: float | None,
                   block_m: int, block_n: int, smem_limit: int, backend: str | None) -> Variant:
    return default_registry().lookup(gpu=gpu, dtype=dtype, head_dim=head_dim, seq_q=seq_q, seq_k=seq_k,
                                     density=density, block_m=block_m, block_n=block_n, smem_limit=smem_limit,
                                     backend=backend)


@functools.lru_cache(maxsize=64)
def _gpu_of(device) -> tuple[str, int]:
    """``(GPU name, shared memory per block)`` of ``device`` (a CUDA device or a GPU name); ValueError /
    TypeError naming ``device`` for anything else, a device that does not exist included."""
    if isinstance(device, str) and re.fullmatch(r"(cpu|cuda|meta|mps|xpu|hip|xla|lazy|ipu|hpu|mtia)(:\d+)?", device):
        device = torch.device(device)  # a device string, not a GPU name
    if isinstance(device, str):
        if not device.strip():
            raise ValueError("device: expected a CUDA device or a GPU name such as 'NVIDIA H200', got ''")
        return device, HOPPER_SMEM
    if not isinstance(device, torch.device):
        raise TypeError(f"device: expected a torch.device or a GPU name such as 'NVIDIA H200', got "
                        f"{type(device).__name__}")
    if device.type != "cuda":
        raise ValueError(f"device: expected a CUDA device or a GPU name such as 'NVIDIA H200', got {device!r}")
    return _cuda_gpu(device)


@functools.lru_cache(maxsize=64)
def _cuda_gpu(device: torch.device) -> tuple[str, int]:
    """``_device_info`` of a CUDA device that exists (once per device: ``attention()`` looks up on every call)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.cuda.current_device() if device.index is None and count else device.index or 0
    if not 0 <= index < count:
        raise ValueError(f"device: {device} does not exist (this machine has {count} CUDA device(s)); pass a GPU "
                         f"name such as 'NVIDIA H200' to look up without one")
    return _device_info(torch.device("cuda", index))


def lookup(*, device: torch.device | str, dtype: torch.dtype, head_dim: int, seq_q: int, seq_k: int,
           density: float | None = None, block_n: int = 1, block_m: int = 128,
           backend: str | None = None) -> Variant:
    """The best known variant for an attention call.

    Args:
        device: a CUDA ``torch.device`` or a GPU name such as ``"NVIDIA H100 80GB HBM3"``.
        dtype: torch.bfloat16 or torch.float16. head_dim: 64 or 128.
        seq_q, seq_k: sequence lengths. density: key density in (0, 1] if known (None: taken as 1.0).
        block_n, block_m: the KeySet's key granularity and query block.
        backend: None (the fastest tuned kernel), or ``"triton"`` / ``"cuda"``: the best of that backend.
    Returns:
        A Variant (``.key``, ``.backend``, ``.params``); never fails for a valid layout.
    Raises:
        ValueError (TypeError for a ``device`` of another type) whose message starts with the argument: a
        length or block below 1, a density outside (0, 1], another dtype or head dim, an unknown backend, a
        ``block_m`` the backend cannot serve, a device that is not CUDA or does not exist on this machine.
    """
    for name, value in (("seq_q", seq_q), ("seq_k", seq_k), ("head_dim", head_dim), ("block_n", block_n),
                        ("block_m", block_m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    density = check_density(density)
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPE_NAMES)}, got {dtype!r}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    multiple = spec(backend or "triton").block_m_multiple
    if block_m % multiple:
        raise ValueError(f"block_m: expected a multiple of {multiple} for the {backend or 'triton'} kernels, "
                         f"got {block_m}")
    return served(device, dtype, head_dim, seq_q, seq_k, density, block_m, block_n, backend)


def served(device: torch.device | str, dtype: torch.dtype, head_dim: int, seq_q: int, seq_k: int,
           density: float | None, block_m: int, block_n: int, backend: str | None) -> Variant:
    """``lookup`` without its argument checks: the attention op's path, whose inputs ``attention()`` has
    checked (a warm call is a dictionary hit)."""
    gpu, smem = _gpu_of(device)
    return _cached_lookup(gpu, dtype_name(dtype), head_dim, seq_q, seq_k, density, block_m, block_n, smem, backend)


@functools.lru_cache(maxsize=4096)
def _cached_knobs(gpu: str, predictor: str, heads: int, seq_q: int, seq_k: int, head_dim: int, block_m: int,
                  block_n: int, layer, head_range: tuple[int, int] | None) -> dict | None:
    total = heads if head_range is None else head_range[1]
    found = default_registry().calibration(gpu=gpu, predictor=predictor, heads=total, seq_q=seq_q, seq_k=seq_k,
                                           head_dim=head_dim, block_m=block_m, block_n=block_n)
    if found is None:
        return None
    knobs = found.knobs(layer)
    if head_range is None:
        return knobs
    first = head_range[0]  # this call's heads of the layer's: the slice of the per-head knob
    return {**knobs, found.knob: knobs[found.knob][first:first + heads]}


def served_knobs(*, device: torch.device | str, predictor: str, heads: int, seq_q: int, seq_k: int, head_dim: int,
                 block_m: int, block_n: int, layer: int | None = None,
                 head_range: tuple[int, int] | None = None) -> dict | None:
    """Calibrated knobs of ``predictor`` for an attention call (module docstring), or None.

    Args:
        device: the inputs' device (CUDA: this GPU's tuned files; CPU: those of ``--interpret`` runs), or a
            GPU name. predictor: a predictor name (``tuned.CALIBRATED_KNOBS``).
        heads, seq_q, seq_k, head_dim: q ``[B, heads, seq_q, head_dim]``, k ``[B, heads, seq_k, head_dim]``.
        block_m, block_n: the predictor's KeySet layout. layer: the layer index, None for ``"*"``.
        head_range: ``(first, total)`` when the call holds heads ``first .. first + heads`` of a layer of
            ``total`` heads (a rank under Ulysses context parallelism): the calibration of ``total`` heads is
            served, its per-head lists sliced. None: the call holds every head.
    Returns:
        ``{knob: [heads values], **fixed knobs}`` (a shared dict: do not modify), or None. A warm call is a
        dictionary hit (no host sync).
    """
    if isinstance(device, str) and re.fullmatch(r"cpu(:\d+)?", device):
        device = torch.device(device)
    cpu = isinstance(device, torch.device) and device.type == "cpu"
    gpu = INTERPRETER_GPU if cpu else _gpu_of(device)[0]
    if head_range is not None:
        first, total = head_range
        if not (isinstance(first, int) and isinstance(total, int) and 0 <= first and first + heads <= total):
            raise ValueError(f"head_range: expected (first, total) with 0 <= first and first + heads ({heads}) "
                             f"<= total, got {head_range!r}")
    return _cached_knobs(gpu, predictor, heads, seq_q, seq_k, head_dim, block_m, block_n,
                         "*" if layer is None else layer, None if head_range is None else tuple(head_range))


def shipped_variants() -> dict[str, set[Variant]]:
    """GPU slug -> every variant (best and runners-up) named by the shipped ``tuned/<slug>/*.yaml``."""
    out: dict[str, set[Variant]] = {}
    for path in sorted(SHIPPED.glob("*/*.yaml")):
        data = load_tuned(path)
        for entry in data["entries"]:
            for result in (entry["best"], *entry["runners_up"]):
                out.setdefault(path.parent.name, set()).add(Variant(**result["params"]))
    return out


def expected_sources() -> dict[Path, str]:
    """``registry/`` path -> rendered source, once for every variant a shipped tuned file names."""
    variants = {v for served in shipped_variants().values() for v in served}
    return {SOURCES / f"{v.key}{spec(v.backend).source_suffix}": render(v) for v in variants}


def write_sources() -> list[Path]:
    """Regenerate ``registry/`` from the shipped tuned files and ``templates/``; returns the files written."""
    expected = expected_sources()
    for stale in [*SOURCES.glob("*/*.*"), *SOURCES.glob("*.*")]:
        if stale not in expected:
            stale.unlink()
    for folder in SOURCES.glob("*/"):
        folder.rmdir()
    for path, text in expected.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted(expected)


if __name__ == "__main__":
    for written in write_sources():
        print(written.relative_to(SOURCES.parent))
