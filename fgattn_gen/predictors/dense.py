"""Dense attention that also returns the log-sum-exp of each query row (the refresh pass of the exact mask).

On CUDA it calls SDPA's kernels directly, which return the LSE (``torch.nn.functional`` does not):
cuDNN (fastest on Hopper), else FlashAttention, else memory-efficient attention (the one taking fp32).
Without CUDA it computes in fp32 with torch ops, a chunk of heads at a time.
"""

from __future__ import annotations

import torch

from ..compaction import workspace_budget

DENSE_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _cudnn(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                   scale=scale)[:2]
    return out, lse


def _flash(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _efficient(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                       scale=scale)[:2]
    return out, lse


def _math(q, k, v, scale):
    """fp32 softmax(q k^T scale) v and its LSE, ``budget`` bytes of scores at a time."""
    b, h, sq, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    chunk = max(1, workspace_budget() // (sq * k.shape[2] * 4))
    for bi in range(b):
        for h0 in range(0, h, chunk):
            hs = slice(h0, min(h, h0 + chunk))
            scores = torch.einsum("hqd,hkd->hqk", q[bi, hs].float(), k[bi, hs].float()) * scale
            lse[bi, hs] = torch.logsumexp(scores, -1)
            out[bi, hs] = torch.einsum("hqk,hkd->hqd", torch.softmax(scores, -1), v[bi, hs].float()).to(q.dtype)
    return out, lse


_IMPLS = {"cudnn": _cudnn, "flash": _flash, "efficient": _efficient, "math": _math}


def dense_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and the natural-log LSE of the scaled scores.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Sk, D]``; bf16/fp16 (any backend) or fp32 (efficient, math).
        scale: softmax scale.
        backend: one of ``DENSE_BACKENDS``, or None: on CUDA the first of cudnn, flash, efficient that
            accepts the inputs, else math.
    Returns:
        out ``[B, H, Sq, D]`` in q's dtype and lse fp32 ``[B, H, Sq]``.
    """
    if backend is not None:
        if backend not in _IMPLS:
            raise ValueError(f"backend: expected one of {DENSE_BACKENDS} or None, got {backend!r}")
        order = (backend,)
    elif q.is_cuda:
        order = ("cudnn", "flash", "efficient") if q.dtype != torch.float32 else ("efficient",)
    else:
        order = ("math",)
    for name in order[:-1]:
        try:
            out, lse = _IMPLS[name](q, k, v, scale)
            break
        except RuntimeError:  # this kernel does not take these inputs (dtype, shape, GPU): try the next one
            continue
    else:
        out, lse = _IMPLS[order[-1]](q, k, v, scale)
    b, h, sq, _ = q.shape
    return out, lse.reshape(b, h, -1)[..., :sq].float()
