"""Fused captured-mass kernel: for sampled query rows, the softmax mass on a KeySet's selected keys, in one
pass over the keys (online softmax of every score and of the selected ones; scores never written).

Row r of head n (a gathered q row, ``QR[n, r]``) belongs to query block ``row_block[r]``; its mass is
``sum_{selected j} exp(s_rj - m) / sum_j exp(s_rj - m)`` with ``s = scale * q_r . k_j``. Cost: one q k^T
product over the sampled rows (e.g. 2 rows of each 128-query block: 1/64 of dense attention's q k^T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..environment import interpreting

_LAUNCH = (64, 64, 4, 3)  # rows per program, keys per step, warps, stages


@triton.jit
def _row_mass_kernel(QR, K, BITS, ROW_BLOCK, OUT, stride_qn, stride_qr, stride_kb, stride_kh, stride_ks,
                     n_heads, n_rows, n_keys, n_words, n_qblocks, scale_log2, HEAD_DIM: tl.constexpr,
                     KEY_GRAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """QR [n, R, D]; K [B, H, Sk, D]; BITS int32 [n, n_qblocks, n_words]; ROW_BLOCK int32 [R]; OUT fp32 [n, R]."""
    pid_r = tl.program_id(0)
    n = tl.program_id(1)
    b = (n // n_heads).to(tl.int64)
    h = (n % n_heads).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_r < n_rows
    q = tl.load(QR + n.to(tl.int64) * stride_qn + offs_r[:, None] * stride_qr + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    blk = tl.load(ROW_BLOCK + offs_r, mask=row_ok, other=0)
    word_row = BITS + (n.to(tl.int64) * n_qblocks + blk.to(tl.int64)) * n_words  # [BLOCK_R] pointers
    k_head = K + b * stride_kb + h * stride_kh
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_R], tl.float32)
    l_sel = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, n_keys, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = offs_k < n_keys
        kt = tl.load(k_head + offs_k[None, :].to(tl.int64) * stride_ks + offs_d[:, None], mask=valid[None, :],
                     other=0.0)
        if DOT_FP32:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        if KEY_GRAN == 1:  # one word holds 32 consecutive keys: load BLOCK_K / 32 words per row, unpack the bits
            offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            words = tl.load(word_row[:, None] + offs_w[None, :], mask=row_ok[:, None] & (offs_w < n_words)[None, :],
                            other=0)
            bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
            selected = tl.reshape(bits, [BLOCK_R, BLOCK_K]) != 0
        else:
            kblock = offs_k // KEY_GRAN
            words = tl.load(word_row[:, None] + (kblock // 32)[None, :], mask=row_ok[:, None] & valid[None, :],
                            other=0)
            selected = ((words >> (kblock % 32)[None, :]) & 1) != 0
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_all = l_all * alpha + tl.sum(p, 1)
        l_sel = l_sel * alpha + tl.sum(tl.where(selected, p, 0.0), 1)
        m = m_new
    tl.store(OUT + n.to(tl.int64) * n_rows + offs_r, l_sel / l_all, mask=row_ok)


def runs_fused(q: torch.Tensor) -> bool:
    """Whether the fused kernel runs for q (CUDA, or Triton's interpreter) rather than torch ops."""
    return q.is_cuda or interpreting()


def row_mass(q_rows: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, row_block: torch.Tensor, *,
             block_n: int, scale: float) -> torch.Tensor:
    """fp32 ``[B, H, R]``: each sampled row's softmax mass on its block's selected keys.

    q_rows ``[B, H, R, D]`` (gathered rows, contiguous); k ``[B, H, Sk, D]``; bits int32 ``[B, H, n_qblocks,
    n_words]``; row_block int32 ``[R]`` (query block of each row). No host synchronisation.
    """
    b, h, n_rows, d = q_rows.shape
    out = torch.empty(b, h, n_rows, dtype=torch.float32, device=q_rows.device)
    block_r, block_k, warps, stages = _LAUNCH
    qr = q_rows.reshape(b * h, n_rows, d)
    grid = (triton.cdiv(n_rows, block_r), b * h)
    _row_mass_kernel[grid](qr, k, bits, row_block, out, qr.stride(0), qr.stride(1), k.stride(0), k.stride(1),
                           k.stride(2), h, n_rows, k.shape[2], bits.shape[-1], bits.shape[2],
                           scale * 1.4426950408889634, HEAD_DIM=d, KEY_GRAN=block_n, BLOCK_R=block_r,
                           BLOCK_K=block_k, DOT_FP32=interpreting() or q_rows.dtype == torch.float32,
                           num_warps=warps, num_stages=stages)
    return out
