"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): the joint attention of its 20 dual-stream and 40
single-stream blocks through fgattn.

``Processor`` is diffusers 0.42's ``HunyuanVideoAttnProcessor2_0`` with its attention call replaced: the same
projections, QK norm, rotary embedding of the video tokens and concatenation ``[video; text]``, then
``SparseSelfAttention`` over all ``S = video + text`` tokens with the text keys kept and the padded text keys
(the encoder attention mask) cut off. The token refiner's text-only attention keeps its processor.

Context parallelism: diffusers 0.42 has no ``_cp_plan`` for this model; ``context_parallel_plan(transformer)`` is
one (pass it as ``enable_parallelism(config=..., cp_plan=...)``).
"""

from __future__ import annotations

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoAttnProcessor2_0,
                                                                     HunyuanVideoTransformer3DModel)

from .sparse_attention import FgattnProcessor

MODEL = HunyuanVideoTransformer3DModel


def self_attention_modules(transformer: HunyuanVideoTransformer3DModel) -> list[Attention]:
    """The attention modules that run ``HunyuanVideoAttnProcessor2_0`` (dual-stream blocks first)."""
    return [m for m in transformer.modules()
            if isinstance(m, Attention) and isinstance(m.processor, HunyuanVideoAttnProcessor2_0)]


def context_parallel_plan(transformer: HunyuanVideoTransformer3DModel) -> dict:
    """A diffusers ``cp_plan`` for HunyuanVideo: ``transformer.enable_parallelism(config=ContextParallelConfig(
    ulysses_degree=N), cp_plan=context_parallel_plan(transformer))``.

    Before the first dual-stream block the video tokens (``hidden_states``) and the refined text tokens
    (``encoder_hidden_states``) are each split evenly along the sequence (both counts must be divisible by N),
    the video tokens' rotary embedding likewise, and the video tokens are gathered after ``proj_out``: rank r
    attends with ``[its video tokens; its text tokens]``, which the fgattn processors put back in the model's
    ``[video; text]`` order after the all-to-all (``parallel.ulysses_apply`` with two segments). The attention
    mask stays whole, in the model's order; the processors give their SDPA fallback its shard order. (diffusers'
    own ``HunyuanVideoAttnProcessor2_0`` would apply that whole mask to the shards' order: wrong for a padded
    prompt.) The token-replace (image-to-video) variant is refused: its blocks index the first frame's tokens
    of the whole sequence.
    """
    if not isinstance(transformer, HunyuanVideoTransformer3DModel):
        raise TypeError(f"transformer: expected a HunyuanVideoTransformer3DModel, got {type(transformer).__name__}")
    if transformer.config.image_condition_type == "token_replace":
        raise ValueError("transformer: image_condition_type='token_replace' is not supported under context "
                         "parallelism (its blocks slice the first frame's tokens out of the whole sequence)")
    tokens = ContextParallelInput(split_dim=1, expected_dims=3)
    rotary = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {"transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
            "rope": {0: rotary, 1: rotary},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


class Processor(FgattnProcessor):
    """fgattn in place of ``HunyuanVideoAttnProcessor2_0`` (see the module docstring)."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        """hidden_states ``[B, S_video, C]`` (single-stream blocks: text appended here), encoder_hidden_states
        ``[B, S_text, C]``, attention_mask bool ``[B, 1, 1, S]`` -> (video ``[B, S_video, C]``, text)."""
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections, [B, S, H, D]
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

        # 2. QK normalization
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 3. Rotary embedding of the video tokens
        if image_rotary_emb is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                n_text = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-n_text], image_rotary_emb, sequence_dim=1),
                                   query[:, -n_text:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-n_text], image_rotary_emb, sequence_dim=1),
                                 key[:, -n_text:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Text tokens of the dual-stream blocks: their own projections and norms, appended
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention: fgattn over [video; text], the text keys kept
        def sdpa(mask):
            return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=self._parallel_config)

        text_tokens = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        hidden_states = self.attend(query, key, value, text_tokens=text_tokens, attention_mask=attention_mask,
                                    sdpa=sdpa)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        # 6. Output projections
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
