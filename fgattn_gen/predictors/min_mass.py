"""A safety net for any predictor: widen the query blocks whose KeySet keeps too little softmax mass.

``widen_to_mass(q, k, keys, min_mass=0.95)`` estimates each query block's captured mass from a few sampled
query rows (``captured_mass``: the same rows, exact fp32 softmax over every key). A block whose estimate is
below ``min_mass`` also keeps the sampled rows' own top keys: for each sampled row, the smallest set of keys
(largest probabilities first) that holds ``min_mass`` of that row's probability, unioned over the block's
sampled rows (a key block is added when any of its keys is). Every sampled row then keeps at least
``min_mass`` of its mass, so an estimate from those rows would always pass; the widened block is instead
checked on a second, held-out set of rows (the same strata, the other half of each: ``sample_rows(phase=0.5)``,
or new random rows with a ``generator``), and a block whose held-out estimate is still below ``min_mass``
(a relative 1e-5 is allowed for rounding) keeps every key: its rows want keys that the sampled rows do not
share (very peaked heads, many content clusters per block). Blocks at or above ``min_mass`` are unchanged.
With ``samples >= block_m`` both sets are every row of the block.

Cost and memory: twice ``captured_mass``'s scores plus a sort of each sampled row's probabilities; no host
synchronisation, any block_m / block_n, CPU and CUDA.
"""

from __future__ import annotations

import torch

from ..keyset import KeySet
from ..query_order import gather_queries
from . import checks
from .captured_mass import (check_generator, check_keys, chunks, group_sums, row_probs, sample_rows,
                            unpack)
from .words import pack_mask

# Bytes per (sampled row, key) score alive at once: probabilities, sorted values, int64 order, cumulative sum,
# kept flags (sorted and scattered), key-group sums.
_WIDEN_BYTES_PER_SCORE = 34
_SLACK = 1e-5  # relative: a widened estimate this close below min_mass counts as reaching it (rounding)


def check_min_mass(min_mass) -> float:
    """A probability mass in (0, 1]."""
    if isinstance(min_mass, bool) or not isinstance(min_mass, (int, float)) or not 0.0 < min_mass <= 1.0:
        raise ValueError(f"min_mass: expected a probability mass in (0, 1], got {min_mass!r}")
    return float(min_mass)


def row_top_keys(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """bool ``[..., Sk]``: per row, the smallest set of keys (largest first) whose probability reaches ``mass``
    (a key is kept when the mass of the keys ranked before it is still below ``mass``)."""
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    return keep.scatter_(-1, order, before < mass)


def widen_to_mass(q: torch.Tensor, k: torch.Tensor, keys: KeySet, *, min_mass: float = 0.95, samples: int = 8,
                  scale: float | None = None, generator: torch.Generator | None = None,
                  return_mass: bool = False) -> KeySet | tuple[KeySet, torch.Tensor]:
    """Widen the blocks of ``keys`` whose estimated captured mass is below ``min_mass`` (module docstring).

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Sk, D]``; bf16, fp16 or fp32, same device, last dim contiguous.
        keys: KeySet ``[B, H, ceil(Sq / block_m), ceil(Sk / block_n)]`` on q's device (any block_m, block_n).
        min_mass: in (0, 1]: the mass each block's sampled rows should keep on average.
        samples, scale, generator: as ``captured_mass`` (the same sampled rows).
        return_mass: also return the widened KeySet's estimated mass.
    Returns:
        KeySet of the same layout (a new one; ``keys`` is not modified) and, with ``return_mass``, fp32
        ``[B, H, n_qblocks]``: the widened KeySet's estimated captured mass on the held-out rows (>= min_mass
        up to rounding for widened blocks, the dense mass ~1 for blocks made dense, the first estimate for
        untouched blocks).
    """
    checks.check_tensors(q=q, k=k)
    keys = check_keys(keys, q, k)
    min_mass = check_min_mass(min_mass)
    samples = checks.check_positive_int(samples, "samples")
    return_mass = checks.check_bool(return_mass, "return_mass")
    b, h, seq_q, d = q.shape
    seq_k = k.shape[2]
    scale = checks.check_scale(scale, d)
    generator = check_generator(generator, q.device)
    if keys.query_order is not None:
        q = gather_queries(q, keys.query_order)
    rows, weights = sample_rows(seq_q, keys.block_m, samples, q.device, generator)
    held_out, held_weights = sample_rows(seq_q, keys.block_m, samples, q.device, generator, phase=0.5)
    n_qblocks, s = rows.shape
    bits = keys.bits.clone()
    mass = torch.empty(b, h, n_qblocks, dtype=torch.float32, device=q.device)
    for bi, heads, blocks in chunks(b, h, n_qblocks, 2 * s, seq_k, d, _WIDEN_BYTES_PER_SCORE):
        w, held_w = weights[blocks], held_weights[blocks]
        probs = row_probs(q[bi, heads], k[bi, heads], rows[blocks].flatten(), scale).unflatten(1, (-1, s))
        sums = group_sums(probs, keys.block_n, keys.n_kblocks)  # [n, blocks, s, n_kb]
        held = group_sums(row_probs(q[bi, heads], k[bi, heads], held_out[blocks].flatten(), scale),
                          keys.block_n, keys.n_kblocks).unflatten(1, (-1, s))

        def estimate(mask, sums, w):  # [n, blocks, n_kb] bool -> [n, blocks]
            return (torch.matmul(sums, mask[..., None].float())[..., 0] * w).sum(-1)

        mask = unpack(keys.bits[bi, heads, blocks], keys.n_kblocks)
        first = estimate(mask, sums, w)
        low = first < min_mass
        top = row_top_keys(probs, min_mass) & (w > 0)[..., None]  # padding slots add nothing
        top = group_sums(top.any(2).float(), keys.block_n, keys.n_kblocks) > 0  # [n, blocks, n_kb]
        widened = mask | (top & low[..., None])
        still_low = low & (estimate(widened, held, held_w) < min_mass * (1 - _SLACK))
        widened |= still_low[..., None]
        bits[bi, heads, blocks] = pack_mask(widened)
        mass[bi, heads, blocks] = torch.where(low, estimate(widened, held, held_w), first)
    out = KeySet(bits, keys.n_kblocks, keys.block_m, keys.block_n, query_order=keys.query_order)
    return (out, mass) if return_mass else out
