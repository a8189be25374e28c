"""The public entry point: ``attention(q, k, v, keys)``."""

from __future__ import annotations

import math
import warnings

import torch

from . import ops
from .backends import BACKENDS as KERNEL_BACKENDS
from .checks import check_attention_inputs, check_density
from .environment import interpreting
from .keyset import KeySet
from .query_order import check_permutation, gather_queries, scatter_queries
from .reference import reference_attention
from .stats import AttentionStats, computed_fraction
from .variant import Variant, dtype_name

BACKENDS = (*KERNEL_BACKENDS, "reference")


def density_bucket(density: float) -> float:
    """``density`` rounded to the nearest half octave (1, 0.71, 0.5, 0.35, ...): what the registry needs to pick
    a tuned density, and few enough values that ``torch.compile`` does not recompile per layer."""
    return min(1.0, 2.0 ** (round(2 * math.log2(density)) / 2))


def check_variant_fits(variant: Variant, q: torch.Tensor, keys: KeySet, backend: str | None) -> None:
    """Raise ValueError naming ``variant`` if it was built for another dtype, head dim, layout or backend."""
    want = dict(dtype=dtype_name(q.dtype), head_dim=q.shape[-1], block_m=keys.block_m, block_n=keys.block_n)
    if backend is not None:
        want["backend"] = backend
    wrong = {name: value for name, value in want.items() if getattr(variant, name) != value}
    if wrong:
        raise ValueError(f"variant: {variant.key} does not fit this call (needs "
                         + ", ".join(f"{n}={v}" for n, v in wrong.items()) + ")")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet | None = None, *, predictor=None,
              scale: float | None = None, backend: str | None = None, variant: Variant | None = None,
              density: float | None = None, return_lse: bool = False, return_stats: bool = False):
    """Fine-grained sparse attention: each query block attends only to its selected keys.

    Args:
        q: ``[B, H, Sq, D]`` bf16/fp16; k, v: ``[B, H, Sk, D]``, same dtype and device. Any strides with
            a contiguous last dim; Sq may differ from Sk; D in {64, 128}.
        keys: KeySet ``[B, H, ceil(Sq/block_m), ceil(Sk/block_n)]`` on the same device; or None with
            ``predictor``. With ``keys.query_order`` (clustered query blocks) the q rows are gathered in that
            order and the output rows scattered back.
        predictor: predicts ``keys`` first: a name from ``predictors.PREDICTORS`` (default knobs), a
            ``predictors.Predictor`` (e.g. ``cache.at(step=s, layer=i)`` of a ``CachedMask``: a refresh step
            returns its dense output) or a callable ``(q, k) -> KeySet``, e.g.
            ``functools.partial(predictors.pooled_top_p, top_p=0.95, pool=32)``.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"triton"``, ``"cuda"`` (the CUDA gather-load kernel, CUDA tensors on an sm_80+ GPU),
            each the registry's best of that backend unless ``variant`` is given; ``"reference"`` (fp32 math,
            any device); or None (the registry's pick of either backend).
        variant: run this kernel variant instead of the one the registry (``fgattn_gen.registry``) picks.
        density: the KeySet's key density if known, in (0, 1] (default: ``keys.density_hint``); the registry
            serves the variant tuned nearest to it. Never computed here (that would synchronise).
        return_lse: also return the log-sum-exp of the scaled scores.
        return_stats: also return an ``AttentionStats`` (density computed, the predictor's captured-mass
            estimate); computing the density synchronises.
    Returns:
        out ``[B, H, Sq, D]`` in q's dtype, then lse fp32 ``[B, H, Sq]`` with ``return_lse``, then the
        stats with ``return_stats``. A query block with no selected key gets zeros and LSE = -inf.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v) if isinstance(t, torch.Tensor)):
        raise RuntimeError("q, k, v: attention() is inference-only (no backward); call it under torch.no_grad() "
                           "or with tensors that do not require grad")
    if (keys is None) == (predictor is None):
        raise ValueError("keys: pass either keys (a KeySet) or predictor=, not both and not neither")
    captured_mass = None
    if predictor is not None:
        from .predictors import make_predictor  # predictors import Triton kernels: only when asked for
        prediction = make_predictor(predictor).predict(q, k, v)
        keys, captured_mass = prediction.keys, prediction.captured_mass
        if prediction.out is not None and not return_lse:
            return _results(prediction.out, None, keys, captured_mass, q, k, return_lse, return_stats)
    scale = check_attention_inputs(q, k, v, keys, scale)
    density = check_density(keys.density_hint if density is None else density)
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if variant is not None and not isinstance(variant, Variant):
        raise TypeError(f"variant: expected a fgattn_gen.Variant, got {type(variant).__name__}")
    if backend == "cuda" or (backend is None and variant is not None and variant.backend == "cuda"):
        if q.device.type != "cuda":
            raise ValueError(f"backend: 'cuda' needs CUDA tensors (Triton's interpreter cannot run it); q is on {q.device}")
    runs_kernels = q.device.type == "cuda" or interpreting()
    if backend == "reference" or (backend is None and not runs_kernels):
        if backend is None:
            warnings.warn("fgattn: CPU tensors and no TRITON_INTERPRET=1; using the fp32 reference", stacklevel=2)
        out, lse = reference_attention(q, k, v, keys, scale=scale, return_lse=True)
        return _results(out.to(q.dtype), lse, keys, captured_mass, q, k, return_lse, return_stats)
    if variant is not None:
        check_variant_fits(variant, q, keys, backend)
    if not runs_kernels:
        raise ValueError(f"backend: {backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                         f"q is on {q.device}")
    order = keys.query_order
    if order is not None:
        check_permutation(order)
        q = gather_queries(q, order)
    # no variant: the registry's pick (of ``backend`` when one is named)
    out, lse = ops.sparse_attention(q, k, v, keys.bits, keys.n_kblocks, keys.block_m, keys.block_n, scale,
                                    variant.key if variant is not None else (backend or ""),
                                    -1.0 if density is None else density_bucket(density))
    if order is not None:
        out, lse = scatter_queries(out, order), scatter_queries(lse, order)
    return _results(out, lse, keys, captured_mass, q, k, return_lse, return_stats)


def _results(out, lse, keys: KeySet, captured_mass, q, k, return_lse: bool, return_stats: bool):
    """``out``, then ``lse`` and an ``AttentionStats`` as asked for."""
    results = (out,) + ((lse,) if return_lse else ())
    if return_stats:
        stats = AttentionStats(computed_fraction(keys, q.shape[2], k.shape[2]), captured_mass)
        results += (stats,)
    return results if len(results) > 1 else out
