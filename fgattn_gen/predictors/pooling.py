"""Mean pooling of consecutive tokens, the self-similarity and the per-dim variance of each pooled group,
and the scores of pooled queries against keys.

For group g (tokens ``[g * size, (g + 1) * size)``, the last one possibly shorter): the mean x̄_g, the mean
cosine similarity of its tokens to x̄_g, computed in one read of x as ``(sum_i x_i / |x_i|) . x̄_g / |x̄_g| / n``,
and optionally the per-dim (population) variance ``sum_i x_i^2 / n - x̄_g^2`` in the same read.
GPU / interpreter: a Triton program per (group, head); CPU without the interpreter: torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_EPS = 1e-12


@triton.jit
def _group_stats_kernel(X, MEAN, SIM, VAR, stride_xn, stride_xs, seq, size, eps, HEAD_DIM: tl.constexpr,
                        CHUNK: tl.constexpr, WITH_SIM: tl.constexpr, WITH_VAR: tl.constexpr):
    """X [n, S, D] (last dim contiguous) -> MEAN fp32 [n, G, D], SIM fp32 [n, G], VAR fp32 [n, G, D].
    Program (group, n)."""
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    first = g * size
    count = tl.minimum(size, seq - first)
    offs_d = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], tl.float32)
    unit_total = tl.zeros([HEAD_DIM], tl.float32)
    square_total = tl.zeros([HEAD_DIM], tl.float32)
    for r0 in range(0, count, CHUNK):
        rows = first + r0 + tl.arange(0, CHUNK)
        x = tl.load(X + n * stride_xn + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :],
                    mask=(rows < first + count)[:, None], other=0.0).to(tl.float32)
        total += tl.sum(x, 0)
        if WITH_SIM:
            norm = tl.sqrt(tl.sum(x * x, 1))
            unit_total += tl.sum(x / tl.maximum(norm, eps)[:, None], 0)
        if WITH_VAR:
            square_total += tl.sum(x * x, 0)
    mean = total / count
    out = (n * tl.num_programs(0) + g)
    tl.store(MEAN + out * HEAD_DIM + offs_d, mean)
    if WITH_VAR:
        tl.store(VAR + out * HEAD_DIM + offs_d, tl.maximum(square_total / count - mean * mean, 0.0))
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


def _group_stats_torch(x: torch.Tensor, size: int, with_sim: bool, with_var: bool):
    padded, counts = _padded_groups(x, size)
    mean = padded.sum(2) / counts[:, None]
    similarity = variance = None
    if with_sim:
        unit_total = (padded / padded.norm(dim=-1, keepdim=True).clamp_min(_EPS)).sum(2)
        similarity = (unit_total * mean).sum(-1) / (mean.norm(dim=-1).clamp_min(_EPS) * counts)
    if with_var:
        variance = (padded.square().sum(2) / counts[:, None] - mean.square()).clamp_min(0.0)
    return mean, similarity, variance


def _group_stats_triton(x: torch.Tensor, size: int, with_sim: bool, with_var: bool):
    n, seq, d = x.shape
    groups = triton.cdiv(seq, size)
    mean = torch.empty(n, groups, d, dtype=torch.float32, device=x.device)
    similarity = torch.empty(n, groups, dtype=torch.float32, device=x.device) if with_sim else mean
    variance = torch.empty_like(mean) if with_var else mean
    chunk = min(128, max(16, triton.next_power_of_2(size)))
    _group_stats_kernel[(groups, n)](x, mean, similarity, variance, x.stride(0), x.stride(1), seq, size, _EPS,
                                     HEAD_DIM=d, CHUNK=chunk, WITH_SIM=with_sim, WITH_VAR=with_var, num_warps=4)
    return mean, similarity if with_sim else None, variance if with_var else None


def group_mean(x: torch.Tensor, size: int, *, impl: str) -> torch.Tensor:
    """Mean of each run of ``size`` consecutive tokens.

    Args:
        x: ``[n, S, D]``, any float dtype, last dim contiguous (D a power of two for the Triton impl).
        size: tokens per group; the last group may be shorter.
        impl: ``"kernels"`` (fgattn's Triton/CUDA kernels: CUDA tensors, or the interpreter) or ``"torch"``.
    Returns:
        fp32 ``[n, ceil(S / size), D]``.
    """
    stats_fn = _group_stats_triton if impl == "kernels" else _group_stats_torch
    return stats_fn(x, size, False, False)[0]


def group_mean_and_similarity(x: torch.Tensor, size: int, *, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Group means (as ``group_mean``) and each group's mean cosine similarity of its tokens to the mean.

    Returns:
        mean fp32 ``[n, G, D]`` and similarity fp32 ``[n, G]`` in [-1, 1] (zero vectors count as 0).
    """
    stats_fn = _group_stats_triton if impl == "kernels" else _group_stats_torch
    return stats_fn(x, size, True, False)[:2]


def group_mean_similarity_variance(x: torch.Tensor, size: int, *,
                                   impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``group_mean_and_similarity``, plus each group's per-dim population variance fp32 ``[n, G, D]``."""
    stats_fn = _group_stats_triton if impl == "kernels" else _group_stats_torch
    return stats_fn(x, size, True, True)


def pooled_scores(q_mean: torch.Tensor, k_mean: torch.Tensor, scale: float, dtype: torch.dtype, *,
                  q_var: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[n, G, Gk]`` = scale * q_mean @ k_mean^T (+ scale^2 / 2 * q_var @ (k_mean^2)^T with ``q_var``).

    q_mean, q_var: fp32 ``[n, G, D]``; k_mean: ``[n, Gk, D]``. On CUDA the operands are rounded to ``dtype``
    (the inputs' dtype: tensor cores, fp32 accumulation); fp32 elsewhere."""
    def product(a, b, factor):
        if a.is_cuda and dtype != torch.float32:
            return torch.bmm((a * factor).to(dtype), b.to(dtype).transpose(1, 2), out_dtype=torch.float32)
        return torch.bmm(a.float() * factor, b.float().transpose(1, 2))

    scores = product(q_mean, k_mean, scale)
    if q_var is not None:
        scores += product(q_var, k_mean.float().square(), 0.5 * scale * scale)
    return scores
