"""``fgattn-tune --merge A.yaml B.yaml ... --out DIR``: one tuned file from the tuned files of several runs on
the same GPU model (several hosts, or runs with other ``--densities``).

The files must agree on ``gpu``, the fgattn minor version (``0.1`` of ``0.1.3``), ``triton``,
``search_space_hash``, ``interpret`` and ``model``; a mismatch is a ``MergeError`` naming the file and the
key. Entries are matched by (label, seq_q, seq_k, density, layout: dtype, head_dim, block_m, block_n); for
each, every file's ``best`` and ``runners_up`` are pooled, one result per variant (its fastest), and ranked
by ``ms``: the fastest is ``best``, the next up to three are ``runners_up``. The other fields of the merged
entry (``measured``, ``baselines``, trial counts) are those of the entry whose best won. Entries only one
file has are kept as they are; so are ``predictor_knobs`` sections (the same predictor calibrated differently in
two files is a MergeError).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from ..tuned import SCHEMA_VERSION, gpu_slug, load_tuned, validate_tuned, write_tuned

N_RUNNERS_UP = 3
MATCHED_KEYS = ("gpu", "fgattn", "triton", "search_space_hash", "interpret", "model")
_LAYOUT = ("dtype", "head_dim", "block_m", "block_n")


class MergeError(ValueError):
    """Files that cannot be merged; the message names the file (and the metadata key)."""


def _minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def _compared(meta: dict, key: str):
    return _minor(meta[key]) if key == "fgattn" else meta[key]


def entry_key(entry: dict) -> tuple:
    """What identifies an entry across files: (label, seq_q, seq_k, density, layout)."""
    shape = entry["shape"]
    return (entry["label"], shape["seq_q"], shape["seq_k"], float(entry["density"]),
            tuple(shape[k] for k in _LAYOUT))


def merge_documents(documents: list[tuple[str, dict]]) -> dict:
    """Merge parsed tuned documents ``[(source name, document), ...]`` (see the module docstring); returns
    the merged, validated document. Raises MergeError naming the file for a schema error or a metadata
    mismatch."""
    if not documents:
        raise MergeError("--merge: no tuned files given")
    checked = []
    for source, doc in documents:
        try:
            checked.append((source, validate_tuned(doc, source)))
        except ValueError as exc:
            raise MergeError(str(exc)) from None
    first_source, first = checked[0]
    first_meta = first["metadata"]
    for source, doc in checked[1:]:
        meta = doc["metadata"]
        for key in MATCHED_KEYS:
            if _compared(meta, key) != _compared(first_meta, key):
                raise MergeError(f"{source}: metadata.{key} is {meta[key]!r}, but {first_source} has "
                                 f"{first_meta[key]!r}; only tuned files of the same {key} can be merged")

    order: list[tuple] = []
    groups: dict[tuple, list[dict]] = {}
    for _, doc in checked:
        for entry in doc["entries"]:
            key = entry_key(entry)
            if key not in groups:
                order.append(key)
                groups[key] = []
            groups[key].append(entry)

    entries = []
    for key in order:
        group = groups[key]
        winner = min(group, key=lambda e: e["best"]["ms"])
        fastest: dict[str, dict] = {}
        for entry in group:
            for result in (entry["best"], *entry["runners_up"]):
                if result["key"] not in fastest or result["ms"] < fastest[result["key"]]["ms"]:
                    fastest[result["key"]] = result
        ranked = sorted(fastest.values(), key=lambda r: r["ms"])
        entries.append({**winner, "best": dict(ranked[0]),
                        "runners_up": [dict(r) for r in ranked[1: 1 + N_RUNNERS_UP]]})

    meta = dict(first_meta)
    backends: list[str] = []
    for _, doc in checked:
        for backend in doc["metadata"].get("search_backends", []):
            if backend not in backends:
                backends.append(backend)
    if backends:
        meta["search_backends"] = backends
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    merged = {"schema": SCHEMA_VERSION, "metadata": meta, "entries": entries}
    knobs = _merged_knobs(checked)
    if knobs:
        merged["predictor_knobs"] = knobs
    return validate_tuned(merged, "merged document")


def _merged_knobs(checked: list[tuple[str, dict]]) -> dict:
    """Every file's ``predictor_knobs`` sections; the same predictor calibrated differently by two files is
    a MergeError (there is no measure to rank two calibrations by)."""
    knobs: dict[str, tuple[str, dict]] = {}
    for source, doc in checked:
        for predictor, section in doc.get("predictor_knobs", {}).items():
            if predictor in knobs and knobs[predictor][1] != section:
                raise MergeError(f"{source}: predictor_knobs.{predictor} differs from {knobs[predictor][0]}'s; "
                                 f"merge files with one calibration of each predictor (drop one of them)")
            knobs.setdefault(predictor, (source, section))
    return {predictor: dict(section) for predictor, (_, section) in knobs.items()}


def merged_path(out: str | Path, document: dict) -> Path:
    """``<out>/<gpu-slug>/<model>.yaml``."""
    meta = document["metadata"]
    return Path(out) / gpu_slug(meta["gpu"]) / f"{meta['model']}.yaml"


def merge_files(paths: list[str | Path], out: str | Path) -> tuple[Path, dict]:
    """Read, merge and write the tuned files ``paths`` to ``merged_path(out, ...)``; returns (path, document).
    Raises MergeError for unreadable or mismatched files (nothing is written then)."""
    documents = []
    for path in paths:
        try:
            documents.append((str(path), load_tuned(path)))
        except ValueError as exc:  # names the file
            raise MergeError(f"--merge: {' '.join(str(exc).split())}") from None
        except OSError as exc:
            raise MergeError(f"--merge: {path}: cannot be read ({exc.strerror or exc})") from None
    merged = merge_documents(documents)
    target = merged_path(out, merged)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_tuned(target, merged)
    return target, merged
