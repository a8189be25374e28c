"""Fixed-threshold key selection from pooled queries (the threshold rule of ``pooled_top_p``).

Pooled row g scores key group j with ``s_gj = scale * q̄_g . k̄_j`` (plus, with a variance, the log-normal
term ``scale^2 / 2 * var_g . k̄_j^2``); key group j is kept for row g when ``softmax(s_g)_j > threshold``,
i.e. ``s_gj > lse_g + log(threshold)``; a kernel query block keeps the union of its rows' keys. No search:
the threshold is the same for every row and block (and head, unless one is given per head: a tensor, see
``head_thresholds``), so the density follows the scores.

GPU / interpreter: two fused Triton passes over the keys, scores never written to memory. The key range is
split (``key_splits``) so that the grid fills the GPU: program (row tile of ``BLOCK_G`` pooled rows, key split,
head). Pass 1 writes each split's partial (max, sum of exp) per row; pass 2 merges a row's partials into its
log-sum-exp, compares its split's scores with the cut and packs KeySet words (a split is whole words, so
every word has one writer).
CPU without the interpreter: the same rule in torch ops on the materialised scores.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..environment import interpreting
from .key_splits import key_splits
from .pooling import pooled_scores
from .words import full_row_words, pack_mask

# (BLOCK_G pooled rows per program, BLOCK_K key groups per step, num_warps, num_stages) by WITH_VAR. Measured
# before the key split (one program per row tile walked every key): the fastest of a sweep on an H200 at
# S=32,760, H=24, D=128; to be swept again with the split (bench/predict_stages.py --sweep).
LAUNCH = {False: (128, 64, 8, 3), True: (64, 128, 4, 2)}
# Key split: programs per SM that the grid aims at, and the fewest BLOCK_K steps per split (to be swept). With
# (128, 64, 8, 3) a program takes 120-121 registers x 256 threads and 48 KB of shared memory (ptxas, sm_90a):
# 2 resident per SM, so 8 per SM is ~4 waves with a short tail; e.g. HunyuanVideo 720p (931 pooled rows,
# 24 heads, 132 SMs): 8 row tiles x 6 splits x 24 = 1,152 programs of 311 steps (was 192 walking all 1,861);
# S = 32,760: 2 x 22 x 24 = 1,056 programs of 24 steps (was 48 programs of 512).
PROGRAMS_PER_SM = 8
MIN_SPLIT_STEPS = 8


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _scores(qm, qv, K, stride_ks, k0, n_keys, offs_d, BLOCK_K: tl.constexpr, WITH_VAR: tl.constexpr,
            DOT_FP32: tl.constexpr):
    """fp32 [BLOCK_G, BLOCK_K] pooled logits of key groups [k0, k0 + BLOCK_K); -inf past n_keys."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    valid = offs_k < n_keys
    kt = tl.load(K + offs_k[None, :].to(tl.int64) * stride_ks + offs_d[:, None], mask=valid[None, :], other=0.0)
    k2 = kt.to(tl.float32) * kt.to(tl.float32)
    if DOT_FP32:  # fp32 inputs, or the interpreter (its bf16 dot is wrong): fp32 operands
        s = tl.dot(qm, kt.to(tl.float32), input_precision="ieee")
        if WITH_VAR:
            s += tl.dot(qv, k2, input_precision="ieee")
    else:
        s = tl.dot(qm, kt.to(qm.dtype))
        if WITH_VAR:
            s += tl.dot(qv, k2.to(qv.dtype))
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _pooled_rows(QM, QV, stride_qn, stride_qg, n, offs_g, rows_ok, offs_d, scale, half_scale2, K_DTYPE: tl.constexpr,
                 WITH_VAR: tl.constexpr, DOT_FP32: tl.constexpr):
    """The scaled dot operands of pooled rows ``offs_g`` of head n: q̄ * scale (and var * scale^2 / 2)."""
    q_ptrs = n * stride_qn + offs_g[:, None].to(tl.int64) * stride_qg + offs_d[None, :]
    qm = tl.load(QM + q_ptrs, mask=rows_ok[:, None], other=0.0) * scale
    qv = qm
    if WITH_VAR:
        qv = tl.load(QV + q_ptrs, mask=rows_ok[:, None], other=0.0) * half_scale2
    if not DOT_FP32:
        qm = qm.to(K_DTYPE)
        qv = qv.to(K_DTYPE)
    return qm, qv


@triton.jit
def _threshold_lse_kernel(QM, QV, K, PART_M, PART_Z, stride_qn, stride_qg, stride_kn, stride_ks, n_groups, n_keys,
                          split_keys, scale, half_scale2, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_K: tl.constexpr, WITH_VAR: tl.constexpr, DOT_FP32: tl.constexpr):
    """Pass 1. QM, QV fp32 [n, G, D]; K [n, Gk, D]; PART_M, PART_Z fp32 [n, splits, G_pad]: the split's running
    max and sum of exp(s - max) of each pooled row. Program (row tile, split, n)."""
    split = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    qm, qv = _pooled_rows(QM, QV, stride_qn, stride_qg, n, offs_g, offs_g < n_groups, offs_d, scale, half_scale2,
                          K.dtype.element_ty, WITH_VAR, DOT_FP32)
    K += n * stride_kn
    lo = split * split_keys
    hi = tl.minimum(lo + split_keys, n_keys)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK_G], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        s = _scores(qm, qv, K, stride_ks, k0, hi, offs_d, BLOCK_K, WITH_VAR, DOT_FP32)
        m_new = tl.maximum(m, tl.max(s, 1))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    part = (n * tl.num_programs(1) + split) * (tl.num_programs(0) * BLOCK_G) + offs_g
    tl.store(PART_M + part, m)
    tl.store(PART_Z + part, z)


@triton.jit
def _threshold_words_kernel(QM, QV, K, PART_M, PART_Z, WORDS, stride_qn, stride_qg, stride_kn, stride_ks, n_groups,
                            n_keys, split_keys, n_splits, n_words, n_blocks, scale, half_scale2, log_threshold,
                            LOG_T, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                            ROWS_PER_BLOCK: tl.constexpr, WITH_VAR: tl.constexpr, DOT_FP32: tl.constexpr,
                            PER_HEAD: tl.constexpr):
    """Pass 2. Merges the rows' partials into lse, then writes WORDS int32 [n, n_blocks, n_words] of the split's
    keys; LOG_T fp32 [n] is read instead of the scalar ``log_threshold`` when PER_HEAD. Program (row tile,
    split, n)."""
    split = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs_g < n_groups
    qm, qv = _pooled_rows(QM, QV, stride_qn, stride_qg, n, offs_g, rows_ok, offs_d, scale, half_scale2,
                          K.dtype.element_ty, WITH_VAR, DOT_FP32)
    K += n * stride_kn
    row_stride = tl.num_programs(0) * BLOCK_G
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for j in range(0, n_splits):
        m = tl.maximum(m, tl.load(PART_M + (n * n_splits + j) * row_stride + offs_g))
    z = tl.zeros([BLOCK_G], tl.float32)
    for j in range(0, n_splits):
        part = (n * n_splits + j) * row_stride + offs_g
        z += tl.load(PART_Z + part) * tl.exp(tl.load(PART_M + part) - m)
    if PER_HEAD:
        log_threshold = tl.load(LOG_T + n)
    cut = m + tl.log(z) + log_threshold
    lane = tl.arange(0, 32)
    offs_b = tl.program_id(0) * (BLOCK_G // ROWS_PER_BLOCK) + tl.arange(0, BLOCK_G // ROWS_PER_BLOCK)
    out = WORDS + (n * n_blocks + offs_b[:, None].to(tl.int64)) * n_words
    lo = split * split_keys
    hi = tl.minimum(lo + split_keys, n_keys)
    for k0 in range(lo, hi, BLOCK_K):
        s = _scores(qm, qv, K, stride_ks, k0, hi, offs_d, BLOCK_K, WITH_VAR, DOT_FP32)
        keep = (s > cut[:, None]) & rows_ok[:, None]  # -inf padding keys are never kept
        bits = tl.reshape(keep.to(tl.int32), [BLOCK_G, BLOCK_K // 32, 32]) << lane[None, None, :]
        words = tl.xor_sum(bits, 2)  # [BLOCK_G, BLOCK_K // 32], distinct bits: xor = or
        words = tl.reduce(tl.reshape(words, [BLOCK_G // ROWS_PER_BLOCK, ROWS_PER_BLOCK, BLOCK_K // 32]), 1, _or)
        offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        tl.store(out + offs_w[None, :], words, mask=(offs_b < n_blocks)[:, None] & (offs_w < n_words)[None, :])


def _words_triton(q_mean, k_mean, q_var, scale, threshold, rows_per_block, n_blocks, dtype):
    n, groups, d = q_mean.shape
    n_keys = k_mean.shape[1]
    n_words = triton.cdiv(n_keys, 32)
    k_mean = k_mean.to(dtype) if dtype != torch.float32 else k_mean.float()
    block_g, block_k, num_warps, num_stages = LAUNCH[q_var is not None]
    block_g = max(block_g, rows_per_block)
    # every block's rows are covered (rows past G are masked): each word of WORDS is written, no zero-fill
    row_tiles = triton.cdiv(n_blocks * rows_per_block, block_g)
    splits, split_keys = key_splits(n_keys, block_k, row_tiles * n, q_mean.device, programs_per_sm=PROGRAMS_PER_SM,
                                    min_steps=MIN_SPLIT_STEPS)
    words = torch.empty(n, n_blocks, n_words, dtype=torch.int32, device=q_mean.device)
    part_m = torch.empty(n, splits, row_tiles * block_g, dtype=torch.float32, device=q_mean.device)
    part_z = torch.empty_like(part_m)
    grid = (row_tiles, splits, n)
    common = dict(HEAD_DIM=d, BLOCK_G=block_g, BLOCK_K=block_k, WITH_VAR=q_var is not None,
                  DOT_FP32=interpreting() or dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    q_var = q_var if q_var is not None else q_mean
    strides = (q_mean.stride(0), q_mean.stride(1), k_mean.stride(0), k_mean.stride(1))
    _threshold_lse_kernel[grid](q_mean, q_var, k_mean, part_m, part_z, *strides, groups, n_keys, split_keys, scale,
                                0.5 * scale * scale, **common)
    per_head = isinstance(threshold, torch.Tensor)
    log_t = threshold.log().contiguous() if per_head else part_m  # (unread without PER_HEAD)
    _threshold_words_kernel[grid](q_mean, q_var, k_mean, part_m, part_z, words, *strides, groups, n_keys, split_keys,
                                  splits, n_words, n_blocks, scale, 0.5 * scale * scale,
                                  0.0 if per_head else math.log(threshold), log_t, ROWS_PER_BLOCK=rows_per_block,
                                  PER_HEAD=per_head, **common)
    return words


def _words_torch(q_mean, k_mean, q_var, scale, threshold, rows_per_block, n_blocks, dtype):
    scores = pooled_scores(q_mean, k_mean, scale, dtype, q_var=q_var)
    n, groups, n_keys = scores.shape
    log_t = threshold.log()[:, None, None] if isinstance(threshold, torch.Tensor) else math.log(threshold)
    keep = scores > (scores.logsumexp(-1, keepdim=True) + log_t)
    keep = torch.nn.functional.pad(keep, (0, 0, 0, n_blocks * rows_per_block - groups))
    return pack_mask(keep.view(n, n_blocks, rows_per_block, n_keys).any(2))


def runs_fused(impl: str, rows_per_block: int) -> bool:
    """Whether ``pooled_threshold_words`` runs the fused kernel (no score matrix in memory): the Triton
    impl and a power-of-two ``rows_per_block`` (the kernel reshapes by it); else the torch rule."""
    return impl == "kernels" and rows_per_block & (rows_per_block - 1) == 0


def head_thresholds(threshold, heads: int, name: str = "threshold", upper: float = 1.0) -> float | torch.Tensor:
    """A threshold knob: a number in (0, upper] -> float, or one per head (a list, tuple or 1-D tensor of
    ``heads`` such numbers; a tensor is read on the host once) -> fp32 CPU tensor ``[heads]``. ValueError
    naming ``name`` otherwise."""
    def ok(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 < x <= upper

    if ok(threshold):
        return float(threshold)
    values = threshold.tolist() if isinstance(threshold, torch.Tensor) and threshold.dim() == 1 else threshold
    if not isinstance(values, (list, tuple)) or len(values) != heads or not all(ok(x) for x in values):
        raise ValueError(f"{name}: expected a number in (0, {upper:g}] or a list of {heads} of them (one per "
                         f"head), got {threshold!r}")
    return torch.tensor(values, dtype=torch.float32)


def device_thresholds(threshold, heads: int, device: torch.device | str, *, name: str = "threshold",
                      upper: float = 1.0, divisor: float = 1.0) -> float | torch.Tensor:
    """``head_thresholds(threshold, heads, name, upper) / divisor``: a float, or fp32 ``[heads]`` on ``device``,
    made once per values, divisor and device and shared (do not modify it): a copy from pageable host memory
    synchronises the host and cannot run while a CUDA graph is captured, so call once before capturing."""
    value = head_thresholds(threshold, heads, name, upper)
    if not isinstance(value, torch.Tensor):
        return value / divisor
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _thresholds_on(tuple(value.tolist()), float(divisor), device)


@functools.lru_cache(maxsize=4096)  # per layer and sequence length: a model's layers x its prompt lengths
def _thresholds_on(values: tuple[float, ...], divisor: float, device: torch.device) -> torch.Tensor:
    return (torch.tensor(values, dtype=torch.float32) / divisor).to(device)


def pooled_threshold_words(q_mean: torch.Tensor, k_mean: torch.Tensor, scale: float,
                           threshold: float | torch.Tensor, *,
                           rows_per_block: int, n_blocks: int, impl: str, dtype: torch.dtype,
                           q_var: torch.Tensor | None = None, keep_all: torch.Tensor | None = None) -> torch.Tensor:
    """KeySet words of the key groups whose pooled probability exceeds ``threshold`` for some pooled row of
    the block (module docstring); no host sync.

    Args:
        q_mean: fp32 ``[n, G, D]`` pooled queries (D a power of two for the Triton impl).
        k_mean: ``[n, Gk, D]`` keys or pooled keys, last dim contiguous.
        scale: softmax scale; threshold: probability in (0, 1], or fp32 ``[n]`` on q_mean's device: one per row
            of q_mean's first dim (per head).
        rows_per_block: pooled rows per KeySet query block (block i owns rows ``[i * rpb, (i + 1) * rpb)``);
            the fused kernel takes powers of two, other values run the torch rule.
        n_blocks: KeySet query blocks, ``>= ceil(G / rows_per_block)``.
        impl: ``"kernels"`` (fgattn's Triton/CUDA kernels: CUDA tensors, or the interpreter) or ``"torch"``.
        dtype: operand dtype of the score products (the inputs'; fp32 accumulation).
        q_var: optional fp32 ``[n, G, D]`` per-dim variance of each pooled row's queries (the variance term).
        keep_all: optional bool ``[n, n_blocks]``: these blocks keep every key group.
    Returns:
        int32 ``[n, n_blocks, ceil(Gk / 32)]``.
    """
    words_fn = _words_triton if runs_fused(impl, rows_per_block) else _words_torch
    threshold = threshold if isinstance(threshold, torch.Tensor) else float(threshold)
    words = words_fn(q_mean, k_mean, q_var, scale, threshold, rows_per_block, n_blocks, dtype)
    if keep_all is not None:
        words = torch.where(keep_all[..., None], full_row_words(k_mean.shape[1], k_mean.device), words)
    return words
