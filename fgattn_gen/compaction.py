"""GPU compaction of a KeySet's bitmask into the sorted key-block index lists the kernels gather from.

For each (batch*head, query block) row, the indices of the set bits are written in ascending order,
with the number of *keys* (not key blocks) the row selects, the ragged last key block counted only up
to Sk. On a GPU a CUDA kernel (templates/cuda/compact_keys.cu, NVRTC) does it with one warp per row
and work per word, not per bit. The Triton kernels below are the same function for Triton's CPU
interpreter: a first pass ranks each chunk of words, a second expands the chunks' bits in parallel.

``work_order`` turns the key counts into the CUDA kernel's work order (heavier query tiles first), on the
device, without a host synchronisation.

The index workspace is int32 ``[n_bh, n_qblocks, n_kblocks]``: 9.9 GiB for a whole HunyuanVideo 720p layout
(24 heads, 119,056 tokens, block_m=128, block_n=1) at any density. ``attention`` compacts and runs the heads in
chunks of equal size whose workspace stays under ``workspace_budget()`` bytes: ``FGATTN_INDEX_WORKSPACE_MB`` when
set, else 1/8 of the GPU's memory (at least 1 GiB), 1 GiB on the CPU. Every chunk is one launch with its own
tail wave: on an H200 (bench/results/issue15_quick_h200.md) the 24 heads of 119,056 tokens in one launch ran at
0.93 / 0.91 / 0.83 / 0.66 of cuDNN's rate per computed score (uniform 1.0 / uniform 0.3 / uneven 0.3 / uneven
0.03) against 0.90 / 0.89 / 0.74 / 0.29 in the 12 launches a 1 GiB budget makes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import nvrtc
from .environment import cuda_total_memory, interpreting, templates_dir
from .keyset import KeySet

_CHUNK_WORDS = 256  # bitmask words (x32 key blocks) per compaction program
_STEP_WORDS = 32  # words expanded and scanned per step of a program
_NUM_WARPS = 1


@triton.jit
def _popcount(x):
    """Bits set in each int32 lane (SWAR arithmetic)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@triton.jit
def _chunk_rank_kernel(BITS, CHUNK_RANK, NKEYS, n_words, n_kblocks, seq_k, n_qblocks, n_chunks, bh_start,
                       KEY_GRAN: tl.constexpr, CHUNK_WORDS: tl.constexpr):
    """Program per row: CHUNK_RANK[row, c] = set bits in the row's words before chunk c; NKEYS[row] = keys."""
    qb = tl.program_id(0)
    bh_local = tl.program_id(1)
    bits_row = BITS + ((bh_start + bh_local).to(tl.int64) * n_qblocks + qb) * n_words
    row = bh_local.to(tl.int64) * n_qblocks + qb
    rank = 0
    for c in range(0, n_chunks):
        tl.store(CHUNK_RANK + row * n_chunks + c, rank)
        wi = c * CHUNK_WORDS + tl.arange(0, CHUNK_WORDS)
        words = tl.load(bits_row + wi, mask=wi < n_words, other=0)
        tail_bits = n_kblocks - wi * 32  # padding bits past n_kblocks count for nothing
        words = words & tl.where(tail_bits >= 32, -1, (1 << tl.minimum(tl.maximum(tail_bits, 0), 31)) - 1)
        rank += tl.sum(_popcount(words), 0)
    last = n_kblocks - 1
    last_selected = (tl.load(bits_row + last // 32) >> (last % 32)) & 1
    tl.store(NKEYS + row, rank * KEY_GRAN - last_selected * (n_kblocks * KEY_GRAN - seq_k))


@triton.jit
def _compact_kernel(BITS, CHUNK_RANK, IDX, n_words, n_kblocks, n_qblocks, n_chunks, bh_start,
                    CHUNK_WORDS: tl.constexpr, STEP_WORDS: tl.constexpr):
    """Program (chunk, query block, bh): writes the key-block indices of the set bits of its chunk of
    words at their ranks, STEP_WORDS words (x32 bits, flattened and scanned) at a time."""
    chunk = tl.program_id(0)
    qb = tl.program_id(1)
    bh_local = tl.program_id(2)
    bits_row = BITS + ((bh_start + bh_local).to(tl.int64) * n_qblocks + qb) * n_words
    row = bh_local.to(tl.int64) * n_qblocks + qb
    out_row = IDX + row * n_kblocks
    rank = tl.load(CHUNK_RANK + row * n_chunks + chunk)
    lane = tl.arange(0, STEP_WORDS * 32)
    for w0 in range(chunk * CHUNK_WORDS, tl.minimum((chunk + 1) * CHUNK_WORDS, n_words), STEP_WORDS):
        wi = w0 + tl.arange(0, STEP_WORDS)
        words = tl.load(bits_row + wi, mask=wi < n_words, other=0)
        flags = tl.reshape((words[:, None] >> tl.arange(0, 32)[None, :]) & 1, [STEP_WORDS * 32])
        kblock = w0 * 32 + lane
        flags = tl.where(kblock < n_kblocks, flags, 0)
        tl.store(out_row + rank + tl.cumsum(flags, 0) - flags, kblock, mask=flags != 0)
        rank += tl.sum(flags, 0)


_MIN_BUDGET = 1 << 30  # bytes; the budget on the CPU and the least on a GPU
_GPU_MEMORY_SHARE = 8  # on a GPU, up to 1/8 of its memory


def workspace_budget(device: torch.device | None = None) -> int:
    """Bytes the index workspace of one launch may take on ``device``: ``FGATTN_INDEX_WORKSPACE_MB`` when set,
    else 1/8 of a CUDA device's memory (at least 1 GiB), else (CPU, or no device) 1 GiB."""
    setting = os.environ.get("FGATTN_INDEX_WORKSPACE_MB")
    if setting is not None:
        return int(setting) * (1 << 20)
    if device is None or device.type != "cuda":
        return _MIN_BUDGET
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(_MIN_BUDGET, cuda_total_memory(index) // _GPU_MEMORY_SHARE)


def heads_per_chunk(keys: KeySet) -> int:
    """How many (batch, head) rows one compaction chunk (one launch) covers: the fewest chunks that keep each
    chunk's workspace under ``workspace_budget(keys.device)``, sized evenly (24 rows that fit 22 at a time run
    as 12 + 12, not 22 + 2, so no launch is a lone tail)."""
    b, h, nq, nk = keys.shape
    per_bh = nq * nk * 4
    fits = max(1, min(b * h, workspace_budget(keys.device) // per_bh))
    n_chunks = triton.cdiv(b * h, fits)
    return triton.cdiv(b * h, n_chunks)


def compact(keys: KeySet, bh_start: int, n_bh: int, seq_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists for rows ``bh_start .. bh_start + n_bh`` of the flattened (batch, head) axis.

    Returns:
        idx: int32 ``[n_bh, n_qblocks, n_kblocks]``; row (i, j) starts with the selected key blocks in
            ascending order, the rest is unwritten.
        n_keys: int32 ``[n_bh, n_qblocks]``: keys selected (ragged last key block clipped to ``seq_k``).
    """
    _, _, nq, nk = keys.shape
    n_words = keys.bits.shape[-1]
    if keys.device.type == "cuda" and not interpreting():
        return _compact_cuda(keys, bh_start, n_bh, seq_k)
    n_chunks = triton.cdiv(n_words, _CHUNK_WORDS)
    idx = torch.empty(n_bh, nq, nk, dtype=torch.int32, device=keys.device)
    n_keys = torch.empty(n_bh, nq, dtype=torch.int32, device=keys.device)
    chunk_rank = torch.empty(n_bh, nq, n_chunks, dtype=torch.int32, device=keys.device)
    _chunk_rank_kernel[(nq, n_bh)](
        keys.bits, chunk_rank, n_keys, n_words, nk, seq_k, nq, n_chunks, bh_start,
        KEY_GRAN=keys.block_n, CHUNK_WORDS=_CHUNK_WORDS, num_warps=1,
    )
    _compact_kernel[(n_chunks, nq, n_bh)](
        keys.bits, chunk_rank, idx, n_words, nk, nq, n_chunks, bh_start,
        CHUNK_WORDS=_CHUNK_WORDS, STEP_WORDS=_STEP_WORDS, num_warps=_NUM_WARPS,
    )
    return idx, n_keys


_CUDA_WARPS = 4


@functools.cache
def _cuda_compact_kernel(device_index: int) -> nvrtc.CudaKernel:
    """The CUDA compaction kernel, looked up once (it runs on every attention call)."""
    return nvrtc.load_kernel(templates_dir() / "cuda" / "compact_keys.cu", "fgattn_compact_keys", device_index,
                             (("FGATTN_COMPACT_WARPS", _CUDA_WARPS),))


def _compact_cuda(keys: KeySet, bh_start: int, n_bh: int, seq_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as ``compact`` through the warp-per-row CUDA kernel (templates/cuda/compact_keys.cu)."""
    _, _, nq, nk = keys.shape
    kernel = _cuda_compact_kernel(keys.device.index if keys.device.index is not None else torch.cuda.current_device())
    idx = torch.empty(n_bh, nq, nk, dtype=torch.int32, device=keys.device)
    n_keys = torch.empty(n_bh, nq, dtype=torch.int32, device=keys.device)
    n_rows = n_bh * nq
    kernel((triton.cdiv(n_rows, _CUDA_WARPS), 1, 1), (32, _CUDA_WARPS, 1),
           keys.bits, idx, n_keys, keys.bits.shape[-1], nk, seq_k, keys.block_n, nq, bh_start, n_rows)
    return idx, n_keys


WORK_ORDER_BUCKETS_PER_OCTAVE = 4  # key counts within a quarter octave are "as heavy" (raster order kept)


def work_order(n_keys: torch.Tensor, *, seq_q: int, block_m: int, tile_m: int, order: int) -> torch.Tensor:
    """The CUDA kernel's work order over one launch's query tiles (``templates/cuda/include/fgattn/schedule.cuh``).

    Args:
        n_keys: int32 ``[n_bh, n_qblocks]`` from ``compact`` (keys per query block).
        seq_q: query rows; block_m: the KeySet's query block; tile_m: the kernel's query tile (divides
            ``block_m``).
        order: 1: heavier tiles first within each (batch, head) row, the rows in raster order (a row's tiles
            stay together, so the CTAs that run together gather from one head's K/V); 2: heavier tiles first
            over all rows of the launch (the shortest tail when a few blocks are far heavier than the rest).

    Returns:
        int32 ``[n_bh * ceil(seq_q / tile_m)]``, a permutation of the tiles ``bh * n_mtiles + m``: tiles by
        key count in buckets of a quarter octave, heaviest first; raster order within a bucket (a stable
        sort), so masks of even density keep the raster order's locality.
    """
    if order not in (1, 2):
        raise ValueError(f"order: expected 1 (within a head) or 2 (over all heads), got {order}")
    if block_m % tile_m:
        raise ValueError(f"tile_m: must divide block_m = {block_m}, got {tile_m}")
    n_bh, n_qblocks = n_keys.shape
    n_mtiles = triton.cdiv(seq_q, tile_m)
    if n_qblocks != triton.cdiv(seq_q, block_m):
        raise ValueError(f"n_keys: expected {triton.cdiv(seq_q, block_m)} query blocks for seq_q = {seq_q}, "
                         f"got {n_qblocks}")
    tiles = n_keys.repeat_interleave(block_m // tile_m, dim=1)[:, :n_mtiles]  # the last block may hold fewer tiles
    weight = torch.floor(torch.log2(tiles.float() + 1.0) * WORK_ORDER_BUCKETS_PER_OCTAVE)
    if order == 1:
        perm = torch.sort(weight, dim=1, descending=True, stable=True).indices
        perm = perm + torch.arange(n_bh, device=n_keys.device)[:, None] * tiles.shape[1]
    else:
        perm = torch.sort(weight.flatten(), descending=True, stable=True).indices
    return perm.flatten().to(torch.int32)
