"""KeySet words built on the device with tensor arithmetic only: no host-to-device copy (a blocking copy
synchronises the stream and cannot be captured in a CUDA graph). Layout as ``KeySet.bits``: bit j of word w
of a row selects key block 32 w + j; padding bits past the last key block are zero."""

from __future__ import annotations

import torch


def interval_words(first: torch.Tensor, end: torch.Tensor, n_words: int) -> torch.Tensor:
    """int32 ``[R, n_words]``: row r selects key blocks ``[first_r, end_r)`` (int64 ``[R]``)."""
    base = torch.arange(n_words, device=first.device, dtype=torch.int64) * 32
    lo = (first[:, None] - base).clamp(0, 32)
    hi = (end[:, None] - base).clamp(0, 32)
    return (((1 << hi) - 1) & ~((1 << lo) - 1)).to(torch.int32)  # int64 -> int32 keeps the low 32 bits


def full_row_words(n_kblocks: int, device: torch.device) -> torch.Tensor:
    """int32 ``[ceil(n_kblocks / 32)]``: one row with every key block selected."""
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    return interval_words(zero, zero + n_kblocks, -(-n_kblocks // 32))[0]


def full_bits(batch: int, heads: int, n_qblocks: int, n_kblocks: int, device: torch.device) -> torch.Tensor:
    """int32 ``[B, H, n_qblocks, ceil(n_kblocks / 32)]``, every key block selected (``KeySet.full``'s bits)."""
    return full_row_words(n_kblocks, device).expand(batch, heads, n_qblocks, -1).contiguous()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., n_kblocks]`` -> int32 ``[..., ceil(n_kblocks / 32)]`` (as ``KeySet.from_mask``)."""
    n_kblocks = mask.shape[-1]
    n_words = -(-n_kblocks // 32)
    padded = torch.nn.functional.pad(mask, (0, n_words * 32 - n_kblocks)).view(*mask.shape[:-1], n_words, 32)
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    return (padded.to(torch.int64) << shifts).sum(-1).to(torch.int32)
