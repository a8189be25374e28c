"""Dense and block-sparse peers, timed beside fgattn in benchmarks and tuning runs (GPU only).

- ``sdpa(q, k, v, backend)``: dense SDPA through one backend ("cudnn" or "flash").
- ``flex_block(q, k, v, mask128)``: FlexAttention with a 128 x 128 block mask, every selected block
  marked full (no mask_mod work inside it), compiled once per process.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Dense attention, q/k/v ``[B, H, S, D]`` bf16/fp16, through SDPA backend ``"cudnn"`` or ``"flash"``."""
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def flex_block_mask(mask128: torch.Tensor, seq_q: int, seq_k: int) -> BlockMask:
    """BlockMask from bool ``[B, H, ceil(Sq/128), ceil(Sk/128)]``; selected blocks are full blocks."""
    counts = mask128.sum(-1, dtype=torch.int32)
    order = torch.argsort(mask128.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), order, counts, order, BLOCK_SIZE=128,
                                    seq_lengths=(seq_q, seq_k))


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention (compiled) over a 128 x 128 ``block_mask`` from ``flex_block_mask``."""
    return _compiled_flex()(q, k, v, block_mask=block_mask)
