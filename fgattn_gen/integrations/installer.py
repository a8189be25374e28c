"""fgattn in diffusers (0.42): the video self-attention of HunyuanVideo and Wan transformers through
``fgattn_gen.attention``, with a key predictor.

``install(pipe_or_transformer, predictor=..., **knobs)`` swaps the processor of every video self-attention
layer for an fgattn one (``hunyuan_video.py``, ``wan.py``: the diffusers processor's math with its attention
call replaced) and returns an ``FgattnHandle``; ``handle.remove()`` puts the original processor objects back.

Predictors (the keys each block of ``block_m`` queries attends to), with their knobs:

- ``"dense"``: every key (``KeySet.full``); checks the integration against SDPA. No knobs.
- ``"default"``: ``predictors.predict`` at every call (clustered query blocks, pooled threshold rule,
  captured-mass check). Knobs: ``threshold_scale``, ``tokens_per_cluster``, ``cluster_steps``, ``min_mass``,
  ``samples``. Without ``threshold_scale`` each layer takes its calibrated values when the registry serves
  some for this shape (``fgattn-tune --calibrate``; ``cached_exact``'s ``threshold`` likewise).
- ``"pooled_top_p"``: ``predictors.pooled_top_p`` at every call. Knobs: ``top_p`` or ``threshold``,
  ``sim_threshold``, ``pool``, ``local_window``, ``search_iters``, ``query_variance``, ``impl``.
- ``"cached_exact"``: ``predictors.CachedMask``: at a refresh step a layer runs a dense pass that also gives
  its exact mask; the steps in between reuse the layer's mask. Knobs: ``refresh_steps`` (default
  ``HUNYUAN_REFRESH_STEPS``), ``threshold``, ``top_p``, ``local_window``, ``score_precision``,
  ``share_branches``, ``offload`` (one cached KeySet per layer: 0.33 GiB each at HunyuanVideo 720p, 20 GiB for
  its 60 layers, so ``offload=True`` keeps them in pinned host memory).
- ``"fixed_density"``: a synthetic local mask of ``density`` (``synthetic.local_block_mask``, one seed per
  head from ``seed``), built once per shape and shared by every layer: set, not predicted (benchmarks). Under
  context parallelism each rank's H/N heads get the masks of heads 0 .. H/N-1 (same density, other masks).

Text keys: with ``keep_text`` every query block keeps the text tokens of joint attention (HunyuanVideo: the
tokens after the video). Padded keys: HunyuanVideo pads the prompt to a fixed length and masks the padding
out of the keys (a bool key mask, valid keys first). Each sample's k/v are cut to its valid prefix (a view),
so no padded key is ever attended, as with SDPA and the mask; samples of different lengths run one at a time.

Steps (``cached_exact``): by default (``steps="timestep"``) a forward pre-hook reads the timestep of each
transformer call (one host sync per call): a smaller one starts the next step, an equal one is the next CFG
branch of the same step, a larger one starts a new generation and drops the cached masks. Samplers that
repeat timesteps (Heun) need ``steps="manual"`` and ``handle.set_step(step, branch)`` before each call.

Fallback: inputs the kernels do not take (fp32, e.g. a CPU model; head dims other than 64 and 128; masks
other than a valid-prefix key mask) run the original processor's attention call (SDPA), with one warning per
``install``.

Context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``, before
or after ``install``): each rank's processors run the Ulysses all-to-all over diffusers' group and fgattn on
every token of H/N heads (``context_parallel``); HunyuanVideo needs ``cp_plan=hunyuan_video.context_parallel_plan
(transformer)``. ``ring_degree > 1`` and ``ulysses_anything`` raise a ValueError.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from . import hunyuan_video, wan
from .context_parallel import check_config
from .sparse_attention import PREDICTORS, FgattnProcessor, SparseSelfAttention

STEP_SOURCES = ("timestep", "manual")


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
            if hasattr(original, "_parallel_config"):  # set on ours by an enable_parallelism after install
                original._parallel_config = getattr(module.processor, "_parallel_config", original._parallel_config)
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
    if steps not in STEP_SOURCES:
        raise ValueError(f"steps: expected one of {STEP_SOURCES}, got {steps!r}")
    handle = FgattnHandle()
    for transformer in _transformers(target):
        model = hunyuan_video if isinstance(transformer, hunyuan_video.MODEL) else wan
        check_config(getattr(transformer, "_parallel_config", None))
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
