"""Peer timings at a study's timed shape, for the speedup column (GPU only).

- ``sdpa-cudnn``: dense SDPA through cuDNN (what the model runs without sparsity).
- ``flex-block128``: FlexAttention over a 128 x 128 block mask of the same density, from the same mask
  generator as the KeySet (``synthetic.local_block_mask``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..baselines import flex_block, flex_block_mask, sdpa
from ..synthetic import local_block_mask
from .objective import TimeFn
from .workload import MASK_SEED, Workload

PEERS = ("sdpa-cudnn", "flex-block128")


def _peer_fn(name: str, workload: Workload, density: float) -> Callable[..., torch.Tensor]:
    if name == "sdpa-cudnn":
        return lambda q, k, v: sdpa(q, k, v, "cudnn")
    s = workload.shape
    q = workload.inputs[0][0]
    mask128 = local_block_mask(s.batch, s.heads, math.ceil(s.seq_q / 128), math.ceil(s.seq_k / 128), density,
                               seed=MASK_SEED, device=q.device)
    block_mask = flex_block_mask(mask128, s.seq_q, s.seq_k)
    return lambda q, k, v: flex_block(q, k, v, block_mask)


def measure_peers(workload: Workload, density: float, time_fn: TimeFn) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms of each peer on ``workload.inputs`` (GPU tensors); returns (ms by peer, error by peer).

    A peer that cannot run here (no cuDNN attention for this GPU, a FlexAttention compile error...) is
    left out with its error instead of failing the tuning run."""
    times, errors = {}, {}
    for name in PEERS:
        try:
            times[name] = time_fn(_peer_fn(name, workload, density), workload.inputs)["ms"]
        except Exception as exc:  # noqa: BLE001 - peers are context; any failure only drops the column
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return times, errors
