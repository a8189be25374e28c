"""Finished studies -> the tuned YAML document of ``fgattn_gen.tuned`` (schema 1).

An entry's ``best`` is the fastest COMPLETE trial, ``runners_up`` the next up to 3 distinct variants.
When the output file already exists for the same device, model, search space and mode, its entries for
(shape, density) pairs that this run did not tune (e.g. other ``--densities``) are kept, and so are its
``predictor_knobs`` (``--calibrate``) when device, model and mode match (whatever the search space). An existing file
that cannot be read is moved aside to ``<name>.corrupt-<UTC timestamp>`` (and reported) before the new file
is written; a readable one of another device, model, search space or mode is replaced with a note.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
import triton
from optuna.trial import FrozenTrial, TrialState

from .. import __version__
from ..models import AttentionShape, ModelSpec
from ..tuned import SCHEMA_VERSION, load_tuned
from .device import Device
from .space import SearchSpace
from .study import finished_trials
from .workload import MeasuredShape

N_RUNNERS_UP = 3
KNOB_KEYS = ("gpu", "model", "interpret")  # metadata a file's predictor_knobs are kept across runs for
_GPU_NOTE = ("Times are medians in ms measured at `measured`: the model's sequence lengths with measured.heads of "
             "shape.heads heads, min(heads, ceil(4 * n_SMs / n_qblocks)), enough for one launch to fill the GPU. "
             "A full layer takes about shape.heads / measured.heads times as long. Baselines are timed at the "
             "same measured shape.")
_INTERPRET_NOTE = ("Triton-interpreter run (CPU wall-clock) on the scaled-down `measured` shape: it exercises the "
                   "pipeline, its times rank nothing on a GPU.")


def tuned_path(out: Path, device_slug: str, model: str) -> Path:
    """``<out>/<device_slug>/<model>.yaml``."""
    return Path(out) / device_slug / f"{model}.yaml"


def _result(trial: FrozenTrial, space: SearchSpace) -> dict:
    variant = space.variant(trial.user_attrs["variant"])
    return {"key": variant.key, "backend": variant.backend, "params": variant.params, "ms": trial.value,
            "ms_p20": trial.user_attrs["ms_p20"], "ms_p80": trial.user_attrs["ms_p80"]}


def study_entry(study: optuna.Study, space: SearchSpace, model: ModelSpec, shape: AttentionShape, density: float,
                measured: MeasuredShape, baselines: dict[str, float]) -> dict | None:
    """The tuned entry of one study, or None when no trial completed (every variant pruned)."""
    finished = finished_trials(study)
    ranked: dict[str, FrozenTrial] = {}
    for trial in sorted((t for t in finished if t.state == TrialState.COMPLETE), key=lambda t: t.value):
        ranked.setdefault(trial.user_attrs["variant"], trial)
    if not ranked:
        return None
    results = [_result(t, space) for t in ranked.values()]
    entry = {
        "label": shape.name,
        "shape": {"batch": model.batch, "heads": model.heads, "seq_q": shape.seq, "seq_k": shape.seq,
                  "head_dim": model.head_dim, "dtype": model.dtype, "block_m": model.block_m,
                  "block_n": model.block_n},
        "measured": {"batch": measured.batch, "heads": measured.heads, "seq_q": measured.seq_q,
                     "seq_k": measured.seq_k},
        "density": density,
        "best": results[0],
        "runners_up": results[1: 1 + N_RUNNERS_UP],
    }
    if baselines:
        entry["baselines"] = dict(baselines)
    entry["n_trials"] = len(finished)
    entry["n_pruned"] = sum(t.state == TrialState.PRUNED for t in finished)
    return entry


def metadata(model: ModelSpec, device: Device, space: SearchSpace) -> dict:
    """The ``metadata`` block: versions, device, search-space hash, date, mode."""
    return {
        "fgattn": __version__, "torch": str(torch.__version__), "triton": triton.__version__,
        "optuna": optuna.__version__, "cuda": torch.version.cuda, "gpu": device.name, "sm": device.sm,
        "search_space_hash": space.hash, "search_backends": list(space.backends),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpret": device.interpret, "model": model.name,
        "tuned_heads_note": _INTERPRET_NOTE if device.interpret else _GPU_NOTE,
    }


@dataclass(frozen=True)
class Previous:
    """What becomes of an existing tuned file when a run writes its own.

    Attributes:
        kept: its entries of (shape, density) pairs this run did not tune, to write beside the new ones.
        unreadable: why it cannot be read (None when it can or there is none): it is moved aside before the
            new file is written (``move_aside``), never overwritten.
        not_kept: why a readable file's entries are not kept (another device, model, search space or mode).
    """

    kept: list[dict]
    unreadable: str | None = None
    not_kept: str | None = None
    knobs: dict | None = None  # its predictor_knobs (same device, model and mode), kept whatever the search space


def previous_entries(path: Path, meta: dict, entries: list[dict]) -> Previous:
    """Read the existing file at ``path`` (see ``Previous``); never raises for its content."""
    if not path.exists() and not path.is_symlink():
        return Previous([])
    try:
        old = load_tuned(path)
    except (OSError, ValueError) as exc:
        return Previous([], unreadable=" ".join(str(exc).split())[:300])
    same = ("gpu", "model", "search_space_hash", "interpret")
    differ = [k for k in same if old["metadata"][k] != meta[k]]
    knobs = old.get("predictor_knobs") if all(old["metadata"][k] == meta[k] for k in KNOB_KEYS) else None
    if differ:
        return Previous([], not_kept=", ".join(f"{k} {old['metadata'][k]!r} (now {meta[k]!r})" for k in differ),
                        knobs=knobs)
    new = {(e["label"], e["density"]) for e in entries}
    return Previous([e for e in old["entries"] if (e["label"], e["density"]) not in new], knobs=knobs)


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.corrupt-<UTC timestamp>`` beside it (never replacing a file); returns it."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.rename(path, aside)
    return aside


def tuned_document(meta: dict, entries: list[dict], knobs: dict | None = None) -> dict:
    """The full document: ``{schema, metadata, entries}``, and ``predictor_knobs`` when given."""
    document = {"schema": SCHEMA_VERSION, "metadata": meta, "entries": entries}
    if knobs:
        document["predictor_knobs"] = knobs
    return document
