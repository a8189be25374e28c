"""Mean pooling of consecutive tokens and the self-similarity of each pooled group.

For group g (tokens ``[g * size, (g + 1) * size)``, the last one possibly shorter): the mean x̄_g and the mean
cosine similarity of its tokens to x̄_g, computed in one read of x as ``(sum_i x_i / |x_i|) . x̄_g / |x̄_g| / n``.
GPU / interpreter: a Triton program per (group, head); CPU without the interpreter: torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_EPS = 1e-12


@triton.jit
def _group_stats_kernel(X, MEAN, SIM, stride_xn, stride_xs, seq, size, eps, HEAD_DIM: tl.constexpr,
                        CHUNK: tl.constexpr, WITH_SIM: tl.constexpr):
    """X [n, S, D] (last dim contiguous) -> MEAN fp32 [n, G, D], SIM fp32 [n, G]. Program (group, n)."""
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    first = g * size
    count = tl.minimum(size, seq - first)
    offs_d = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], tl.float32)
    unit_total = tl.zeros([HEAD_DIM], tl.float32)
    for r0 in range(0, count, CHUNK):
        rows = first + r0 + tl.arange(0, CHUNK)
        x = tl.load(X + n * stride_xn + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :],
                    mask=(rows < first + count)[:, None], other=0.0).to(tl.float32)
        total += tl.sum(x, 0)
        if WITH_SIM:
            norm = tl.sqrt(tl.sum(x * x, 1))
            unit_total += tl.sum(x / tl.maximum(norm, eps)[:, None], 0)
    mean = total / count
    out = (n * tl.num_programs(0) + g)
    tl.store(MEAN + out * HEAD_DIM + offs_d, mean)
    if WITH_SIM:
        mean_norm = tl.maximum(tl.sqrt(tl.sum(mean * mean, 0)), eps)
        tl.store(SIM + out, tl.sum(unit_total * mean, 0) / (mean_norm * count))


def _padded_groups(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[n, G, size, D]`` (the ragged last group zero-padded) and the true group sizes fp32 ``[G]``."""
    n, seq, d = x.shape
    groups = -(-seq // size)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, groups * size - seq)).view(n, groups, size, d)
    counts = torch.full((groups,), float(size), device=x.device)
    counts[-1] = seq - (groups - 1) * size
    return padded, counts


def _group_stats_torch(x: torch.Tensor, size: int, with_sim: bool):
    padded, counts = _padded_groups(x, size)
    mean = padded.sum(2) / counts[:, None]
    if not with_sim:
        return mean, None
    unit_total = (padded / padded.norm(dim=-1, keepdim=True).clamp_min(_EPS)).sum(2)
    similarity = (unit_total * mean).sum(-1) / (mean.norm(dim=-1).clamp_min(_EPS) * counts)
    return mean, similarity


def _group_stats_triton(x: torch.Tensor, size: int, with_sim: bool):
    n, seq, d = x.shape
    groups = triton.cdiv(seq, size)
    mean = torch.empty(n, groups, d, dtype=torch.float32, device=x.device)
    similarity = torch.empty(n, groups, dtype=torch.float32, device=x.device) if with_sim else mean
    chunk = min(128, max(16, triton.next_power_of_2(size)))
    _group_stats_kernel[(groups, n)](x, mean, similarity, x.stride(0), x.stride(1), seq, size, _EPS,
                                     HEAD_DIM=d, CHUNK=chunk, WITH_SIM=with_sim, num_warps=4)
    return mean, similarity if with_sim else None


def group_mean(x: torch.Tensor, size: int, *, backend: str) -> torch.Tensor:
    """Mean of each run of ``size`` consecutive tokens.

    Args:
        x: ``[n, S, D]``, any float dtype, last dim contiguous (D a power of two for the Triton backend).
        size: tokens per group; the last group may be shorter.
        backend: ``"triton"`` (CUDA, or the interpreter) or ``"torch"``.
    Returns:
        fp32 ``[n, ceil(S / size), D]``.
    """
    impl = _group_stats_triton if backend == "triton" else _group_stats_torch
    return impl(x, size, False)[0]


def group_mean_and_similarity(x: torch.Tensor, size: int, *, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Group means (as ``group_mean``) and each group's mean cosine similarity of its tokens to the mean.

    Returns:
        mean fp32 ``[n, G, D]`` and similarity fp32 ``[n, G]`` in [-1, 1] (zero vectors count as 0).
    """
    impl = _group_stats_triton if backend == "triton" else _group_stats_torch
    return impl(x, size, True)
