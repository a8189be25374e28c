"""The tuned-variant file: ``tuned/<gpu-slug>/<model>.yaml`` (``gpu_slug``), written by ``fgattn-tune``, served by
the registry.

Schema (version 1)::

    schema: 1
    metadata:
      fgattn, torch, triton: str         # versions
      optuna: str
      cuda: str | null                   # torch.version.cuda
      gpu: str                           # torch.cuda.get_device_name(), or "triton-interpreter"
      sm: str | null                     # compute capability "9.0"; null under the interpreter
      search_space_hash: str             # fgattn_gen.catalogue.space_hash of the layout
      search_backends: [str]             # optional: the backends searched together (default: best's)
      date: str                          # ISO 8601, UTC
      interpret: bool                    # true: CPU interpreter run, times rank nothing on a GPU
      model: str
      tuned_heads_note: str              # how ``measured`` relates to ``shape``
    entries:
      - label: str                       # the model's shape name, e.g. "720p-129f"
        shape: {batch, heads, seq_q, seq_k, head_dim: int, dtype: str, block_m, block_n: int}
        measured: {batch, heads, seq_q, seq_k: int}   # the shape that was actually timed
        density: float                   # requested key density
        best: {key: str, backend: str, params: {Variant fields}, ms, ms_p20, ms_p80: float}
        runners_up: [up to 3 of the same form as best], fastest first
        baselines: {sdpa-cudnn: float, flex-block128: float}   # optional (GPU runs only), ms at ``measured``
        n_trials: int                    # finished trials (complete + pruned)
        n_pruned: int

``load_tuned`` checks all of it, including that each result's ``params`` build a Variant whose key is
``key`` and every number's range; ``write_tuned`` checks before it writes and replaces the file atomically
(fsync'd, with the umask's mode).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .environment import write_atomic
from .variant import BACKENDS, Variant

SCHEMA_VERSION = 1


def gpu_slug(name: str) -> str:
    """The folder of a GPU's tuned files: ``"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

_STR, _INT, _NUM, _BOOL = "str", "int", "number", "bool"
_OPT_STR = "str or null"
_METADATA = {
    "fgattn": _STR, "torch": _STR, "triton": _STR, "optuna": _STR, "cuda": _OPT_STR, "gpu": _STR, "sm": _OPT_STR,
    "search_space_hash": _STR, "date": _STR, "interpret": _BOOL, "model": _STR, "tuned_heads_note": _STR,
}
_METADATA_OPTIONAL = {"search_backends": list}
_SHAPE = {"batch": _INT, "heads": _INT, "seq_q": _INT, "seq_k": _INT, "head_dim": _INT, "dtype": _STR,
          "block_m": _INT, "block_n": _INT}
_MEASURED = {"batch": _INT, "heads": _INT, "seq_q": _INT, "seq_k": _INT}
_RESULT = {"key": _STR, "backend": _STR, "params": dict, "ms": _NUM, "ms_p20": _NUM, "ms_p80": _NUM}
_ENTRY = {"label": _STR, "shape": _SHAPE, "measured": _MEASURED, "density": _NUM, "best": _RESULT,
          "runners_up": list, "n_trials": _INT, "n_pruned": _INT}
_ENTRY_OPTIONAL = {"baselines": dict}


def _type_ok(value, kind) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _OPT_STR:
        return value is None or isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    return isinstance(value, kind)


def _check_mapping(data, spec: dict, where: str, optional: dict | None = None) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    missing = [key for key in spec if key not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    for key, kind in {**spec, **(optional or {})}.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(kind, dict):
            _check_mapping(value, kind, f"{where}.{key}")
        elif not _type_ok(value, kind):
            expected = kind if isinstance(kind, str) else kind.__name__
            raise ValueError(f"{where}.{key}: expected {expected}, got {value!r}")


def _check_range(value, ok: bool, where: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"{where}: expected {expected}, got {value!r}")


def _check_result(result, where: str) -> None:
    _check_mapping(result, _RESULT, where)
    for name in ("ms", "ms_p20", "ms_p80"):
        _check_range(result[name], result[name] > 0, f"{where}.{name}", "a time > 0")
    try:
        variant = Variant(**result["params"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}.params: not a valid variant: {exc}") from None
    if variant.key != result["key"] or variant.backend != result["backend"]:
        raise ValueError(f"{where}: key {result['key']!r} / backend {result['backend']!r} do not match "
                         f"params (variant {variant.key})")


def _check_entry(entry, where: str) -> None:
    _check_mapping(entry, _ENTRY, where, _ENTRY_OPTIONAL)
    for part in ("shape", "measured"):
        for name, value in entry[part].items():
            if name != "dtype":
                _check_range(value, value >= 1, f"{where}.{part}.{name}", "an int >= 1")
    _check_range(entry["density"], 0 < entry["density"] <= 1, f"{where}.density", "a key density in (0, 1]")
    _check_result(entry["best"], f"{where}.best")
    if len(entry["runners_up"]) > 3:
        raise ValueError(f"{where}.runners_up: expected at most 3, got {len(entry['runners_up'])}")
    for i, result in enumerate(entry["runners_up"]):
        _check_result(result, f"{where}.runners_up[{i}]")
    for name, ms in entry.get("baselines", {}).items():
        if not isinstance(name, str) or not _type_ok(ms, _NUM):
            raise ValueError(f"{where}.baselines: expected name: ms pairs, got {name!r}: {ms!r}")


def validate_tuned(data, source: str = "tuned data") -> dict:
    """Check a parsed tuned document against schema 1; returns it, or raises ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{source}: schema: expected {SCHEMA_VERSION}, got {data.get('schema')!r}")
    _check_mapping(data, {"metadata": dict, "entries": list}, source)
    _check_mapping(data["metadata"], _METADATA, f"{source}.metadata", _METADATA_OPTIONAL)
    backends = data["metadata"].get("search_backends")
    if backends is not None and (not backends or any(b not in BACKENDS for b in backends)):
        raise ValueError(f"{source}.metadata.search_backends: expected a non-empty list of {BACKENDS}, "
                         f"got {backends!r}")
    for i, entry in enumerate(data["entries"]):
        _check_entry(entry, f"{source}: entries[{i}]")
    return data


def load_tuned(path: str | os.PathLike) -> dict:
    """Read and validate a tuned YAML file; raises ValueError naming ``path`` (not a regular file, not UTF-8
    text, unreadable YAML, schema violation) or OSError (cannot be read). A FIFO or device is never opened."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return validate_tuned(data, str(path))


def write_tuned(path: str | os.PathLike, data: dict) -> None:
    """Validate ``data`` and write it as YAML to ``path`` atomically (temp file, fsync, ``os.replace``, fsync of
    the folder), with the mode a new file gets from the umask."""
    path = Path(path)
    text = yaml.safe_dump(validate_tuned(data, str(path)), sort_keys=False, default_flow_style=None, width=120)
    write_atomic(path, text, fsync=True)
