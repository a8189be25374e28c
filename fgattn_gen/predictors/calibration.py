"""Calibration of a predictor's threshold knob, per layer and head, to a target output error.

``calibrate(samples, target_error=0.05, predictor="default")`` takes q/k/v samples of each layer (a few
denoising steps; ``integrations.capture`` saves them from a diffusers pipeline) and picks, for every layer
and head, the value of the predictor's threshold knob (``CALIBRATED_KNOBS``: ``threshold_scale`` of
``"default"``, ``threshold`` of ``"cached_exact"``, i.e. of ``exact_mask``) that keeps the fewest keys while
the head's output error stays within ``target_error``. ``fgattn-tune --calibrate`` writes the result into the
tuned file, and the registry serves it (``registry.served_knobs``).

Error: the relative L2 error of a head's attention output against dense attention,
``||O_sparse - O_dense||_F / ||O_dense||_F`` over that head's queries and head dim, for each sample and batch
element; ``statistic="max"`` (default) takes the worst of them, ``"mean"`` their mean. The dense output is
computed once per sample; the sparse output is ``attention(q, k, v, keys)`` (the fp32 reference on CPU tensors,
the kernels on CUDA), so it measures the mask the predictor picks, as served. ``cached_exact`` is
calibrated on the mask of each sample's own step (the drift of a reused mask over later steps is not
measured). Density: the fraction of (query block, key group) pairs kept, a head's mean over the samples.

Search: the densities and errors fall and rise with the threshold (monotone up to noise), so every head is
swept at once over a log grid of ``points`` values (one predictor call per value and sample, the knob the same
for all heads), each head takes the sparsest grid value that meets the target, then ``refine`` bisection steps
in log space between it and the next grid value (per-head knob lists, one call per step and sample) narrow
it down. A value is only ever chosen after it was measured to meet the target on every sample.
Layers not in the samples get ``"*"``: per head the smallest (densest) value over the calibrated layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..keyset import KeySet
from ..reference import reference_attention
from ..tuned import CALIBRATED_KNOBS, ERROR_STATISTICS, knob_upper
from .dense import dense_attention_with_lse
from .names import knob_names, make_predictor

DEFAULT_GRID_POINTS = 12
DEFAULT_REFINE_STEPS = 3


@dataclass(frozen=True)
class Calibration:
    """Calibrated knob values of one predictor.

    Attributes:
        predictor, knob: the predictor name and its calibrated knob (``CALIBRATED_KNOBS``).
        target_error, statistic: the target and how a head's errors over the samples were combined.
        shape: ``{heads, seq_q, seq_k, head_dim, block_m, block_n}`` of the samples and the KeySet layout.
        samples: samples per layer. fixed: the predictor's other knobs during calibration.
        values: layer index (or ``"*"``) -> the knob per head (H floats).
        errors, densities: layer index -> achieved error statistic and mean density per measured head.
        measured_heads: None when every head was measured, else the head indices ``errors`` and
            ``densities`` list (``tune.calibration.expand_heads``: a capture of some heads).
    """

    predictor: str
    knob: str
    target_error: float
    statistic: str
    shape: dict
    samples: int
    fixed: dict
    values: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    densities: dict = field(default_factory=dict)
    measured_heads: tuple[int, ...] | None = None

    def knobs(self, layer: int | None = None) -> dict:
        """The predictor's knobs for ``layer`` (its own values, else ``"*"``): ``{**fixed, knob: [H floats]}``."""
        values = self.values.get(layer, self.values["*"])
        return {**self.fixed, self.knob: list(values)}

    def section(self) -> dict:
        """The YAML section of this calibration (``tuned.py``: ``predictor_knobs.<predictor>``)."""
        layers = {"*": {self.knob: list(self.values["*"])}}
        for layer in sorted(key for key in self.values if key != "*"):
            layers[layer] = {self.knob: list(self.values[layer]), "error": list(self.errors[layer]),
                             "density": list(self.densities[layer])}
        section = {"knob": self.knob, "target_error": self.target_error, "statistic": self.statistic,
                   "shape": dict(self.shape), "samples": self.samples, "fixed": dict(self.fixed), "layers": layers}
        if self.measured_heads is not None:
            section["measured_heads"] = list(self.measured_heads)
        return section


class UnreachableTarget(ValueError):
    """No knob value on the grid meets the target error for some layer and head."""


def _check_sample(sample, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(sample, (tuple, list)) or len(sample) != 3:
        raise TypeError(f"{where}: expected a (q, k, v) tuple of tensors, got {type(sample).__name__}")
    for name, t in zip("qkv", sample):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} is {type(t).__name__}, expected a torch.Tensor [B, H, S, D]")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected [B, H, S, D]")
    return tuple(sample)


def _layers(samples) -> dict:
    """``{layer (int or "*"): [(q, k, v), ...]}`` from a mapping of layer -> samples or a flat sequence."""
    if isinstance(samples, Mapping):
        layers = dict(samples)
        bad = [key for key in layers if isinstance(key, bool) or not isinstance(key, int) or key < 0]
        if bad:
            raise TypeError(f"samples: expected layer indices >= 0 as keys, got {bad[0]!r}")
    elif isinstance(samples, Sequence) and not isinstance(samples, (str, bytes)):
        layers = {"*": samples}
    else:
        raise TypeError(f"samples: expected a mapping {{layer: [(q, k, v), ...]}} or a list of (q, k, v) tuples, got "
                        f"{type(samples).__name__}")
    if not layers:
        raise ValueError("samples: empty (no layer); calibration needs at least one (q, k, v) sample")
    out, first = {}, None
    for layer, items in layers.items():
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
            raise ValueError(f"samples[{layer!r}]: expected a non-empty list of (q, k, v) tuples, got {items!r}")
        out[layer] = [_check_sample(s, f"samples[{layer!r}][{i}]") for i, s in enumerate(items)]
        for i, (q, k, _) in enumerate(out[layer]):
            shape = (q.shape[1], q.shape[2], k.shape[2], q.shape[3])
            first = first or (shape, f"samples[{layer!r}][{i}]")
            if shape != first[0]:
                raise ValueError(f"samples[{layer!r}][{i}]: (heads, seq_q, seq_k, head_dim) {shape} differs from "
                                 f"{first[1]}'s {first[0]}; calibrate one attention shape at a time")
    return out


def default_grid(knob: str, seq_k: int, points: int) -> list[float]:
    """``points`` log-spaced knob values, densest first: threshold_scale in [0.01, min(64, Sk)], a threshold in
    [0.001 / Sk, min(1, 64 / Sk)] (as multiples of the uniform probability 1 / Sk)."""
    low, high = (0.01, min(64.0, seq_k)) if knob == "threshold_scale" else (1e-3 / seq_k, min(1.0, 64.0 / seq_k))
    if points == 1:
        return [low]
    return [low * (high / low) ** (i / (points - 1)) for i in range(points)]


def _head_density(keys: KeySet) -> torch.Tensor:
    """fp64 ``[H]``: mean over the batch of each head's fraction of (query block, key group) pairs kept."""
    b, h, nq, nk = keys.shape
    return (keys.counts().to(torch.float64).sum(-1) / (nq * nk)).mean(0).cpu()


def _head_error(out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """fp64 ``[B, H]``: relative L2 error of each (batch element, head) output."""
    diff = (out.double() - dense).flatten(2).norm(dim=-1)
    return (diff / dense.flatten(2).norm(dim=-1).clamp_min(1e-30)).cpu()


class _Evaluator:
    """Error statistic and density per head of one layer's samples at a knob value (a number or a list)."""

    def __init__(self, predictor, knob, samples, statistic, fixed, block_m, block_n, backend):
        self.predictor, self.knob, self.samples, self.statistic = predictor, knob, samples, statistic
        self.fixed, self.block_m, self.block_n, self.backend = fixed, block_m, block_n, backend
        self.dense = [self._dense(q, k, v) for q, k, v in samples]

    @staticmethod
    def _dense(q, k, v) -> torch.Tensor:
        """Dense attention, fp64: from fp32 inputs on the CPU, from SDPA in the inputs' dtype on a GPU."""
        if q.device.type == "cpu":
            q, k, v = q.float(), k.float(), v.float()
        return dense_attention_with_lse(q, k, v, q.shape[-1] ** -0.5)[0].double()

    def __call__(self, value) -> tuple[torch.Tensor, torch.Tensor]:
        from ..attention_api import attention

        errors, densities = [], []
        for (q, k, v), dense in zip(self.samples, self.dense):
            predictor = make_predictor(self.predictor, block_m=self.block_m, block_n=self.block_n,
                                       **{**self.fixed, self.knob: value})
            keys = predictor.predict(q, k, v).keys
            backend = self.backend or ("reference" if q.device.type == "cpu" else None)
            out = reference_attention(q, k, v, keys) if backend == "reference" else \
                attention(q, k, v, keys, backend=backend)
            errors.append(_head_error(out, dense))
            densities.append(_head_density(keys))
        error = torch.cat(errors)  # [samples * B, H]
        error = error.amax(0) if self.statistic == "max" else error.mean(0)
        return error, torch.stack(densities).mean(0)


def _calibrate_layer(evaluate: _Evaluator, layer, grid: list[float], target: float, refine: int):
    """Per-head knob values, errors and densities of one layer (see the module docstring)."""
    measured = [evaluate(value) for value in grid]  # densest first
    err = torch.stack([e for e, _ in measured])  # [G, H]
    dens = torch.stack([d for _, d in measured])
    heads = err.shape[1]
    best, lo, hi = [], [], []
    for h in range(heads):
        ok = [g for g in range(len(grid)) if err[g, h] <= target]
        if not ok:
            g = int(err[:, h].argmin())
            raise UnreachableTarget(
                f"target_error {target:g} is unreachable for layer {layer!r} head {h}: the best error on the grid "
                f"is {float(err[g, h]):.4g} (at {evaluate.knob}={grid[g]:.4g}, density {float(dens[g, h]):.3f}); "
                f"raise target_error, or give a denser grid")
        g = min(ok, key=lambda i: (float(dens[i, h]), -i))  # fewest keys; ties: the larger knob
        best.append([grid[g], float(err[g, h]), float(dens[g, h])])
        sparser = g + 1 < len(grid) and err[g + 1, h] > target
        lo.append(grid[g])
        hi.append(grid[g + 1] if sparser else None)
    for _ in range(refine):
        if all(x is None for x in hi):
            break
        mid = [math.sqrt(a * b) if b is not None else a for a, b in zip(lo, hi)]
        error, density = evaluate(mid)
        for h in range(heads):
            if hi[h] is None:
                continue
            if error[h] <= target and density[h] <= best[h][2]:
                lo[h] = mid[h]
                best[h] = [mid[h], float(error[h]), float(density[h])]
            else:
                hi[h] = mid[h]
    return [b[0] for b in best], [b[1] for b in best], [b[2] for b in best]


def calibrate(samples, *, target_error: float, predictor: str = "default", knob: str | None = None,
              statistic: str = "max", knobs: dict | None = None, grid: Sequence[float] | None = None,
              points: int = DEFAULT_GRID_POINTS, refine: int = DEFAULT_REFINE_STEPS, block_m: int = 128,
              block_n: int = 1, backend: str | None = None) -> Calibration:
    """Pick each layer's and head's threshold knob for ``target_error`` at the least density.

    Args:
        samples: ``{layer index: [(q, k, v), ...]}`` or a list of ``(q, k, v)`` (layer ``"*"``); q ``[B, H, Sq,
            D]``, k/v ``[B, H, Sk, D]``, one (H, Sq, Sk, D) for all, dtypes and devices the predictor takes.
        target_error: in (0, 1]: relative L2 error of each head's output against dense attention.
        predictor: a key of ``CALIBRATED_KNOBS`` (``"default"``, ``"cached_exact"``).
        knob: its threshold knob (default and only choice: ``CALIBRATED_KNOBS[predictor]``).
        statistic: ``"max"`` (worst sample and batch element; default) or ``"mean"`` of a head's errors.
        knobs: the predictor's other knobs, held fixed (e.g. ``{"min_mass": 0.3}``; ``cached_exact``'s
            ``refresh_steps`` defaults to ``(0,)``); stored in the result and served with it.
        grid: the knob values to sweep (sorted ascending, i.e. densest first), default ``default_grid``.
        points: grid size when ``grid`` is None (>= 2). refine: bisection steps after the sweep (>= 0).
        block_m, block_n: KeySet layout. backend: ``attention`` backend of the sparse output (default: the
            fp32 reference on CPU tensors, the registry's kernel on CUDA).
    Returns:
        ``Calibration`` with per-layer (and ``"*"``) per-head values.
    Raises:
        ValueError / TypeError naming the argument for bad input; ``UnreachableTarget`` (a ValueError) naming
        the layer and head, and the best error reached, when no grid value meets the target.
    """
    if predictor not in CALIBRATED_KNOBS:
        raise ValueError(f"predictor: expected one of {tuple(CALIBRATED_KNOBS)} (a predictor with a threshold "
                         f"knob), got {predictor!r}")
    expected = CALIBRATED_KNOBS[predictor]
    if knob is not None and knob != expected:
        raise ValueError(f"knob: {predictor} is calibrated through {expected!r}, got {knob!r}")
    if isinstance(target_error, bool) or not isinstance(target_error, (int, float)) \
            or not 0 < target_error <= 1:
        raise ValueError(f"target_error: expected a relative L2 error in (0, 1], got {target_error!r}")
    if statistic not in ERROR_STATISTICS:
        raise ValueError(f"statistic: expected one of {ERROR_STATISTICS}, got {statistic!r}")
    for name, value, low in (("points", points, 2), ("refine", refine, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    fixed = dict(knobs or {})
    unknown = set(fixed) - (knob_names(predictor) - {expected})
    if unknown:
        raise ValueError(f"knobs: {predictor} has no fixed knob(s) {sorted(unknown)}; it takes "
                         f"{sorted(knob_names(predictor) - {expected})}")
    if predictor == "cached_exact":
        fixed.setdefault("refresh_steps", (0,))
        fixed["refresh_steps"] = list(fixed["refresh_steps"])
    layers = _layers(samples)
    q, k, _ = next(iter(layers.values()))[0]
    heads, seq_q, seq_k, head_dim = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    upper = knob_upper(expected, seq_k)
    if grid is None:
        grid = default_grid(expected, seq_k, points)
    else:
        grid = list(grid)
        if not grid or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= upper
                           for x in grid) or grid != sorted(set(grid)):
            raise ValueError(f"grid: expected distinct ascending {expected} values in (0, {upper:g}], got {grid!r}")
        grid = [float(x) for x in grid]
    values, errors, densities = {}, {}, {}
    n_samples = min(len(items) for items in layers.values())
    with torch.no_grad():
        for layer, items in layers.items():
            evaluate = _Evaluator(predictor, expected, items, statistic, fixed, block_m, block_n, backend)
            values[layer], errors[layer], densities[layer] = _calibrate_layer(evaluate, layer, grid,
                                                                              float(target_error), refine)
    if "*" not in values:
        values["*"] = [min(column) for column in zip(*values.values())]
    shape = {"heads": heads, "seq_q": seq_q, "seq_k": seq_k, "head_dim": head_dim, "block_m": block_m,
             "block_n": block_n}
    return Calibration(predictor, expected, float(target_error), statistic, shape, n_samples, fixed, values,
                       errors, densities)
