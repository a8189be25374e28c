"""Input validation for the attention entry points: clear errors that name the argument."""

from __future__ import annotations

import math

import torch

from .keyset import KeySet
from .variant import DTYPE_NAMES, HEAD_DIMS


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet,
                           scale: float | None, *, kernel_dtypes: bool = True) -> float:
    """Validate q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]`` and ``keys``; return the softmax scale.

    ``kernel_dtypes`` restricts dtypes to what the kernels take (bf16, fp16); the reference also takes fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 [B, H, S, D], got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head) dim must be contiguous (stride 1), got strides {t.stride()}")
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{name}: every dim must be >= 1, got shape {tuple(t.shape)}")
    allowed = tuple(DTYPE_NAMES) if kernel_dtypes else (*DTYPE_NAMES, torch.float32)
    if q.dtype not in allowed:
        raise ValueError(f"q: dtype must be one of {allowed}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    b, h, sq, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q: head dim must be one of {HEAD_DIMS}, got {d}")
    if k.shape[:2] != (b, h) or k.shape[-1] != d:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)} (expected [{b}, {h}, Sk, {d}])")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if not isinstance(keys, KeySet):
        raise TypeError(f"keys: expected a fgattn_gen.KeySet, got {type(keys).__name__}")
    keys.check_compatible(b, h, sq, k.shape[2], q.device)
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    return float(scale)


def check_density(density) -> float | None:
    """``density`` (a key density hint) as a float in (0, 1], or None; ValueError naming ``density``."""
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density: expected a key density in (0, 1] or None, got {density!r}")
    return float(density)
