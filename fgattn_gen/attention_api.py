"""The public entry point: ``attention(q, k, v, keys)``."""

from __future__ import annotations

import warnings

import torch

from . import build, ops
from .checks import check_attention_inputs
from .keyset import KeySet
from .reference import reference_attention
from .variant import Variant, dtype_name

BACKENDS = ("triton", "cuda", "reference")


def check_variant_fits(variant: Variant, q: torch.Tensor, keys: KeySet, backend: str | None) -> None:
    """Raise ValueError naming ``variant`` if it was built for another dtype, head dim, layout or backend."""
    want = dict(dtype=dtype_name(q.dtype), head_dim=q.shape[-1], block_m=keys.block_m, block_n=keys.block_n)
    if backend is not None:
        want["backend"] = backend
    wrong = {name: value for name, value in want.items() if getattr(variant, name) != value}
    if wrong:
        raise ValueError(f"variant: {variant.key} does not fit this call (needs "
                         + ", ".join(f"{n}={v}" for n, v in wrong.items()) + ")")


PREDICTORS = ("pooled_top_p",)


def predict_keys(q: torch.Tensor, k: torch.Tensor, predictor) -> KeySet:
    """KeySet from ``predictor``: a callable ``(q, k) -> KeySet`` or a predictor name (default settings)."""
    if predictor == "pooled_top_p":
        from .predictors import pooled_top_p
        predictor = pooled_top_p
    elif not callable(predictor):
        raise ValueError(f"predictor: expected a callable (q, k) -> KeySet or one of {PREDICTORS}, got {predictor!r}")
    keys = predictor(q, k)
    if not isinstance(keys, KeySet):
        raise TypeError(f"predictor: returned {type(keys).__name__}, expected a fgattn_gen.KeySet")
    return keys


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet | None = None, *, predictor=None,
              scale: float | None = None, backend: str | None = None, variant: Variant | None = None,
              return_lse: bool = False):
    """Fine-grained sparse attention: each query block attends only to its selected keys.

    Args:
        q: ``[B, H, Sq, D]`` bf16/fp16; k, v: ``[B, H, Sk, D]``, same dtype and device. Any strides with
            a contiguous last dim; Sq may differ from Sk; D in {64, 128}.
        keys: KeySet ``[B, H, ceil(Sq/block_m), ceil(Sk/block_n)]`` on the same device; or None with
            ``predictor``.
        predictor: predicts ``keys`` first: ``"pooled_top_p"`` (default settings) or a callable
            ``(q, k) -> KeySet``, e.g. ``functools.partial(predictors.pooled_top_p, top_p=0.95, pool=32)``.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"triton"``, ``"cuda"`` (the CUDA gather-load kernel, CUDA tensors on an sm_80+ GPU),
            each the registry's best of that backend unless ``variant`` is given; ``"reference"`` (fp32 math,
            any device); or None (the registry's pick of either backend).
        variant: run this kernel variant instead of the one the registry (``fgattn_gen.registry``) picks.
        return_lse: also return the log-sum-exp of the scaled scores.
    Returns:
        out ``[B, H, Sq, D]`` in q's dtype, and with ``return_lse`` lse fp32 ``[B, H, Sq]``. A query block
        with no selected key gets zeros and LSE = -inf.
    """
    if (keys is None) == (predictor is None):
        raise ValueError("keys: pass either keys (a KeySet) or predictor=, not both and not neither")
    if predictor is not None:
        keys = predict_keys(q, k, predictor)
    scale = check_attention_inputs(q, k, v, keys, scale)
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if variant is not None and not isinstance(variant, Variant):
        raise TypeError(f"variant: expected a fgattn_gen.Variant, got {type(variant).__name__}")
    if backend == "cuda" or (backend is None and variant is not None and variant.backend == "cuda"):
        if q.device.type != "cuda":
            raise ValueError(f"backend: 'cuda' needs CUDA tensors (Triton's interpreter cannot run it); q is on {q.device}")
    runs_kernels = q.device.type == "cuda" or build.interpreting()
    if backend == "reference" or (backend is None and not runs_kernels):
        if backend is None:
            warnings.warn("fgattn: CPU tensors and no TRITON_INTERPRET=1; using the fp32 reference", stacklevel=2)
        out, lse = reference_attention(q, k, v, keys, scale=scale, return_lse=True)
        return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
    if variant is not None:
        check_variant_fits(variant, q, keys, backend)
    if not runs_kernels:
        raise ValueError(f"backend: {backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                         f"q is on {q.device}")
    # no variant: the registry's pick (of ``backend`` when one is named)
    out, lse = ops.sparse_attention(q, k, v, keys.bits, keys.n_kblocks, keys.block_m, keys.block_n, scale,
                                    variant.key if variant is not None else (backend or ""))
    return (out, lse) if return_lse else out
