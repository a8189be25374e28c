"""GPU compaction of a KeySet's bitmask into the sorted key-block index lists the kernels gather from.

For each (batch*head, query block) row, one Triton program scans the row's bitmask words, writes the
indices of the set bits in ascending order, and writes the number of *keys* (not key blocks) the row
selects, with the ragged last key block counted only up to Sk.

The index workspace is int32 ``[n_bh, n_qblocks, n_kblocks]``. A whole HunyuanVideo 720p layout would
need 10.6 GB of it at density 1, so ``attention`` compacts and runs the heads in chunks whose
workspace stays under ``workspace_budget()`` bytes (default 1 GiB, ``FGATTN_INDEX_WORKSPACE_MB``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .keyset import KeySet

_CHUNK_WORDS = 32


@triton.jit
def _compact_kernel(
    BITS, IDX, NKEYS,
    n_words, n_kblocks, seq_k, n_qblocks, bh_start,
    KEY_GRAN: tl.constexpr, CHUNK_WORDS: tl.constexpr,
):
    qb = tl.program_id(0)
    bh_local = tl.program_id(1)
    row = (bh_start + bh_local).to(tl.int64) * n_qblocks + qb
    bits_row = BITS + row * n_words
    out_row = (bh_local.to(tl.int64) * n_qblocks + qb) * n_kblocks
    lane = tl.arange(0, CHUNK_WORDS * 32)
    count = 0
    for w0 in range(0, n_words, CHUNK_WORDS):
        wi = w0 + tl.arange(0, CHUNK_WORDS)
        words = tl.load(bits_row + wi, mask=wi < n_words, other=0)
        flags = (words[:, None] >> tl.arange(0, 32)[None, :]) & 1
        flags = tl.reshape(flags, [CHUNK_WORDS * 32])
        kblock = w0 * 32 + lane
        flags = tl.where(kblock < n_kblocks, flags, 0)
        pos = count + tl.cumsum(flags, 0) - flags
        tl.store(IDX + out_row + pos, kblock, mask=flags > 0)
        count += tl.sum(flags, 0)
    last = n_kblocks - 1
    last_word = tl.load(bits_row + last // 32)
    overhang = n_kblocks * KEY_GRAN - seq_k
    n_keys = count * KEY_GRAN - ((last_word >> (last % 32)) & 1) * overhang
    tl.store(NKEYS + bh_local.to(tl.int64) * n_qblocks + qb, n_keys)


def workspace_budget() -> int:
    """Bytes the index workspace of one chunk may take."""
    return int(os.environ.get("FGATTN_INDEX_WORKSPACE_MB", "1024")) * (1 << 20)


def heads_per_chunk(keys: KeySet) -> int:
    """How many (batch, head) rows one compaction chunk covers under the workspace budget."""
    b, h, nq, nk = keys.shape
    per_bh = nq * nk * 4
    return max(1, min(b * h, workspace_budget() // per_bh))


def compact(keys: KeySet, bh_start: int, n_bh: int, seq_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists for rows ``bh_start .. bh_start + n_bh`` of the flattened (batch, head) axis.

    Returns:
        idx: int32 ``[n_bh, n_qblocks, n_kblocks]``; row (i, j) starts with the selected key blocks in
            ascending order, the rest is unwritten.
        n_keys: int32 ``[n_bh, n_qblocks]``: keys selected (ragged last key block clipped to ``seq_k``).
    """
    _, _, nq, nk = keys.shape
    idx = torch.empty(n_bh, nq, nk, dtype=torch.int32, device=keys.device)
    n_keys = torch.empty(n_bh, nq, dtype=torch.int32, device=keys.device)
    _compact_kernel[(nq, n_bh)](
        keys.bits, idx, n_keys,
        keys.bits.shape[-1], nk, seq_k, nq, bh_start,
        KEY_GRAN=keys.block_n, CHUNK_WORDS=_CHUNK_WORDS,
        num_warps=4,
    )
    return idx, n_keys
