"""GPU compaction of a KeySet's bitmask into the sorted key-block index lists the kernels gather from.

For each (batch*head, query block) row, the indices of the set bits are written in ascending order,
with the number of *keys* (not key blocks) the row selects, the ragged last key block counted only up
to Sk. The row is split into chunks of words, one Triton program each; a chunk's first rank is the
popcount of the words before it, so all chunks run in parallel.

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

_CHUNK_WORDS = 32  # bitmask words (x32 key blocks) per program
_PREFIX_WORDS = 512  # words popcounted per step when summing the words before a chunk
_NUM_WARPS = 4


@triton.jit
def _popcount(x):
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@triton.jit
def _compact_kernel(
    BITS, IDX, NKEYS,
    n_words, n_kblocks, seq_k, n_qblocks, bh_start,
    KEY_GRAN: tl.constexpr, CHUNK_WORDS: tl.constexpr, PREFIX_WORDS: tl.constexpr,
):
    """Program (chunk, query block, bh): writes the indices of the set bits of words
    [chunk * CHUNK_WORDS, (chunk + 1) * CHUNK_WORDS) of its row at their rank in the row."""
    chunk = tl.program_id(0)
    qb = tl.program_id(1)
    bh_local = tl.program_id(2)
    bits_row = BITS + ((bh_start + bh_local).to(tl.int64) * n_qblocks + qb) * n_words
    out_row = (bh_local.to(tl.int64) * n_qblocks + qb) * n_kblocks
    first_word = chunk * CHUNK_WORDS

    # rank of this chunk's first selected key block: popcount of all earlier words of the row
    base = 0
    for w0 in range(0, first_word, PREFIX_WORDS):
        wi = w0 + tl.arange(0, PREFIX_WORDS)
        base += tl.sum(_popcount(tl.load(bits_row + wi, mask=wi < first_word, other=0)), 0)

    wi = first_word + tl.arange(0, CHUNK_WORDS)
    words = tl.load(bits_row + wi, mask=wi < n_words, other=0)
    kblock = wi[:, None] * 32 + tl.arange(0, 32)[None, :]
    flags = tl.where(kblock < n_kblocks, (words[:, None] >> tl.arange(0, 32)[None, :]) & 1, 0)
    per_word = tl.sum(flags, 1)
    word_rank = base + tl.cumsum(per_word, 0) - per_word
    rank = word_rank[:, None] + tl.cumsum(flags, 1) - flags
    tl.store(IDX + out_row + rank, kblock, mask=flags > 0)

    if first_word + CHUNK_WORDS >= n_words:  # the row's last chunk writes its key count
        last = n_kblocks - 1
        last_selected = (tl.load(bits_row + last // 32) >> (last % 32)) & 1
        n_keys = (base + tl.sum(per_word, 0)) * KEY_GRAN - last_selected * (n_kblocks * KEY_GRAN - seq_k)
        tl.store(NKEYS + bh_local.to(tl.int64) * n_qblocks + qb, n_keys)


def workspace_budget() -> int:
    """Bytes the index workspace of one chunk may take."""
    return int(os.environ.get("FGATTN_INDEX_WORKSPACE_MB", "1024")) * (1 << 20)


def heads_per_chunk(keys: KeySet) -> int:
    """How many (batch, head) rows one compaction chunk covers under the workspace budget."""
    b, h, nq, nk = keys.shape
    per_bh = nq * nk * 4
    return max(1, min(b * h, workspace_budget() // per_bh))


def compact(keys: KeySet, bh_start: int, n_bh: int, seq_k: int, *, chunk_words: int = _CHUNK_WORDS,
            num_warps: int = _NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists for rows ``bh_start .. bh_start + n_bh`` of the flattened (batch, head) axis.

    Returns:
        idx: int32 ``[n_bh, n_qblocks, n_kblocks]``; row (i, j) starts with the selected key blocks in
            ascending order, the rest is unwritten.
        n_keys: int32 ``[n_bh, n_qblocks]``: keys selected (ragged last key block clipped to ``seq_k``).
    """
    _, _, nq, nk = keys.shape
    idx = torch.empty(n_bh, nq, nk, dtype=torch.int32, device=keys.device)
    n_keys = torch.empty(n_bh, nq, dtype=torch.int32, device=keys.device)
    n_words = keys.bits.shape[-1]
    _compact_kernel[(triton.cdiv(n_words, chunk_words), nq, n_bh)](
        keys.bits, idx, n_keys,
        n_words, nk, seq_k, nq, bh_start,
        KEY_GRAN=keys.block_n, CHUNK_WORDS=chunk_words, PREFIX_WORDS=_PREFIX_WORDS,
        num_warps=num_warps,
    )
    return idx, n_keys
