"""``fgattn::sparse_attention``: the kernel path as a torch custom op.

Opaque to ``torch.compile`` (no graph break around it; ``fullgraph=True`` works) and capturable in CUDA
graphs (no host sync). The variant is resolved *inside* the op, at run time, from ``variant_key`` or,
when it is empty, from the registry: a new sequence length under ``torch.compile(dynamic=True)``
recompiles nothing but the Triton kernel specialisation it needs.
"""

from __future__ import annotations

import torch

from . import cuda_backend, registry, triton_backend
from .keyset import KeySet
from .variant import BACKENDS as BACKEND_NAMES
from .variant import Variant, default_variant


@torch.library.custom_op("fgattn::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, n_kblocks: int,
                     block_m: int, block_n: int, scale: float, variant_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs (see ``fgattn_gen.attention_api.attention``) -> (out ``[B, H, Sq, D]`` in q's dtype, lse fp32 ``[B, H, Sq]``).
    ``variant_key``: a variant's key, ``""`` (the registry's pick) or a backend name (the registry's pick
    of that backend)."""
    keys = KeySet(bits, n_kblocks, block_m, block_n)
    if variant_key and variant_key not in BACKEND_NAMES:
        variant = Variant.from_key(variant_key)
    elif q.device.type == "cuda":
        variant = registry.lookup(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], seq_q=q.shape[2],
                                  seq_k=k.shape[2], block_n=block_n, block_m=block_m, backend=variant_key or None)
    else:  # Triton's interpreter: no GPU to look up
        variant = default_variant(dtype=q.dtype, head_dim=q.shape[-1], block_m=block_m, block_n=block_n)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    backend = cuda_backend if variant.backend == "cuda" else triton_backend
    backend.run(variant, q, k, v, keys, scale, out, lse)
    return out, lse


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, bits, n_kblocks, block_m, block_n, scale, variant_key):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)
