"""fp32 reference of masked (KeySet) attention: the ground truth every kernel is checked against."""

from __future__ import annotations

import torch

from .checks import check_attention_inputs
from .keyset import KeySet


def element_mask(keys: KeySet, seq_q: int, seq_k: int) -> torch.Tensor:
    """bool ``[B, H, Sq, Sk]``: the KeySet expanded to one entry per (query, key), queries in their own order
    (with ``keys.query_order``, the row of query ``query_order[b, h, p]`` is that of query block p // block_m)."""
    mask = keys.to_mask()
    mask = mask.repeat_interleave(keys.block_m, dim=2)[:, :, :seq_q]
    mask = mask.repeat_interleave(keys.block_n, dim=3)[..., :seq_k]
    if keys.query_order is None:
        return mask
    rows = keys.query_order[..., None].expand(-1, -1, -1, seq_k)
    return torch.empty_like(mask).scatter_(2, rows, mask)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet, *,
                        scale: float | None = None, return_lse: bool = False):
    """softmax(scale * q k^T over each query block's selected keys) v, computed in fp32.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Sk, D]``; bf16, fp16 or fp32.
        keys: KeySet of shape ``[B, H, ceil(Sq/block_m), ceil(Sk/block_n)]``.
    Returns:
        out fp32 ``[B, H, Sq, D]`` (zeros for rows with no selected key) and, with ``return_lse``,
        lse fp32 ``[B, H, Sq]`` (natural log; -inf for rows with no selected key).
    """
    scale = check_attention_inputs(q, k, v, keys, scale, kernel_dtypes=False)
    b, h, sq, _ = q.shape
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    mask = element_mask(keys, sq, k.shape[2])
    for bi in range(b):  # one batch at a time keeps the fp32 [H, Sq, Sk] score matrix bounded
        scores = torch.einsum("hqd,hkd->hqk", q[bi].float(), k[bi].float()) * scale
        scores = scores.masked_fill(~mask[bi], float("-inf"))
        lse[bi] = torch.logsumexp(scores, dim=-1)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: 0
        out[bi] = torch.einsum("hqk,hkd->hqd", probs, v[bi].float())
    return (out, lse) if return_lse else out
