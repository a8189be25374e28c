"""Split-K for the predictors' row-times-all-keys kernels (pooled threshold rule, captured mass): how many
programs share one row tile's key range, so that the grid fills the GPU even when there are few row tiles.

A kernel that walks every key for a tile of rows has only ``row_tiles * heads`` programs (e.g. 8 * 24 = 192
at HunyuanVideo 720p, 2 * 24 = 48 at 32K tokens, on 132 SMs): a partial wave, and each program runs the
whole key loop. Cutting the key range into ``splits`` chunks of whole ``BLOCK_K`` steps multiplies the
programs; each writes partial softmax statistics that a cheap merge combines (online-softmax rescaling).
"""

from __future__ import annotations

import torch
import triton

from ..environment import cuda_sm_count

# In Triton's interpreter: a small machine, so that the tests' small shapes still run several splits.
_INTERPRETER_SMS = 2


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA), or a small stand-in elsewhere (the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def key_splits(n_keys: int, block_k: int, programs: int, device: torch.device, *, programs_per_sm: int,
               min_steps: int) -> tuple[int, int]:
    """``(splits, keys_per_split)``: cut ``[0, n_keys)`` into chunks of whole ``block_k`` steps (every chunk
    non-empty, at least ``min_steps`` steps each unless the range is shorter) so that ``programs * splits``
    (``programs``: the grid without the split axis) reaches about ``programs_per_sm`` per SM."""
    steps = triton.cdiv(max(n_keys, 1), block_k)
    wanted = triton.cdiv(programs_per_sm * sm_count(device), max(programs, 1))
    splits = max(1, min(wanted, steps // max(min_steps, 1)))
    steps_per_split = triton.cdiv(steps, splits)
    return triton.cdiv(steps, steps_per_split), steps_per_split * block_k
