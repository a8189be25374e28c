"""Launch a rendered Triton variant: compaction of the KeySet, then the gather-load kernel per head chunk."""

from __future__ import annotations

import torch
import triton

from . import build, compaction
from .keyset import KeySet
from .variant import Variant

_LOG2E = 1.4426950408889634


def run(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet, scale: float,
        out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Write ``out`` ``[B, H, Sq, D]`` (and ``lse`` fp32 ``[B, H, Sq]`` if given) for validated inputs.

    The index workspace is built and consumed in chunks of heads (``compaction.heads_per_chunk``), so
    its memory stays bounded for any sequence length and density. No host synchronisation.
    """
    module = build.load(variant, interpret=build.interpreting())
    b, h, sq, _ = q.shape
    n_mtiles = triton.cdiv(sq, variant.tile_m)
    n_bh = b * h
    chunk = compaction.heads_per_chunk(keys)
    lse_arg = lse if lse is not None else out  # unused pointer when WRITE_LSE is False
    for bh_start in range(0, n_bh, chunk):
        n = min(chunk, n_bh - bh_start)
        idx, n_keys = compaction.compact(keys, bh_start, n, k.shape[2])
        module.kernel[(n_mtiles, n)](
            q, k, v, out, lse_arg, idx, n_keys,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            h, sq, keys.shape[2], idx.shape[-1], bh_start, scale * _LOG2E,
            WRITE_LSE=lse is not None,
            num_warps=module.NUM_WARPS, num_stages=module.NUM_STAGES,
        )

