"""How much of the true softmax mass a KeySet keeps, estimated per query block from a few of its query rows.

For query block i, ``samples`` query rows of the block (or all of them when the block is shorter) are scored
exactly against every key in fp32: ``p_r = softmax(scale * q_r . K)``; the block's estimate is the mean over
those rows of ``sum_{selected keys j} p_r[j]``. With ``samples >= block_m`` every row is used, and the
estimate is the exact per-block mean of the captured mass.

Sampling is stratified: the block's rows are cut into ``s`` consecutive strata of (nearly) equal size and
one row is taken from each, at a fixed fraction of the stratum that changes from block to block (golden-ratio
sequence), or, with a ``generator``, at a uniformly random position in each stratum (an unbiased estimate).
The rows are the same for every batch and head.

Cost: ``B * H * n_query_blocks * samples * Sk * D`` multiply-adds (e.g. 8 rows of each 128-query block:
1/16 of the q k^T product of dense attention). On CUDA (and in Triton's interpreter) fused kernels
(``mass_kernel``: the key range split across programs, then a per-block merge) score the sampled rows, read in
place through any ``query_order``, in one pass over the keys, scores never written; elsewhere
torch ops, whose fp32 ``[rows, Sk]`` probabilities of a chunk of heads (or, if one head does not fit, of a
chunk of its query blocks) stay under ``workspace_budget()``. A KeySet with ``query_order`` is estimated on
its own blocks (the rows of block i are the queries it orders there). No host synchronisation.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..compaction import workspace_budget
from ..keyset import KeySet
from ..query_order import gather_queries
from . import checks
from .mass_kernel import block_mass, runs_fused

_GOLDEN = 0.6180339887498949
# Bytes per (sampled row, key) score that captured_mass keeps alive: scores, probabilities, key-group sums.
_MASS_BYTES_PER_SCORE = 12


def check_keys(keys, q: torch.Tensor, k: torch.Tensor) -> KeySet:
    """``keys`` if it is a KeySet of q/k's layout on q's device (errors name ``keys``)."""
    if not isinstance(keys, KeySet):
        raise TypeError(f"keys: expected a fgattn_gen.KeySet, got {type(keys).__name__}")
    b, h, seq_q, _ = q.shape
    keys.check_compatible(b, h, seq_q, k.shape[2], q.device)
    return keys


def check_generator(generator, device: torch.device) -> torch.Generator | None:
    """None, or a torch.Generator on the device type of q (its numbers are drawn where q is)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator: on {generator.device}, but q is on {device}; make it with "
                         f"torch.Generator(device=q.device)")
    return generator


def sample_rows(seq_q: int, block_m: int, samples: int, device: torch.device,
                generator: torch.Generator | None = None, phase: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified query rows of every query block (module docstring); ``phase`` shifts the fixed position in
    each stratum (0.5: the other half of each stratum, a second set of rows for validation).

    Returns:
        rows int64 ``[n_qblocks, s]`` (global query indices, ``s = min(samples, block_m)``) and weights fp32
        ``[n_qblocks, s]``: ``1 / s_i`` for the ``s_i = min(s, rows of block i)`` distinct rows of block i,
        0 for the padding slots of a short last block (their row index repeats a valid row).
    """
    n_qblocks = -(-seq_q // block_m)
    s = min(samples, block_m)
    block = torch.arange(n_qblocks, device=device, dtype=torch.int64)
    size = (seq_q - block * block_m).clamp_max(block_m)[:, None]  # rows of each block
    taken = size.clamp_max(s)  # distinct rows sampled from each block
    slot = torch.arange(s, device=device, dtype=torch.int64)[None, :]
    j = torch.minimum(slot, taken - 1)
    start = j * size // taken  # stratum j of block i: rows [start, end)
    width = (j + 1) * size // taken - start  # >= 1 since taken <= size
    if generator is None:
        u = ((block.double() + 1) * _GOLDEN + phase) % 1.0
        u = u[:, None].expand(n_qblocks, s)
    else:
        u = torch.rand(n_qblocks, s, generator=generator, device=generator.device, dtype=torch.float64)
        u = u.to(device)
    offset = (u * width.double()).floor().to(torch.int64).clamp_max(width - 1)
    rows = block[:, None] * block_m + start + offset
    weights = (slot < taken).float() / taken.float()
    return rows, weights


def chunks(batch: int, heads: int, n_qblocks: int, s: int, seq_k: int, d: int,
           bytes_per_score: int) -> Iterator[tuple[int, slice, slice]]:
    """``(batch index, head slice, query-block slice)`` chunks whose ``[heads, blocks * s, Sk]`` scores at
    ``bytes_per_score`` bytes each (plus the head's fp32 keys and its unpacked mask) fit ``workspace_budget()``;
    whole heads when one head fits, else blocks of one head."""
    budget = workspace_budget()
    per_block = s * seq_k * bytes_per_score + 2 * seq_k
    per_head = n_qblocks * per_block + 4 * seq_k * d
    head_chunk = min(heads, budget // per_head)
    for bi in range(batch):
        if head_chunk >= 1:
            for h0 in range(0, heads, head_chunk):
                yield bi, slice(h0, min(heads, h0 + head_chunk)), slice(0, n_qblocks)
        else:
            block_chunk = max(1, (budget - 4 * seq_k * d) // per_block)
            for h in range(heads):
                for b0 in range(0, n_qblocks, block_chunk):
                    yield bi, slice(h, h + 1), slice(b0, min(n_qblocks, b0 + block_chunk))


def row_probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 ``[n, R, Sk]``: exact softmax over every key of the query rows ``rows`` (int64 ``[R]``) of q
    ``[n, Sq, D]`` against k ``[n, Sk, D]``."""
    picked = q.index_select(1, rows).float()
    return torch.softmax(torch.matmul(picked * scale, k.float().transpose(1, 2)), dim=-1)


def group_sums(probs: torch.Tensor, block_n: int, n_kblocks: int) -> torch.Tensor:
    """``[..., Sk]`` -> ``[..., n_kblocks]``: the sum over each key block (the last one may be short)."""
    if block_n == 1:
        return probs
    padded = torch.nn.functional.pad(probs, (0, n_kblocks * block_n - probs.shape[-1]))
    return padded.unflatten(-1, (n_kblocks, block_n)).sum(-1)


def unpack(bits: torch.Tensor, n_kblocks: int) -> torch.Tensor:
    """int32 KeySet words ``[..., n_words]`` (contiguous) -> bool ``[..., n_kblocks]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return unpacked.flatten(-2)[..., :n_kblocks].bool()


def captured_mass(q: torch.Tensor, k: torch.Tensor, keys: KeySet, *, samples: int = 8,
                  scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimated softmax mass that ``keys`` keeps, per query block (see the module docstring).

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Sk, D]``; bf16, fp16 or fp32, same device, last dim contiguous,
            D in {64, 128}.
        keys: KeySet ``[B, H, ceil(Sq / block_m), ceil(Sk / block_n)]`` on q's device (any block_m, block_n).
        samples: query rows per block, >= 1; ``samples >= block_m`` uses every row (exact).
        scale: softmax scale, default ``D ** -0.5``.
        generator: None (fixed stratified rows), or a torch.Generator on q's device type (random row in each
            stratum).
    Returns:
        fp32 ``[B, H, ceil(Sq / block_m)]`` in [0, 1]: mean over the sampled rows of each block of the
        probability (softmax over all keys) on the block's selected keys.
    """
    checks.check_tensors(q=q, k=k)
    keys = check_keys(keys, q, k)
    samples = checks.check_positive_int(samples, "samples")
    b, h, seq_q, d = q.shape
    seq_k = k.shape[2]
    scale = checks.check_scale(scale, d)
    generator = check_generator(generator, q.device)
    rows, weights = sample_rows(seq_q, keys.block_m, samples, q.device, generator)
    n_qblocks, s = rows.shape
    if runs_fused(q):
        return fused_mass(q, k, keys, rows, weights, scale=scale)
    if keys.query_order is not None:
        q = gather_queries(q, keys.query_order)
    mass = torch.empty(b, h, n_qblocks, dtype=torch.float32, device=q.device)
    for bi, heads, blocks in chunks(b, h, n_qblocks, s, seq_k, d, _MASS_BYTES_PER_SCORE):
        probs = row_probs(q[bi, heads], k[bi, heads], rows[blocks].flatten(), scale)
        sums = group_sums(probs, keys.block_n, keys.n_kblocks).unflatten(1, (-1, s))  # [n, blocks, s, n_kb]
        mask = unpack(keys.bits[bi, heads, blocks], keys.n_kblocks)  # [n, blocks, n_kb]
        per_row = torch.matmul(sums, mask[..., None].float())[..., 0]  # [n, blocks, s]
        mass[bi, heads, blocks] = (per_row * weights[blocks]).sum(-1)
    return mass


def fused_mass(q: torch.Tensor, k: torch.Tensor, keys: KeySet, rows: torch.Tensor, weights: torch.Tensor, *,
               scale: float, min_mass: float | None = None) -> torch.Tensor:
    """``captured_mass`` with the fused kernels (``runs_fused(q)``), from ``sample_rows``'s rows and weights;
    a ``query_order`` is applied to the sampled rows only (q is read in place). With ``min_mass``, the blocks
    below it are set to every key in ``keys.bits`` (in place; the estimate is the one before)."""
    if keys.query_order is not None:
        order = keys.query_order
        rows = order.gather(2, rows.flatten().expand(*order.shape[:2], -1))
    return block_mass(q, k, keys.bits, rows, weights, block_n=keys.block_n, scale=scale, min_mass=min_mass)
