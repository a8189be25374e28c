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
      space_note: str                    # optional: why search_space_hash was restamped without a new search
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

    predictor_knobs:                     # optional (``fgattn-tune --calibrate``): calibrated predictor knobs
      <predictor>:                       # a key of CALIBRATED_KNOBS: default, cached_exact
        knob: str                        # CALIBRATED_KNOBS[predictor]: threshold_scale or threshold
        target_error: float              # in (0, 1]: rel-L2 error of each head's output vs dense attention
        statistic: max | mean            # of a head's error over the samples (and their batch)
        shape: {heads, seq_q, seq_k, head_dim, block_m, block_n: int}   # of the samples, and the layout
        samples: int                     # (q, k, v) samples per layer
        fixed: {knob: value}             # the other knobs during calibration (served with it to default; cached_exact takes only threshold)
        measured_heads: [int]            # optional: the heads the samples held (others got the densest value)
        layers:
          "*": {<knob>: [heads numbers]}         # layers not listed: per head the smallest (densest) value
          <layer index>: {<knob>: [heads numbers], error: [n numbers], density: [n numbers]}
                                         # n = heads, or len(measured_heads)

A knob value is in (0, seq_k] for threshold_scale and in (0, 1] for threshold; ``error`` and ``density`` (the
achieved statistic and the mean key density on the samples, per head) are >= 0 and <= 1 for density. Kernel
tuning keeps a file's ``predictor_knobs``, calibration keeps its ``entries``.

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
_METADATA_OPTIONAL = {"search_backends": list, "space_note": _STR}
_SHAPE = {"batch": _INT, "heads": _INT, "seq_q": _INT, "seq_k": _INT, "head_dim": _INT, "dtype": _STR,
          "block_m": _INT, "block_n": _INT}
_MEASURED = {"batch": _INT, "heads": _INT, "seq_q": _INT, "seq_k": _INT}
_RESULT = {"key": _STR, "backend": _STR, "params": dict, "ms": _NUM, "ms_p20": _NUM, "ms_p80": _NUM}
_ENTRY = {"label": _STR, "shape": _SHAPE, "measured": _MEASURED, "density": _NUM, "best": _RESULT,
          "runners_up": list, "n_trials": _INT, "n_pruned": _INT}
_ENTRY_OPTIONAL = {"baselines": dict}
CALIBRATED_KNOBS = {"default": "threshold_scale", "cached_exact": "threshold"}
ERROR_STATISTICS = ("max", "mean")
_KNOB_SHAPE = {"heads": _INT, "seq_q": _INT, "seq_k": _INT, "head_dim": _INT, "block_m": _INT, "block_n": _INT}
_CALIBRATION = {"knob": _STR, "target_error": _NUM, "statistic": _STR, "shape": _KNOB_SHAPE, "samples": _INT,
                "fixed": dict, "layers": dict}


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


def knob_upper(knob: str, seq_k: int) -> float:
    """The largest value of a calibrated knob: ``seq_k`` for threshold_scale, 1 for a threshold."""
    return float(seq_k) if knob == "threshold_scale" else 1.0


def _check_numbers(values, heads: int, ok, expected: str, where: str) -> None:
    if not isinstance(values, list) or len(values) != heads or not all(_type_ok(x, _NUM) and ok(x) for x in values):
        raise ValueError(f"{where}: expected a list of {heads} numbers {expected}, got {values!r}")


def _check_calibration(section, predictor, where: str) -> None:
    if predictor not in CALIBRATED_KNOBS:
        raise ValueError(f"{where}: expected predictor names from {tuple(CALIBRATED_KNOBS)}, got {predictor!r}")
    where = f"{where}.{predictor}"
    _check_mapping(section, _CALIBRATION, where)
    knob, shape = section["knob"], section["shape"]
    _check_range(knob, knob == CALIBRATED_KNOBS[predictor], f"{where}.knob", repr(CALIBRATED_KNOBS[predictor]))
    _check_range(section["target_error"], 0 < section["target_error"] <= 1, f"{where}.target_error",
                 "an error in (0, 1]")
    _check_range(section["statistic"], section["statistic"] in ERROR_STATISTICS, f"{where}.statistic",
                 f"one of {ERROR_STATISTICS}")
    _check_range(section["samples"], section["samples"] >= 1, f"{where}.samples", "an int >= 1")
    for name, value in shape.items():
        _check_range(value, value >= 1, f"{where}.shape.{name}", "an int >= 1")
    bad = [name for name in section["fixed"] if not isinstance(name, str) or name == knob]
    if bad:
        raise ValueError(f"{where}.fixed: expected the other knobs of {predictor} by name, got {bad[0]!r}")
    extra = set(section) - set(_CALIBRATION) - {"measured_heads"}
    if extra:
        raise ValueError(f"{where}: unknown key(s) {sorted(map(str, extra))}")
    measured = section.get("measured_heads")
    if measured is not None and (not isinstance(measured, list) or not measured or len(set(measured)) != len(measured)
                                 or not all(_type_ok(h, _INT) and 0 <= h < shape["heads"] for h in measured)):
        raise ValueError(f"{where}.measured_heads: expected distinct head indices in [0, {shape['heads']}), got "
                         f"{measured!r}")
    layers = section["layers"]
    if "*" not in layers:
        raise ValueError(f"{where}.layers: missing key '*' (the knobs of layers not listed)")
    heads, upper = shape["heads"], knob_upper(knob, shape["seq_k"])
    for layer, values in layers.items():
        at = f"{where}.layers[{layer!r}]"
        if layer != "*" and not (_type_ok(layer, _INT) and layer >= 0):
            raise ValueError(f"{where}.layers: expected '*' or layer indices >= 0 as keys, got {layer!r}")
        spec = {knob: list} if layer == "*" else {knob: list, "error": list, "density": list}
        _check_mapping(values, spec, at)
        extra = set(values) - set(spec)
        if extra:
            raise ValueError(f"{at}: unknown key(s) {sorted(map(str, extra))}; expected {sorted(spec)}")
        _check_numbers(values[knob], heads, lambda x: 0 < x <= upper, f"in (0, {upper:g}]", f"{at}.{knob}")
        if layer != "*":
            n = heads if measured is None else len(measured)
            _check_numbers(values["error"], n, lambda x: 0 <= x < float("inf"), ">= 0", f"{at}.error")
            _check_numbers(values["density"], n, lambda x: 0 <= x <= 1, "in [0, 1]", f"{at}.density")


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
    if "predictor_knobs" in data:
        knobs = data["predictor_knobs"]
        if not isinstance(knobs, dict):
            raise ValueError(f"{source}: predictor_knobs: expected a mapping, got {type(knobs).__name__}")
        for predictor, section in knobs.items():
            _check_calibration(section, predictor, f"{source}: predictor_knobs")
    unknown = set(data) - {"schema", "metadata", "entries", "predictor_knobs"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {sorted(map(str, unknown))}")
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
