"""What one attention call did: ``attention(..., return_stats=True)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .keyset import KeySet


@dataclass(frozen=True)
class AttentionStats:
    """Attributes:
        density: the fraction of the Sq x Sk query-key scores the call computed (after any widening), a
            Python float.
        captured_mass: fp32 ``[B, H, n_query_blocks]``, the predictor's estimate of the softmax mass each
            query block's keys hold (``predictors.captured_mass``), or None when none was computed.
    """

    density: float
    captured_mass: torch.Tensor | None = None


def computed_fraction(keys: KeySet, seq_q: int, seq_k: int) -> float:
    """Fraction of the ``seq_q x seq_k`` scores the KeySet selects, ragged last blocks counted exactly
    (synchronises)."""
    b, h, n_qblocks, n_kblocks = keys.shape
    last_keys = seq_k - (n_kblocks - 1) * keys.block_n  # keys in the last key block
    last_word, last_bit = divmod(n_kblocks - 1, 32)
    has_last = (keys.bits[..., last_word] >> last_bit) & 1
    keys_per_block = keys.counts().to(torch.int64) * keys.block_n - has_last * (keys.block_n - last_keys)
    rows = torch.full((n_qblocks,), keys.block_m, dtype=torch.int64, device=keys.device)
    rows[-1] = seq_q - (n_qblocks - 1) * keys.block_m
    return float((keys_per_block * rows).sum()) / (b * h * seq_q * seq_k)
