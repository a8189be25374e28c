"""The public entry point: ``attention(q, k, v, keys)``."""

from __future__ import annotations

import warnings

import torch

from . import build, triton_backend
from .checks import check_attention_inputs
from .keyset import KeySet
from .reference import reference_attention
from .variant import Variant, default_variant

BACKENDS = ("triton", "reference")


def select_variant(q: torch.Tensor, keys: KeySet, backend: str | None) -> Variant:
    """The kernel variant for this call (the default variant until a tuned registry exists)."""
    if backend not in (None, "triton"):
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    return default_variant(dtype=q.dtype, head_dim=q.shape[-1], block_m=keys.block_m, block_n=keys.block_n)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet, *, scale: float | None = None,
              backend: str | None = None, variant: Variant | None = None, return_lse: bool = False):
    """Fine-grained sparse attention: each query block attends only to its selected keys.

    Args:
        q: ``[B, H, Sq, D]`` bf16/fp16; k, v: ``[B, H, Sk, D]``, same dtype and device. Any strides with
            a contiguous last dim; Sq may differ from Sk; D in {64, 128}.
        keys: KeySet ``[B, H, ceil(Sq/block_m), ceil(Sk/block_n)]`` on the same device.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"triton"``, ``"reference"`` (fp32 math, any device) or None (best available).
        variant: run this kernel variant instead of the selected one.
        return_lse: also return the log-sum-exp of the scaled scores.
    Returns:
        out ``[B, H, Sq, D]`` in q's dtype, and with ``return_lse`` lse fp32 ``[B, H, Sq]``. A query block
        with no selected key gets zeros and LSE = -inf.
    """
    scale = check_attention_inputs(q, k, v, keys, scale)
    if backend == "reference" or (q.device.type == "cpu" and not build.interpreting()):
        if backend != "reference":
            warnings.warn("fgattn: CPU tensors and no TRITON_INTERPRET=1; using the fp32 reference", stacklevel=2)
        out, lse = reference_attention(q, k, v, keys, scale=scale, return_lse=True)
        return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
    if variant is None:
        variant = select_variant(q, keys, backend)
    elif (variant.head_dim, variant.block_m, variant.block_n) != (q.shape[-1], keys.block_m, keys.block_n):
        raise ValueError(f"variant: {variant.key} does not fit head_dim={q.shape[-1]}, "
                         f"block_m={keys.block_m}, block_n={keys.block_n}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    triton_backend.run(variant, q, k, v, keys, scale, out, lse)
    return (out, lse) if return_lse else out
