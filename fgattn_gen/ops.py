"""``fgattn::sparse_attention``: the kernel path as a torch custom op.

Opaque to ``torch.compile`` (no graph break around it; ``fullgraph=True`` works) and capturable in CUDA
graphs (no host sync). The variant is resolved *inside* the op, at run time, from ``variant_key`` or,
when it is empty, from the registry: a new sequence length under ``torch.compile(dynamic=True)``
recompiles nothing but the Triton kernel specialisation it needs.
"""

from __future__ import annotations

import torch

from . import registry
from .backends import BACKENDS, launcher
from .keyset import KeySet
from .variant import Variant, default_variant


def served_variant(device: torch.device | str, dtype: torch.dtype, head_dim: int, seq_q: int, seq_k: int,
                   block_m: int, block_n: int, variant_key: str, density: float) -> Variant:
    """The variant a call runs: ``variant_key`` if it names one; else the registry's pick (of the backend
    ``variant_key`` names, if any) for a CUDA device or a GPU name, at ``density`` (-1: unknown); the default
    variant in Triton's interpreter (no GPU to look up)."""
    if variant_key and variant_key not in BACKENDS:
        return Variant.from_key(variant_key)
    if isinstance(device, str) or device.type == "cuda":
        return registry.served(device, dtype, head_dim, seq_q, seq_k, density if density > 0 else None, block_m,
                               block_n, variant_key or None)
    return default_variant(dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n)


@torch.library.custom_op("fgattn::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, n_kblocks: int,
                     block_m: int, block_n: int, scale: float, variant_key: str,
                     density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs (see ``fgattn_gen.attention_api.attention``) -> (out ``[B, H, Sq, D]`` in q's dtype, lse fp32 ``[B, H, Sq]``).
    ``variant_key``: a variant's key, ``""`` (the registry's pick) or a backend name (the registry's pick
    of that backend). ``density``: the key density hint for the registry, or -1 when unknown."""
    keys = KeySet(bits, n_kblocks, block_m, block_n)
    variant = served_variant(q.device, q.dtype, q.shape[-1], q.shape[2], k.shape[2], block_m, block_n, variant_key,
                             density)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    launcher(variant.backend).run(variant, q, k, v, keys, scale, out, lse)
    return out, lse


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, bits, n_kblocks, block_m, block_n, scale, variant_key, density):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)
