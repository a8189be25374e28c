"""fp32 reference of masked (KeySet) attention: the ground truth every kernel is checked against.

Non-finite inputs follow the kernels' arithmetic over the *selected* keys only (IEEE rules, as the
kernels compute): a NaN score or value of a selected key makes the affected outputs NaN, a selected
+inf score makes its query row NaN (inf - inf in the softmax), a selected -inf score is a key of
probability 0, an infinite value of a selected key gives +-inf (NaN when both signs meet, or when its
probability is exactly 0: 0 * inf). Unselected keys are never read, so nothing in them (NaN, Inf) can
reach the output; a query block with no selected key gives zeros and LSE = -inf whatever its queries hold.
The LSE of a row with a non-finite selected score is NaN, as the kernels' (-inf only means "no key"), so an
LSE merge (ring attention, split keys) cannot drop such a row.
"""

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


def _weighted_values(probs: torch.Tensor, selected: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_k probs[h, q, k] * v[h, k, :]`` over the selected keys only, with IEEE propagation of the
    non-finite values of selected keys (``probs`` is already 0 at unselected keys, but ``0 * NaN`` must
    not reach the output from a key that was never selected)."""
    finite = torch.isfinite(v)
    out = torch.einsum("hqk,hkd->hqd", probs, torch.where(finite, v, 0.0))
    if v.device.type == "meta" or bool(finite.all()):  # (meta tensors have no values to look at)
        return out
    sel = selected.float()
    live = (selected & (probs > 0)).float()   # selected keys with a positive probability
    dead = (selected & (probs == 0)).float()  # selected keys whose probability underflowed: 0 * inf = NaN
    nan_v, pos_v, neg_v = v.isnan().float(), (v == float("inf")).float(), (v == -float("inf")).float()
    hits = lambda weights, values: torch.einsum("hqk,hkd->hqd", weights, values) > 0  # noqa: E731
    pos = hits(live, pos_v) | (out == float("inf"))
    neg = hits(live, neg_v) | (out == -float("inf"))
    nan = out.isnan() | hits(sel, nan_v) | hits(dead, pos_v + neg_v) | (pos & neg)
    out = torch.where(pos, float("inf"), out)
    out = torch.where(neg, -float("inf"), out)
    return torch.where(nan, float("nan"), out)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet, *,
                        scale: float | None = None, return_lse: bool = False):
    """softmax(scale * q k^T over each query block's selected keys) v, computed in fp32.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Sk, D]``; bf16, fp16 or fp32.
        keys: KeySet of shape ``[B, H, ceil(Sq/block_m), ceil(Sk/block_n)]``.
    Returns:
        out fp32 ``[B, H, Sq, D]`` (zeros for rows with no selected key) and, with ``return_lse``,
        lse fp32 ``[B, H, Sq]`` (natural log; -inf for rows with no selected key, NaN where a selected
        score is NaN or +inf). NaN / Inf inputs: see the module docstring.
    """
    scale = check_attention_inputs(q, k, v, keys, scale, kernel_dtypes=False)
    b, h, sq, _ = q.shape
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    mask = element_mask(keys, sq, k.shape[2])
    for bi in range(b):  # one batch at a time keeps the fp32 [H, Sq, Sk] score matrix bounded
        selected = mask[bi]
        has_key = selected.any(-1, keepdim=True)
        scores = torch.einsum("hqd,hkd->hqk", q[bi].float(), k[bi].float()) * scale
        scores = scores.masked_fill(~selected, float("-inf"))  # unselected keys: never part of the sum
        row_lse = torch.logsumexp(scores, dim=-1)
        lse[bi] = row_lse.masked_fill(row_lse == float("inf"), float("nan"))  # +inf score: NaN row (inf - inf)
        probs = torch.where(has_key, torch.softmax(scores, dim=-1), 0.0)  # a row without keys: 0, not NaN
        out[bi] = _weighted_values(probs, selected, v[bi].float())
    return (out, lse) if return_lse else out
