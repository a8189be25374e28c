"""Fixed-threshold key selection from pooled queries (the threshold rule of ``pooled_top_p``).

Pooled row g scores key group j with ``s_gj = scale * q̄_g . k̄_j`` (plus, with a variance, the log-normal
term ``scale^2 / 2 * var_g . k̄_j^2``); key group j is kept for row g when ``softmax(s_g)_j > threshold``,
i.e. ``s_gj > lse_g + log(threshold)``; a kernel query block keeps the union of its rows' keys. No search:
the threshold is the same for every row and block (and head, unless one is given per head: a tensor, see
``head_thresholds``), so the density follows the scores.

GPU / interpreter: one fused Triton program per (``BLOCK_G`` pooled rows, head) walks the keys twice, once
for the rows' log-sum-exp and once to compare and pack KeySet words; the scores are never written to memory.
CPU without the interpreter: the same rule in torch ops on the materialised scores.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..environment import interpreting
from .pooling import pooled_scores
from .words import full_row_words, pack_mask

# (BLOCK_G pooled rows per program, BLOCK_K key groups per step, num_warps, num_stages) by WITH_VAR: the fastest
# of a sweep on an H200 at S=32,760, H=24, D=128 (threshold 1/Sk, 16x1 pool 16, this kernel alone: 3.80 ->
# 2.98 ms without the variance term; with it (64, 128, 4, 2) stayed best, 5.11 ms)
_LAUNCH = {False: (128, 64, 8, 3), True: (64, 128, 4, 2)}


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
def _pooled_threshold_kernel(QM, QV, K, WORDS, stride_qn, stride_qg, stride_kn, stride_ks, n_groups, n_keys,
                             n_words, n_blocks, scale, half_scale2, log_threshold, LOG_T, HEAD_DIM: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr,
                             WITH_VAR: tl.constexpr, DOT_FP32: tl.constexpr, PER_HEAD: tl.constexpr):
    """QM, QV fp32 [n, G, D]; K [n, Gk, D]; WORDS int32 [n, n_blocks, n_words]; LOG_T fp32 [n], read instead of
    the scalar ``log_threshold`` when PER_HEAD. Program (row tile, n)."""
    n = tl.program_id(1).to(tl.int64)
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs_g < n_groups
    q_ptrs = n * stride_qn + offs_g[:, None].to(tl.int64) * stride_qg + offs_d[None, :]
    qm = tl.load(QM + q_ptrs, mask=rows_ok[:, None], other=0.0) * scale
    qv = qm
    if WITH_VAR:
        qv = tl.load(QV + q_ptrs, mask=rows_ok[:, None], other=0.0) * half_scale2
    if not DOT_FP32:
        qm = qm.to(K.dtype.element_ty)
        qv = qv.to(K.dtype.element_ty)
    K += n * stride_kn
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK_G], tl.float32)
    for k0 in range(0, n_keys, BLOCK_K):
        s = _scores(qm, qv, K, stride_ks, k0, n_keys, offs_d, BLOCK_K, WITH_VAR, DOT_FP32)
        m_new = tl.maximum(m, tl.max(s, 1))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    if PER_HEAD:
        log_threshold = tl.load(LOG_T + n)
    cut = m + tl.log(z) + log_threshold
    lane = tl.arange(0, 32)
    offs_b = tl.program_id(0) * (BLOCK_G // ROWS_PER_BLOCK) + tl.arange(0, BLOCK_G // ROWS_PER_BLOCK)
    out = WORDS + (n * n_blocks + offs_b[:, None].to(tl.int64)) * n_words
    for k0 in range(0, n_keys, BLOCK_K):
        s = _scores(qm, qv, K, stride_ks, k0, n_keys, offs_d, BLOCK_K, WITH_VAR, DOT_FP32)
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
    words = torch.zeros(n, n_blocks, n_words, dtype=torch.int32, device=q_mean.device)
    k_mean = k_mean.to(dtype) if dtype != torch.float32 else k_mean.float()
    block_g, block_k, num_warps, num_stages = _LAUNCH[q_var is not None]
    block_g = max(block_g, rows_per_block)
    grid = (triton.cdiv(groups, block_g), n)
    per_head = isinstance(threshold, torch.Tensor)
    log_t = threshold.log().contiguous() if per_head else q_mean  # (unread without PER_HEAD)
    _pooled_threshold_kernel[grid](
        q_mean, q_var if q_var is not None else q_mean, k_mean, words, q_mean.stride(0), q_mean.stride(1),
        k_mean.stride(0), k_mean.stride(1), groups, n_keys, n_words, n_blocks, scale, 0.5 * scale * scale,
        0.0 if per_head else math.log(threshold), log_t, HEAD_DIM=d, BLOCK_G=block_g, BLOCK_K=block_k,
        ROWS_PER_BLOCK=rows_per_block, WITH_VAR=q_var is not None, DOT_FP32=interpreting() or dtype == torch.float32,
        PER_HEAD=per_head, num_warps=num_warps, num_stages=num_stages)
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
