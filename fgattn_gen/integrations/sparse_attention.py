"""The fgattn side of a diffusers self-attention layer: ``SparseSelfAttention`` (a predictor from
``predictors.make_predictor``, its per-layer state, the denoising step and CFG branch, text keys, padded keys,
the SDPA fallback, Ulysses context parallelism through ``parallel.ulysses_apply``) and ``FgattnProcessor``, the
base of the per-model processors (``hunyuan_video``, ``wan``). See ``install`` for the predictors, steps and
fallback rules."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..attention_api import attention
from ..parallel import rank_major, ulysses_apply
from ..predictors import PREDICTORS, CachedMask, Predictor, knob_names, make_predictor
from ..variant import DTYPE_NAMES, HEAD_DIMS
from .context_parallel import ulysses_group

HUNYUAN_REFRESH_STEPS = (0, 1, 10, 40)  # Chipmunk's full steps for HunyuanVideo's 50-step schedule


class _Unsupported(Exception):
    """Inputs fgattn does not take: the call runs the original SDPA attention instead."""


class SparseSelfAttention:
    """The self-attention of one transformer through fgattn: a predictor, its per-layer state, the step.

    Args:
        predictor: one of ``PREDICTORS`` (see the module docstring, with each predictor's knobs).
        block_m: queries per KeySet query block; block_n: keys per key block.
        keep_text: every query block keeps the text keys of joint attention.
        knobs: the predictor's knobs.
    """

    def __init__(self, predictor: str = "pooled_top_p", *, block_m: int = 128, block_n: int = 1,
                 keep_text: bool = True, **knobs):
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor: expected one of {tuple(PREDICTORS)}, got {predictor!r}")
        unknown = set(knobs) - knob_names(predictor)
        if unknown:
            raise TypeError(f"{predictor}: unknown knob(s) {sorted(unknown)}; it takes "
                            f"{sorted(knob_names(predictor)) or 'none'}")
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if predictor == "cached_exact" and "policy" not in knobs:
            knobs.setdefault("refresh_steps", HUNYUAN_REFRESH_STEPS)
        make_predictor(predictor, block_m=block_m, block_n=block_n, **knobs)  # validates the knobs now
        self.predictor = predictor
        self.block_m, self.block_n = block_m, block_n
        self.keep_text = bool(keep_text)
        self.knobs = knobs
        self.step = 0
        self.branch = 0
        self._last_timestep: float | None = None
        self._predictors: dict[tuple, Predictor] = {}
        self._mask_lengths: tuple[torch.Tensor, tuple[int, ...] | None] | None = None
        self._warned = False

    # ------------------------------------------------------------------ steps
    def set_step(self, step: int, branch: int = 0) -> None:
        """The denoising step and CFG branch of the next transformer call (``cached_exact``)."""
        for name, value in (("step", step), ("branch", branch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        self.step, self.branch = step, branch

    def reset(self) -> None:
        """Start a new generation: step 0, branch 0, no cached masks."""
        self.step = self.branch = 0
        self._last_timestep = None
        self._predictors = {slot: p for slot, p in self._predictors.items() if not isinstance(p, CachedMask)}

    def observe_timestep(self, timestep) -> None:
        """Advance the step from a transformer call's timestep (see the module docstring)."""
        t = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_timestep is None or t > self._last_timestep:
            self.reset()
        elif t == self._last_timestep:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self._last_timestep = t

    # ------------------------------------------------------------------ attention
    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, layer: int,
                 text_tokens: int, attention_mask: torch.Tensor | None,
                 sdpa: Callable[[torch.Tensor | None], torch.Tensor], parallel_config=None) -> torch.Tensor:
        """Self-attention of one layer, in diffusers' layout.

        Args:
            query, key, value: ``[B, s, H, D]`` (last dim contiguous), as diffusers' processors hold them: the
                whole sequence, or under context parallelism (``parallel_config``) this rank's shard, its share of
                each segment (the video tokens, then the text tokens).
            layer: index of the layer (the key of its cached masks).
            text_tokens: how many of the s tokens are text tokens, at the end (0: none).
            attention_mask: None or the processor's key mask over the whole sequence in the model's order
                (bool ``[B, 1, 1, S]`` or ``[B, S]``, True = valid).
            sdpa: ``sdpa(attn_mask)`` is the original processor's attention call on the same tensors (the
                fallback); under context parallelism it gets the mask in the order of the gathered shards.
            parallel_config: the processor's diffusers ``ParallelConfig`` (None: one device). With Ulysses
                context parallelism of degree N, fgattn runs on all S = N*s tokens of H/N heads between two
                all-to-alls (``parallel.ulysses_apply``), so the predictors and their cached masks see the
                tokens of the one-device call and keep this rank's heads only.
        Returns:
            ``[B, s, H, D]`` in q's dtype (a transposed view of fgattn's ``[B, H, s, D]`` output).
        """
        group, world = ulysses_group(parallel_config, query.shape[2])
        seq = query.shape[1]
        segments = tuple(n for n in (seq - text_tokens, text_tokens) if n)
        text = (world * (seq - text_tokens), world * seq) if text_tokens else None
        try:
            self._check_supported(query, key)
            lengths = self._key_lengths(attention_mask, query.shape[0], world * key.shape[1])
        except _Unsupported as reason:
            if not self._warned:
                warnings.warn(f"fgattn: {reason}; these layers run the original SDPA attention instead "
                              f"(warned once per install)", stacklevel=3)
                self._warned = True
            if attention_mask is not None and world > 1 and attention_mask.shape[-1] == world * seq:
                attention_mask = rank_major(attention_mask, segments, world, dim=-1)
            return sdpa(attention_mask)

        head_range = None  # this rank's heads of the layer's (the all-to-all gives rank r the r-th H/N)
        if world > 1:
            import torch.distributed as dist

            head_range = (dist.get_rank(group) * (query.shape[2] // world), query.shape[2])

        def attend(q, k, v):  # [B, H', S, D]: every token of H' heads
            return self._attend_sequence(q, k, v, layer, text, lengths, head_range)

        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, s, D] views, no copies
        out = attend(q, k, v) if world == 1 else ulysses_apply(q, k, v, attend, group=group, segments=segments)
        return out.transpose(1, 2)

    def _attend_sequence(self, q, k, v, layer: int, text: tuple[int, int] | None,
                         lengths: tuple[int, ...] | None, head_range: tuple[int, int] | None) -> torch.Tensor:
        """fgattn on q/k/v ``[B, H, S, D]`` over each sample's valid keys (``lengths``, None: all)."""
        if lengths is None or len(set(lengths)) == 1:
            valid = k.shape[2] if lengths is None else lengths[0]
            return self._attend(q, k[:, :, :valid], v[:, :, :valid], layer, text, None, head_range)
        return torch.cat([self._attend(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], layer, text, b, head_range)
                          for b, n in enumerate(lengths)])

    def _check_supported(self, query: torch.Tensor, key: torch.Tensor) -> None:
        if query.dtype not in DTYPE_NAMES:
            raise _Unsupported(f"{query.dtype} inputs (the kernels take {tuple(DTYPE_NAMES)})")
        if query.shape[-1] not in HEAD_DIMS:
            raise _Unsupported(f"head dim {query.shape[-1]} (the kernels take {HEAD_DIMS})")
        if key.shape[:1] + key.shape[2:] != query.shape[:1] + query.shape[2:]:
            raise _Unsupported(f"key shape {tuple(key.shape)} does not match query {tuple(query.shape)}")

    def _key_lengths(self, mask: torch.Tensor | None, batch: int, seq_k: int) -> tuple[int, ...] | None:
        """Valid keys per sample of a valid-prefix key mask (None: every key valid). One host sync per new
        mask: a transformer passes the same mask tensor to all its layers."""
        if mask is None:
            return None
        if self._mask_lengths is not None and self._mask_lengths[0] is mask:
            return self._mask_lengths[1]
        if mask.dtype != torch.bool or mask.shape[-1] != seq_k or mask.numel() != batch * seq_k \
                or mask.dim() < 2 or mask.shape[0] != batch:
            raise _Unsupported(f"attention mask {mask.dtype} {tuple(mask.shape)} (fgattn takes a bool key mask "
                               f"[B, 1, 1, Sk] or [B, Sk])")
        valid = mask.reshape(batch, seq_k)
        counts = valid.sum(-1)
        is_prefix = torch.equal(valid, torch.arange(seq_k, device=mask.device) < counts[:, None])
        lengths = tuple(counts.tolist())
        if not is_prefix or min(lengths) == 0:
            raise _Unsupported("an attention mask whose valid keys are not a non-empty prefix of each sample")
        self._mask_lengths = (mask, None if min(lengths) == seq_k else lengths)
        return self._mask_lengths[1]

    def _attend(self, q, k, v, layer: int, text: tuple[int, int] | None, sample: int | None,
                head_range: tuple[int, int] | None) -> torch.Tensor:
        """fgattn on q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]`` (no padded keys) -> ``[B, H, Sq, D]``. One
        predictor per input shape, text range, (for uneven padding) sample and head range (``Predictor.
        head_range``: this rank's heads under context parallelism), shared by every layer."""
        b, h, seq_q, _ = q.shape
        seq_k = k.shape[2]
        keep = None
        if self.keep_text and text is not None and text[0] < min(text[1], seq_k):
            keep = (text[0], min(text[1], seq_k))
        slot = (b, h, seq_q, seq_k, keep, sample, head_range)
        if slot not in self._predictors:
            self._predictors[slot] = make_predictor(self.predictor, keep_keys=keep, block_m=self.block_m,
                                                    block_n=self.block_n, **self.knobs)
            self._predictors[slot].head_range = head_range
        predictor = self._predictors[slot].at(step=self.step, layer=layer, branch=self.branch)
        return attention(q, k, v, predictor=predictor)

    # ------------------------------------------------------------------ introspection
    def cached_masks(self) -> list[CachedMask]:
        """The ``CachedMask`` objects of ``cached_exact`` (one per input shape and text range)."""
        return [p for p in self._predictors.values() if isinstance(p, CachedMask)]


class FgattnProcessor:
    """Base of the per-model processors: the shared ``SparseSelfAttention``, the layer index, and the
    diffusers attention settings of the processor it replaces (used by the SDPA fallback)."""

    def __init__(self, original, sparse: SparseSelfAttention, layer: int):
        self.sparse = sparse
        self.layer = layer
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def attend(self, query, key, value, *, text_tokens: int, attention_mask,
               sdpa: Callable[[torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """``SparseSelfAttention`` of this layer on ``[B, s, H, D]`` tensors, under this processor's diffusers
        parallel config (see there)."""
        return self.sparse(query, key, value, layer=self.layer, text_tokens=text_tokens, attention_mask=attention_mask,
                           sdpa=sdpa, parallel_config=self._parallel_config)
