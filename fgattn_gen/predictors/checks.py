"""Argument checks shared by the predictors: each error names the argument it is about."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..environment import interpreting
from ..variant import HEAD_DIMS

PREDICTOR_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
IMPLS = ("kernels", "torch")  # fgattn's Triton/CUDA kernels, or torch ops


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_int(value, name: str) -> int:
    """``value`` if it is an int >= 1, else ValueError naming ``name``."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` if it is a bool, else ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def check_tensors(**tensors: torch.Tensor) -> None:
    """q ``[B, H, Sq, D]`` and k (and v) ``[B, H, Sk, D]``: same batch, heads, head dim (one the kernels
    take), dtype and device."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 [B, H, S, D], got shape {tuple(t.shape)}")
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{name}: every dim must be >= 1, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head) dim must be contiguous (stride 1), got strides {t.stride()}")
    q = tensors["q"]
    if q.dtype not in PREDICTOR_DTYPES:
        raise ValueError(f"q: dtype must be one of {PREDICTOR_DTYPES}, got {q.dtype}")
    b, h, _, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q: head dim must be one of {HEAD_DIMS}, got {d}")
    for name, t in tensors.items():
        if name == "q":
            continue
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
        if t.shape[:2] != (b, h) or t.shape[-1] != d:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match q {tuple(q.shape)} "
                             f"(expected [{b}, {h}, Sk, {d}])")
    if "v" in tensors and tensors["v"].shape != tensors["k"].shape:
        raise ValueError(f"v: shape {tuple(tensors['v'].shape)} does not match k {tuple(tensors['k'].shape)}")


def check_top_p(top_p) -> float:
    """A probability mass in (0, 1]."""
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a probability mass in (0, 1], got {top_p!r}")
    return float(top_p)


def check_sim_threshold(sim_threshold) -> float:
    """A cosine similarity in [-1, 1]."""
    if not _is_real(sim_threshold) or not -1.0 <= sim_threshold <= 1.0:
        raise ValueError(f"sim_threshold: expected a cosine similarity in [-1, 1], got {sim_threshold!r}")
    return float(sim_threshold)


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` for None, else a positive finite float."""
    if scale is None:
        return head_dim ** -0.5
    if not _is_real(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    return float(scale)


def check_pool(pool, block_m: int) -> int:
    """Query tokens per pooled sub-block: a divisor of ``block_m`` (default ``block_m``)."""
    if pool is None:
        return block_m
    check_positive_int(pool, "pool")
    if block_m % pool:
        raise ValueError(f"pool: must divide block_m = {block_m}, got {pool}")
    return pool


def check_keep_keys(keep_keys, seq_k: int) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` or a sequence of them: key token ranges ``[start, end)`` inside ``[0, Sk]``."""
    if keep_keys is None:
        return ()
    if isinstance(keep_keys, Sequence) and len(keep_keys) == 2 and all(_is_int(x) for x in keep_keys):
        keep_keys = (keep_keys,)
    if not isinstance(keep_keys, Sequence):
        raise ValueError(f"keep_keys: expected (start, end) or a list of them, got {keep_keys!r}")
    ranges = []
    for r in keep_keys:
        if not (isinstance(r, Sequence) and len(r) == 2 and all(_is_int(x) for x in r)):
            raise ValueError(f"keep_keys: expected (start, end) pairs of ints, got {r!r}")
        start, end = r
        if not 0 <= start < end <= seq_k:
            raise ValueError(f"keep_keys: range {tuple(r)} must satisfy 0 <= start < end <= Sk = {seq_k}")
        ranges.append((start, end))
    return tuple(ranges)


def check_local_window(local_window) -> int | None:
    """None (no window) or a number of tokens >= 0."""
    if local_window is None:
        return None
    if not _is_int(local_window) or local_window < 0:
        raise ValueError(f"local_window: expected None or a number of tokens >= 0, got {local_window!r}")
    return local_window


def check_search_iters(search_iters) -> int:
    """Bisection steps, an int in [1, 64]."""
    if not _is_int(search_iters) or not 1 <= search_iters <= 64:
        raise ValueError(f"search_iters: expected an int in [1, 64], got {search_iters!r}")
    return search_iters


def resolve_impl(impl, device: torch.device) -> str:
    """``"kernels"`` (fgattn's Triton/CUDA kernels: CUDA tensors, or TRITON_INTERPRET=1) or ``"torch"`` (torch
    ops); None picks the kernels where they run."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS} or None, got {impl!r}")
    runs_kernels = device.type == "cuda" or interpreting()
    if impl == "kernels" and not runs_kernels:
        raise ValueError(f"impl: 'kernels' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                         f"q is on {device}")
    return impl or ("kernels" if runs_kernels else "torch")
