"""fgattn in diffusers (0.42): the video self-attention of HunyuanVideo and Wan transformers through
``fgattn_gen.attention``, with a key predictor.

``install(pipe_or_transformer, predictor=..., **knobs)`` swaps the processor of every video self-attention
layer for an fgattn one (``hunyuan_video.py``, ``wan.py``: the diffusers processor's math with its attention
call replaced) and returns an ``FgattnHandle``; ``handle.remove()`` puts the original processor objects back.

Predictors (the keys each block of ``block_m`` queries attends to), with their knobs:

- ``"dense"``: every key (``KeySet.full``); checks the integration against SDPA. No knobs.
- ``"pooled_top_p"``: ``predictors.pooled_top_p`` at every call. Knobs: ``top_p`` or ``threshold``,
  ``sim_threshold``, ``pool``, ``local_window``, ``search_iters``, ``query_variance``, ``backend``.
- ``"cached_exact"``: ``predictors.CachedMask``: at a refresh step a layer runs a dense pass that also gives
  its exact mask; the steps in between reuse the layer's mask. Knobs: ``refresh_steps`` (default
  ``HUNYUAN_REFRESH_STEPS``), ``threshold``, ``top_p``, ``local_window``, ``score_precision``,
  ``share_branches``, ``offload`` (one cached KeySet per layer: 0.33 GiB each at HunyuanVideo 720p, 20 GiB for
  its 60 layers, so ``offload=True`` keeps them in pinned host memory).
- ``"fixed_density"``: a synthetic local mask of ``density`` (``synthetic.local_block_mask``, one seed per
  head from ``seed``), built once per shape and shared by every layer: set, not predicted (benchmarks).

Text keys: with ``keep_text`` every query block keeps the text tokens of joint attention (HunyuanVideo: the
tokens after the video). Padded keys: HunyuanVideo pads the prompt to a fixed length and masks the padding
out of the keys (a bool key mask, valid keys first). Each sample's k/v are cut to its valid prefix (a view),
so no padded key is ever attended, as with SDPA and the mask; samples of different lengths run one at a time.

Steps (``cached_exact``): by default (``steps="timestep"``) a forward pre-hook reads the timestep of each
transformer call (one host sync per call): a smaller one starts the next step, an equal one is the next CFG
branch of the same step, a larger one starts a new generation and drops the cached masks. Samplers that
repeat timesteps (Heun) need ``steps="manual"`` and ``handle.set_step(step, branch)`` before each call.

Fallback: inputs the kernels do not take (fp32, e.g. a CPU model; head dims other than 64 and 128; masks
other than a valid-prefix key mask; context parallelism) run the original processor's attention call
(SDPA), with one warning per ``install``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch

from ..attention_api import attention
from ..keyset import KeySet
from ..predictors import CachedMask, pooled_top_p
from ..synthetic import local_block_mask
from ..variant import DTYPE_NAMES, HEAD_DIMS

PREDICTORS = ("dense", "pooled_top_p", "cached_exact", "fixed_density")
HUNYUAN_REFRESH_STEPS = (0, 1, 10, 40)  # Chipmunk's full steps for HunyuanVideo's 50-step schedule
STEP_SOURCES = ("timestep", "manual")
_MANAGED = {"q", "k", "v", "block_m", "block_n", "keep_keys", "scale"}  # set by the integration, not knobs


def _knob_names(predictor: str) -> frozenset[str]:
    if predictor == "pooled_top_p":
        return frozenset(inspect.signature(pooled_top_p).parameters) - _MANAGED
    if predictor == "cached_exact":
        return frozenset(inspect.signature(CachedMask).parameters) - _MANAGED
    if predictor == "fixed_density":
        return frozenset({"density", "seed"})
    return frozenset()


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
            raise ValueError(f"predictor: expected one of {PREDICTORS}, got {predictor!r}")
        unknown = set(knobs) - _knob_names(predictor)
        if unknown:
            raise TypeError(f"{predictor}: unknown knob(s) {sorted(unknown)}; it takes "
                            f"{sorted(_knob_names(predictor)) or 'none'}")
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if predictor == "fixed_density":
            density = knobs.get("density")
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
                raise ValueError(f"density: fixed_density needs a key density in (0, 1], got {density!r}")
        if predictor == "cached_exact":
            knobs.setdefault("refresh_steps", HUNYUAN_REFRESH_STEPS)
            CachedMask(**knobs)  # validates refresh_steps now rather than at the first call
        self.predictor = predictor
        self.block_m, self.block_n = block_m, block_n
        self.keep_text = bool(keep_text)
        self.knobs = knobs
        self.step = 0
        self.branch = 0
        self._last_timestep: float | None = None
        self._caches: dict[tuple, CachedMask] = {}
        self._set_keys: dict[tuple, KeySet] = {}
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
        self._caches.clear()

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
                 text: tuple[int, int] | None, attention_mask: torch.Tensor | None,
                 sdpa: Callable[[], torch.Tensor], context_parallel: bool = False) -> torch.Tensor:
        """Self-attention of one layer, in diffusers' layout.

        Args:
            query, key, value: ``[B, S, H, D]`` (last dim contiguous), as diffusers' processors hold them.
            layer: index of the layer (the key of its cached masks).
            text: token range ``[start, end)`` of the text keys, or None.
            attention_mask: None or the processor's key mask (bool ``[B, 1, 1, S]`` or ``[B, S]``, True = valid).
            sdpa: the original processor's attention call on the same tensors (the fallback).
            context_parallel: the processor runs under diffusers' context parallelism (fgattn does not).
        Returns:
            ``[B, S, H, D]`` in q's dtype (a transposed view of fgattn's ``[B, H, S, D]`` output).
        """
        try:
            if context_parallel:
                raise _Unsupported("context parallelism (fgattn attends on one device)")
            self._check_supported(query, key)
            lengths = self._key_lengths(attention_mask, query.shape[0], key.shape[1])
        except _Unsupported as reason:
            if not self._warned:
                warnings.warn(f"fgattn: {reason}; these layers run the original SDPA attention instead "
                              f"(warned once per install)", stacklevel=3)
                self._warned = True
            return sdpa()
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D] views, no copies
        seq_k = k.shape[2]
        if lengths is None or len(set(lengths)) == 1:
            valid = seq_k if lengths is None else lengths[0]
            out = self._attend(q, k[:, :, :valid], v[:, :, :valid], layer, text, sample=None)
        else:
            out = torch.cat([self._attend(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], layer, text, sample=b)
                             for b, n in enumerate(lengths)])
        return out.transpose(1, 2)

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

    def _attend(self, q, k, v, layer: int, text: tuple[int, int] | None, sample: int | None) -> torch.Tensor:
        """fgattn on q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]`` (no padded keys) -> ``[B, H, Sq, D]``."""
        b, h, seq_q, _ = q.shape
        seq_k = k.shape[2]
        keep = None
        if self.keep_text and text is not None and text[0] < min(text[1], seq_k):
            keep = (text[0], min(text[1], seq_k))
        layout = dict(block_m=self.block_m, block_n=self.block_n)
        if self.predictor == "cached_exact":
            slot = (b, h, seq_q, seq_k, keep, sample)
            if slot not in self._caches:
                self._caches[slot] = CachedMask(keep_keys=keep, **layout, **self.knobs)
            return self._caches[slot](q, k, v, step=self.step, layer=layer, branch=self.branch)
        if self.predictor == "pooled_top_p":
            keys = pooled_top_p(q, k, keep_keys=keep, **layout, **self.knobs)
        else:
            keys = self._fixed_keys(b, h, seq_q, seq_k, keep, q.device)
        return attention(q, k, v, keys)

    def _fixed_keys(self, b: int, h: int, seq_q: int, seq_k: int, keep: tuple[int, int] | None,
                    device: torch.device) -> KeySet:
        """The KeySet of ``dense`` / ``fixed_density``, built once per shape (one head at a time)."""
        slot = (b, h, seq_q, seq_k, keep, device)
        if slot in self._set_keys:
            return self._set_keys[slot]
        if self.predictor == "dense":
            keys = KeySet.full(b, h, seq_q, seq_k, block_m=self.block_m, block_n=self.block_n, device=device)
        else:
            n_qblocks, n_kblocks = -(-seq_q // self.block_m), -(-seq_k // self.block_n)
            bits = []
            for head in range(h):
                mask = local_block_mask(b, 1, n_qblocks, n_kblocks, self.knobs["density"],
                                        seed=self.knobs.get("seed", 0) + head, device=device)
                if keep is not None:
                    mask[..., keep[0] // self.block_n:-(-keep[1] // self.block_n)] = True
                bits.append(KeySet.from_mask(mask, block_m=self.block_m, block_n=self.block_n).bits)
            keys = KeySet(torch.cat(bits, 1), n_kblocks, self.block_m, self.block_n)
        self._set_keys[slot] = keys
        return keys

    # ------------------------------------------------------------------ introspection
    def cached_masks(self) -> list[CachedMask]:
        """The ``CachedMask`` objects of ``cached_exact`` (one per input shape and text range)."""
        return list(self._caches.values())


class FgattnProcessor:
    """Base of the per-model processors: the shared ``SparseSelfAttention``, the layer index, and the
    diffusers attention settings of the processor it replaces (used by the SDPA fallback)."""

    def __init__(self, original, sparse: SparseSelfAttention, layer: int):
        self.sparse = sparse
        self.layer = layer
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def attend(self, query, key, value, *, text, attention_mask, sdpa: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``SparseSelfAttention`` of this layer on ``[B, S, H, D]`` tensors (see there)."""
        return self.sparse(query, key, value, layer=self.layer, text=text, attention_mask=attention_mask,
                           sdpa=sdpa, context_parallel=self._parallel_config is not None)


class FgattnHandle:
    """What ``install`` changed in one or more transformers; ``remove()`` undoes it (also on leaving a
    ``with`` block). ``set_step`` and ``reset`` drive the step of ``cached_exact`` (every transformer)."""

    def __init__(self):
        self.attentions: list[SparseSelfAttention] = []
        self._swapped: list[tuple[torch.nn.Module, object]] = []
        self._hooks: list = []

    def set_step(self, step: int, branch: int = 0) -> None:
        for sparse in self.attentions:
            sparse.set_step(step, branch)

    def reset(self) -> None:
        for sparse in self.attentions:
            sparse.reset()

    @property
    def layers(self) -> int:
        """Number of attention layers routed through fgattn."""
        return len(self._swapped)

    def remove(self) -> None:
        """Put the original processor objects back and remove the step hooks (idempotent)."""
        for module, original in self._swapped:
            module.set_processor(original)
        for hook in self._hooks:
            hook.remove()
        self._swapped.clear()
        self._hooks.clear()

    def __enter__(self) -> "FgattnHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _timestep_hook(sparse: SparseSelfAttention, forward: Callable):
    """Forward pre-hook feeding each call's ``timestep`` argument to ``sparse.observe_timestep``."""
    signature = inspect.signature(forward)

    def hook(module, args, kwargs):
        timestep = signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        if timestep is None:
            raise ValueError("fgattn (steps='timestep'): this transformer call has no timestep; install with "
                             "steps='manual' and call handle.set_step(step, branch)")
        sparse.observe_timestep(timestep)

    return hook


def _transformers(target) -> list[torch.nn.Module]:
    """The supported transformers of a pipeline (its components) or the transformer itself."""
    from . import hunyuan_video, wan

    supported = (hunyuan_video.MODEL, wan.MODEL)
    if isinstance(target, supported):
        return [target]
    components = getattr(target, "components", None)
    found = [m for m in components.values() if isinstance(m, supported)] if isinstance(components, dict) else []
    if not found:
        names = ", ".join(cls.__name__ for cls in supported)
        raise TypeError(f"install: expected a {names} or a diffusers pipeline holding one, got "
                        f"{type(target).__name__}")
    return found


def install(target, predictor: str = "pooled_top_p", *, block_m: int = 128, block_n: int = 1,
            keep_text: bool = True, steps: str = "timestep", **knobs) -> FgattnHandle:
    """Route the video self-attention of a diffusers HunyuanVideo or Wan transformer through fgattn.

    Args:
        target: a ``HunyuanVideoTransformer3DModel`` or ``WanTransformer3DModel``, or a pipeline: every such
            transformer among its components gets its own predictor state.
        predictor: one of ``PREDICTORS``; knobs: its knobs (module docstring).
        block_m, block_n: KeySet layout (queries per query block, keys per key block).
        keep_text: every query block keeps the text keys (HunyuanVideo's joint attention).
        steps: ``"timestep"`` (the step follows the transformer's timestep) or ``"manual"``
            (``handle.set_step``); only ``cached_exact`` uses the step.
    Returns:
        ``FgattnHandle``; ``handle.remove()`` restores the original processors.
    """
    from . import hunyuan_video, wan

    if steps not in STEP_SOURCES:
        raise ValueError(f"steps: expected one of {STEP_SOURCES}, got {steps!r}")
    handle = FgattnHandle()
    for transformer in _transformers(target):
        model = hunyuan_video if isinstance(transformer, hunyuan_video.MODEL) else wan
        if any(isinstance(getattr(m, "processor", None), FgattnProcessor) for m in transformer.modules()):
            raise RuntimeError("install: this transformer already runs fgattn processors; remove() that handle first")
        modules = model.self_attention_modules(transformer)
        sparse = SparseSelfAttention(predictor, block_m=block_m, block_n=block_n, keep_text=keep_text, **dict(knobs))
        handle.attentions.append(sparse)
        for layer, module in enumerate(modules):
            handle._swapped.append((module, module.processor))
            module.set_processor(model.Processor(module.processor, sparse, layer))
        if predictor == "cached_exact" and steps == "timestep":
            hook = _timestep_hook(sparse, transformer.forward)
            handle._hooks.append(transformer.register_forward_pre_hook(hook, with_kwargs=True))
    return handle
