"""fgattn inside model libraries.

diffusers (optional extra ``fgattn[diffusers]``, diffusers 0.42): ``install(pipe_or_transformer,
predictor=..., **knobs)`` routes the video self-attention of HunyuanVideo and Wan transformers through
``fgattn_gen.attention`` and returns a handle whose ``remove()`` restores the original processors::

    from fgattn_gen.integrations import install
    handle = install(pipe, predictor="pooled_top_p", top_p=0.9)
    video = pipe(prompt).frames
    handle.remove()

Modules: ``installer`` (install, the handle, step tracking from the timestep), ``sparse_attention`` (the
predictor of each layer through ``predictors.make_predictor``, text and padded keys, the SDPA fallback, the
processors' base), ``hunyuan_video`` and ``wan`` (the per-model processors; HunyuanVideo's context-parallel
plan), ``context_parallel`` (diffusers' ``ParallelConfig`` -> the Ulysses group). The names are imported on
first use (PEP 562): importing this package imports neither diffusers nor Triton.
"""

import importlib

_EXPORTS = {
    "install": ".installer",
    "FgattnHandle": ".installer",
    "SparseSelfAttention": ".sparse_attention",
    "PREDICTORS": ".sparse_attention",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'fgattn_gen.integrations' has no attribute {name!r}")
