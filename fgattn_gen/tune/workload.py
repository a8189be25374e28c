"""The inputs of one (shape, density) study, built once and shared by all its trials.

Which shape is timed:

- GPU: the model's real sequence lengths with fewer heads. A full layer is too slow to time ~100 times
  per shape, and heads are independent programs of the same kernel, so ``heads_for_tuning`` keeps just
  enough heads that one launch still has ~4 query blocks per SM: ``min(heads, ceil(4 * n_SMs / n_qblocks))``.
  Times are recorded at that head count (``measured.heads`` in the tuned file); a full layer costs about
  ``heads / measured.heads`` times as much, and the ranking of variants is what tuning is for.
- Interpreter: a scaled-down shape (``INTERPRET_SEQ`` tokens, ``INTERPRET_HEADS`` heads, the model's head dim
  and layout), so a CPU run exercises the whole pipeline in seconds. Its times rank nothing on a GPU.

Inputs are ``randn`` (never zeros); on the GPU there are ``timing.rotation_count`` sets so that each set has
left L2 before it is timed again. The KeySet comes from ``synthetic.local_block_mask`` at the density.
The correctness reference is the fp32 ``reference_attention`` on a slice: the first ``CHECK_HEADS`` heads and
``CHECK_QUERIES`` queries of input set 0, against all keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..keyset import KeySet
from ..models import AttentionShape, ModelSpec
from ..reference import reference_attention
from ..synthetic import local_block_mask
from ..timing import rotation_count
from ..variant import DTYPES
from .device import Device

INTERPRET_SEQ = 300
INTERPRET_HEADS = 2
CHECK_HEADS = 2
CHECK_QUERIES = 512
INPUT_SEED = 0
MASK_SEED = 1


@dataclass(frozen=True)
class MeasuredShape:
    """The q/k/v shape ``[batch, heads, seq, head_dim]`` that is actually timed."""

    batch: int
    heads: int
    seq_q: int
    seq_k: int


@dataclass(frozen=True)
class Workload:
    """Everything a trial runs on.

    Attributes:
        shape: the timed shape.
        inputs: ``(q, k, v)`` sets, each ``[B, H, S, D]`` in the model dtype on the device.
        keys: KeySet ``[B, H, ceil(Sq/block_m), ceil(Sk/block_n)]`` at the study's density.
        check_heads, check_queries: the output slice ``[:, :check_heads, :check_queries]`` that is checked.
        reference: fp32 ``[B, check_heads, check_queries, D]``, the reference output of that slice for set 0.
    """

    shape: MeasuredShape
    inputs: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    keys: KeySet
    check_heads: int
    check_queries: int
    reference: torch.Tensor


def heads_for_tuning(heads: int, n_qblocks: int, n_sms: int) -> int:
    """Fewest heads (at most ``heads``) that give one launch about 4 query blocks per SM."""
    return min(heads, max(1, math.ceil(4 * n_sms / n_qblocks)))


def measured_shape(model: ModelSpec, shape: AttentionShape, device: Device) -> MeasuredShape:
    """The shape timed for ``shape`` of ``model`` on ``device`` (see the module docstring)."""
    if device.interpret:
        return MeasuredShape(1, min(model.heads, INTERPRET_HEADS), INTERPRET_SEQ, INTERPRET_SEQ)
    heads = heads_for_tuning(model.heads, math.ceil(shape.seq / model.block_m), device.n_sms)
    return MeasuredShape(model.batch, heads, shape.seq, shape.seq)


def build_workload(model: ModelSpec, measured: MeasuredShape, density: float, device: Device) -> Workload:
    """Inputs, KeySet and sliced reference for timing ``measured`` at ``density`` on ``device``."""
    b, h, sq, sk = measured.batch, measured.heads, measured.seq_q, measured.seq_k
    dtype = DTYPES[model.dtype]
    bytes_per_set = (sq + 2 * sk) * b * h * model.head_dim * dtype.itemsize
    n_sets = rotation_count(bytes_per_set, device.l2_bytes) if device.l2_bytes else 1
    gen = torch.Generator(device=device.torch_device).manual_seed(INPUT_SEED)
    inputs = tuple(
        tuple(torch.randn(b, h, s, model.head_dim, generator=gen, device=device.torch_device, dtype=dtype)
              for s in (sq, sk, sk))
        for _ in range(n_sets)
    )
    n_qblocks, n_kblocks = math.ceil(sq / model.block_m), math.ceil(sk / model.block_n)
    mask = local_block_mask(b, h, n_qblocks, n_kblocks, density, seed=MASK_SEED, device=device.torch_device)
    keys = KeySet.from_mask(mask, block_m=model.block_m, block_n=model.block_n)
    del mask
    check_heads, check_queries = min(h, CHECK_HEADS), min(sq, CHECK_QUERIES)
    check_keys = KeySet(keys.bits[:, :check_heads, : math.ceil(check_queries / model.block_m)].contiguous(),
                        keys.n_kblocks, keys.block_m, keys.block_n)
    q, k, v = inputs[0]
    reference = reference_attention(q[:, :check_heads, :check_queries], k[:, :check_heads], v[:, :check_heads],
                                    check_keys)
    return Workload(measured, inputs, keys, check_heads, check_queries, reference)
