"""``fgattn-tune --model NAME --calibrate``: calibrate a predictor's threshold knob per layer and head
(``predictors.calibrate``) and write it into the model's tuned file as ``predictor_knobs.<predictor>``.

Samples: a ``--samples`` directory written by ``integrations.capture`` (the user's own q/k/v), or DiT-like
data (``ditdata.dit_qkv``, family ``smooth``, seeds 0 and 1, as one layer ``"*"``) at the model's first preset
shape with a grid: the real shape on a GPU, a scaled-down one with ``--interpret`` (``INTERPRET_GRID`` frames x
height x width, at most ``INTERPRET_TEXT`` text tokens and ``workload.INTERPRET_HEADS`` heads). On the CPU the
predictors run their torch ops in fp32 (calibration measures masks, not kernels: no interpreter needed).
Heads a capture left out get, per layer, the smallest (densest) value of the captured heads (the file then records ``measured_heads``, and the achieved
``error`` / ``density`` lists are those of the captured heads, in their order).

The file: an existing readable one of the same GPU, model and mode keeps its metadata, kernel ``entries`` and
the other predictors' calibrations; one of another GPU, model or mode is replaced (with a note); an unreadable
one is moved aside (``export.move_aside``). A new file gets this run's metadata and no kernel entries.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from ..ditdata import DitShape, dit_qkv
from ..models import ModelSpec
from ..predictors.calibration import Calibration, calibrate
from ..tuned import load_tuned, write_tuned
from ..variant import DTYPES
from .device import Device
from .export import KNOB_KEYS, metadata, move_aside, tuned_document, tuned_path
from .space import SearchSpace
from .workload import INTERPRET_HEADS

INTERPRET_GRID = (2, 8, 16)  # 256 video tokens
INTERPRET_TEXT = 16
DATA_SEEDS = (0, 1)


def ditdata_samples(model: ModelSpec, device: Device) -> list:
    """``[(q, k, v) per seed]`` (calibrated as layer ``"*"``) at the model's first shape with a grid (module docstring)."""
    shape = next((s for s in model.shapes if s.grid is not None), None)
    if shape is None:
        raise ValueError(f"--calibrate: model {model.name} has no shape with a grid (frames x height x width) to "
                         f"generate DiT-like data for; pass --samples DIR (integrations.capture)")
    dit = DitShape(f"{model.name}-{shape.name}", *shape.grid, shape.text_tokens, model.heads, model.head_dim,
                   text_first=model.text_first)
    dtype = DTYPES[model.dtype]
    if device.interpret:
        dit = replace(dit, frames=INTERPRET_GRID[0], height=INTERPRET_GRID[1], width=INTERPRET_GRID[2],
                      text_tokens=min(shape.text_tokens, INTERPRET_TEXT), heads=min(model.heads, INTERPRET_HEADS))
        dtype = torch.float32
    data = [dit_qkv(dit, seed=seed, dtype=dtype, device=device.torch_device) for seed in DATA_SEEDS]
    return [(a.q, a.k, a.v) for a in data]


def expand_heads(calibration: Calibration, captured: tuple[int, ...], total: int) -> Calibration:
    """A calibration of the ``captured`` heads -> one of all ``total`` heads (the others: per layer the
    smallest captured value)."""
    if list(captured) == list(range(total)):
        return calibration

    def spread(values, fill):
        out = [fill] * total
        for i, head in enumerate(captured):
            out[head] = values[i]
        return out

    values = {layer: spread(v, min(v)) for layer, v in calibration.values.items()}
    shape = {**calibration.shape, "heads": total}
    return replace(calibration, values=values, shape=shape, measured_heads=tuple(captured))


def write_calibration(path: Path, calibration: Calibration, meta: dict, console: Console) -> dict:
    """Put ``calibration`` into the tuned file at ``path`` (module docstring); returns the written document."""
    section = calibration.section()
    document = None
    if path.exists() or path.is_symlink():
        try:
            old = load_tuned(path)
        except (OSError, ValueError) as exc:
            aside = move_aside(path)
            console.print(f"[yellow]warning: the existing tuned file {escape(str(path))} cannot be read "
                          f"({escape(' '.join(str(exc).split())[:300])}); kept aside as {escape(str(aside))}")
        else:
            differ = [k for k in KNOB_KEYS if old["metadata"][k] != meta[k]]
            if differ:
                console.print(f"[yellow]note: {escape(str(path))} is of another "
                              f"{', '.join(differ)}; it is replaced")
            else:
                document = old
    if document is None:
        document = tuned_document(meta, [])
    document["predictor_knobs"] = {**document.get("predictor_knobs", {}), calibration.predictor: section}
    write_tuned(path, document)
    return document


def calibrate_model(model: ModelSpec, device: Device, space: SearchSpace, *, out: Path, samples_dir: Path | None,
                    target_error: float, predictor: str, statistic: str, console: Console) -> Path:
    """Run ``--calibrate`` for ``model``; returns the tuned file written. ValueError (bad samples, an
    unreachable target) before anything is written."""
    on_cpu = device.torch_device.type == "cpu"
    dtype = torch.float32 if on_cpu else DTYPES[model.dtype]
    if samples_dir is not None:
        from ..integrations.capture import load_samples

        samples, captured, total = load_samples(samples_dir, dtype=dtype, device=device.torch_device)
    else:
        samples = ditdata_samples(model, device)
        captured = total = None
    calibration = calibrate(samples, target_error=target_error, predictor=predictor, statistic=statistic,
                            block_m=model.block_m, block_n=model.block_n)
    if captured is not None:
        calibration = expand_heads(calibration, captured, total)
    path = tuned_path(out, device.slug, model.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_calibration(path, calibration, metadata(model, device, space), console)
    for layer in sorted(calibration.errors, key=str):
        values = ", ".join(f"{x:.3g}" for x in calibration.values[layer])
        worst = max(calibration.errors[layer])
        density = sum(calibration.densities[layer]) / len(calibration.densities[layer])
        console.print(f"layer {layer}: {calibration.knob} per head [{values}]; error ({statistic}) <= {worst:.3g}, "
                      f"mean density {density:.3f}")
    console.print(f"wrote predictor_knobs.{predictor} (target error {target_error:g}) to {path}")
    return path
