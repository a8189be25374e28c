"""Wan (``WanTransformer3DModel``): the self-attention ``attn1`` of every block through fgattn; the
cross-attention to the text (``attn2``) keeps diffusers' processor.

``Processor`` is diffusers 0.42's ``WanAttnProcessor`` for self-attention with its attention call replaced:
the same (possibly fused) projections, QK norm across heads and rotary embedding, then ``SparseSelfAttention``
over the video tokens (there are no text keys in Wan's self-attention).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (WanAttention, WanAttnProcessor, WanTransformer3DModel,
                                                           _get_qkv_projections)

from .sparse_attention import FgattnProcessor

MODEL = WanTransformer3DModel


def self_attention_modules(transformer: WanTransformer3DModel) -> list[WanAttention]:
    """The self-attention modules (``attn1`` of each block) that run ``WanAttnProcessor``."""
    return [m for m in transformer.modules()
            if isinstance(m, WanAttention) and not m.is_cross_attention and m.add_k_proj is None
            and isinstance(m.processor, WanAttnProcessor)]


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of x ``[B, S, H, D]`` (interleaved pairs), as in ``WanAttnProcessor``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class Processor(FgattnProcessor):
    """fgattn in place of ``WanAttnProcessor`` in a self-attention layer (see the module docstring)."""

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """hidden_states ``[B, S, C]`` -> ``[B, S, C]``; rotary_emb (cos, sin) ``[1, S, 1, D]``."""
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        def sdpa(mask):
            return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=self._parallel_config)

        hidden_states = self.attend(query, key, value, text_tokens=0, attention_mask=attention_mask, sdpa=sdpa)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
