"""Keys every query block keeps whatever the predictor scores: fixed key ranges (the text tokens of joint
attention) and a local window around the block's own position.

Both are intervals of key blocks, so their words are computed arithmetically (``words.interval_words``).
"""

from __future__ import annotations

import torch

from .words import interval_words


def always_keep_words(*, seq_q: int, seq_k: int, block_m: int, block_n: int,
                      keep_keys: tuple[tuple[int, int], ...], local_window: int | None,
                      device: torch.device) -> torch.Tensor | None:
    """Words of the always-kept key blocks, the same for every batch and head.

    Args:
        keep_keys: key token ranges ``[start, end)`` every query block keeps.
        local_window: None, or w: query block i (tokens ``[qs, qe)``) keeps the keys in ``[qs - w, qe + w)``.
    Returns:
        int32 ``[ceil(Sq / block_m), ceil(ceil(Sk / block_n) / 32)]`` (KeySet word layout), or None if nothing
        is always kept.
    """
    if not keep_keys and local_window is None:
        return None
    n_qblocks, n_kblocks = -(-seq_q // block_m), -(-seq_k // block_n)
    n_words = -(-n_kblocks // 32)
    words = torch.zeros(n_qblocks, n_words, dtype=torch.int32, device=device)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    for start, end in keep_keys:
        words |= interval_words(zero + start // block_n, zero - (-end // block_n), n_words)
    if local_window is not None:
        qs = torch.arange(n_qblocks, device=device, dtype=torch.int64) * block_m
        qe = (qs + block_m).clamp_max(seq_q)
        first = (qs - local_window).clamp_min(0) // block_n
        end = torch.div(qe + local_window + block_n - 1, block_n, rounding_mode="floor").clamp_max(n_kblocks)
        words |= interval_words(first, end, n_words)
    return words
