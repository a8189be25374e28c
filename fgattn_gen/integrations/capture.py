"""Saving a few steps' q/k/v of a diffusers pipeline's self-attention layers, for ``predictors.calibrate``
(``fgattn-tune --model NAME --calibrate --samples DIR``) on the user's own data.

``capture(pipe, directory, layers=[0, 10, 20], heads=None, max_steps=2)`` swaps the processor of the chosen
video self-attention layers (as ``install`` does) for one that runs the original attention (the pipeline's
output is unchanged) and writes, at the first ``max_steps`` denoising steps (the step follows the
transformer's timestep, as ``install``'s ``steps="timestep"``; every CFG branch of a step is saved), batch
element ``batch_index``'s q, k, v of the chosen heads to ``directory/layer{L}_step{S}_branch{B}.pt``:
``{"q", "k", "v": [1, h, S, D] CPU tensors in the model dtype, "layer", "step", "branch": int, "heads":
[head indices], "total_heads": int}``. Keys and values are cut to the sample's valid prefix when the
transformer masks padded text keys. Memory: one layer's copy at a time (written at once); disk: per file
``3 * h * S * D`` elements. ``handle.remove()`` (or leaving a ``with`` block) restores the processors.

``load_samples(directory)`` reads them back as ``{layer: [(q, k, v), ...]}`` plus the captured head indices.
Importing this module imports neither diffusers nor Triton.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

_NAME = re.compile(r"^layer(\d+)_step(\d+)_branch(\d+)\.pt$")


def _check_indices(values, name: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or not values or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in values) or len(set(values)) != len(values):
        raise ValueError(f"{name}: expected None (all) or a non-empty list of distinct indices >= 0, got {values!r}")
    return tuple(values)


def capture(target, directory: str | Path, *, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            max_steps: int = 2, batch_index: int = 0):
    """Save q/k/v of chosen layers and heads of a HunyuanVideo or Wan transformer (module docstring).

    Args:
        target: a supported transformer or a pipeline holding one (as ``install``).
        directory: where the ``.pt`` files go (created; existing capture files there are an error).
        layers: self-attention layer indices (None: all); heads: head indices (None: all).
        max_steps: denoising steps to save (>= 1); later calls run untouched.
        batch_index: the batch element saved (0: with CFG batched, the first branch's sample).
    Returns:
        An ``FgattnHandle``; ``handle.remove()`` restores the original processors.
    """
    from . import hunyuan_video, wan
    from .installer import FgattnHandle, _timestep_hook, _transformers

    layers, heads = _check_indices(layers, "layers"), _check_indices(heads, "heads")
    for name, value, low in (("max_steps", max_steps, 1), ("batch_index", batch_index, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(_NAME.match(p.name) for p in directory.iterdir()):
        raise FileExistsError(f"directory: {directory} already holds capture files; use an empty directory")
    handle = FgattnHandle()
    for transformer in _transformers(target):
        model = hunyuan_video if isinstance(transformer, hunyuan_video.MODEL) else wan
        modules = model.self_attention_modules(transformer)
        bad = [layer for layer in layers or () if layer >= len(modules)]
        if bad:
            raise ValueError(f"layers: the transformer has {len(modules)} self-attention layers, got index {bad[0]}")
        recorder = _recorder(directory, set(layers) if layers is not None else None, heads, max_steps, batch_index)
        handle.attentions.append(recorder)
        for layer, module in enumerate(modules):
            if layers is None or layer in layers:
                handle._swapped.append((module, module.processor))
                module.set_processor(model.Processor(module.processor, recorder, layer))
        handle._hooks.append(transformer.register_forward_pre_hook(_timestep_hook(recorder, transformer.forward),
                                                                   with_kwargs=True))
    return handle


def _recorder(directory: Path, layers, heads, max_steps: int, batch_index: int):
    """A ``SparseSelfAttention`` that saves its inputs and returns the original attention."""
    from .context_parallel import ulysses_group
    from .sparse_attention import SparseSelfAttention

    class Recorder(SparseSelfAttention):
        def __call__(self, query, key, value, *, layer, text_tokens, attention_mask, sdpa, parallel_config=None):
            if ulysses_group(parallel_config, query.shape[2])[1] > 1:
                raise ValueError("capture: records one device's q/k/v; under context parallelism each rank holds "
                                 "a shard of the sequence: capture on a pipeline without enable_parallelism")
            if self.step < max_steps and (layers is None or layer in layers) and batch_index < query.shape[0]:
                self._save(query, key, value, layer, attention_mask)
            return sdpa(attention_mask)

        def _save(self, query, key, value, layer, attention_mask):
            """[B, S, H, D] -> the chosen sample and heads as [1, h, S, D] CPU copies, written at once."""
            total = query.shape[2]
            chosen = list(range(total)) if heads is None else list(heads)
            if max(chosen) >= total:
                raise ValueError(f"heads: layer {layer} has {total} heads, got index {max(chosen)}")
            n_keys = key.shape[1]
            if attention_mask is not None:  # valid-prefix key mask: keep the valid keys of this sample
                n_keys = int(attention_mask.reshape(query.shape[0], -1)[batch_index].sum())
            index = torch.tensor(chosen, device=query.device)
            q, k, v = (t[batch_index:batch_index + 1, :n].index_select(2, index).transpose(1, 2).contiguous().cpu()
                       for t, n in ((query, query.shape[1]), (key, n_keys), (value, n_keys)))
            torch.save({"q": q, "k": k, "v": v, "layer": layer, "step": self.step, "branch": self.branch,
                        "heads": chosen, "total_heads": total},
                       directory / f"layer{layer:03d}_step{self.step:03d}_branch{self.branch}.pt")

    return Recorder("dense")


def load_samples(directory: str | Path, *, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> tuple[dict, tuple[int, ...], int]:
    """Read a ``capture`` directory.

    Args:
        directory: the folder ``capture`` wrote. dtype: convert q/k/v to it (None: as saved). device: where
            the tensors go.
    Returns:
        ``({layer: [(q, k, v), ...] by step and branch}, captured head indices, the layers' head count)``.
    Raises:
        ValueError naming the directory or file: no capture files, a file that is not one, files that captured
        different heads.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"samples: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
    if not files:
        raise ValueError(f"samples: {directory} holds no capture files (layer<L>_step<S>_branch<B>.pt)")
    samples: dict[int, list] = {}
    heads = None
    for path in files:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            q, k, v = data["q"], data["k"], data["v"]
            layer, found = int(data["layer"]), (tuple(data["heads"]), int(data["total_heads"]))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported by name
            raise ValueError(f"samples: {path} is not a capture file ({type(exc).__name__}: {exc})") from None
        if heads is not None and found != heads:
            raise ValueError(f"samples: {path} captured heads {found[0]} of {found[1]}, the others {heads[0]} of "
                             f"{heads[1]}")
        heads = found
        samples.setdefault(layer, []).append(tuple(t.to(device=device, dtype=dtype or t.dtype) for t in (q, k, v)))
    return samples, heads[0], heads[1]
