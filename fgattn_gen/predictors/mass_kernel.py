"""Fused captured-mass kernels: for sampled query rows, the softmax mass on a KeySet's selected keys (online
softmax of every score and of the selected ones; scores never written), and each query block's weighted mean.

Sampled row r of head n is query ``rows[n, r]`` (read from q in place: no gathered copy) and belongs to query
block ``r // samples``; its mass is ``sum_{selected j} exp(s_rj - m) / sum_j exp(s_rj - m)`` with
``s = scale * q_r . k_j``. The key range is split across programs (``key_splits``) so that the grid fills the
GPU: pass 1, program (row tile, key split, head), writes each split's partial (max, sum, selected sum) per row;
pass 2, program (block tile, head), merges a block's rows and their splits, weights the rows and, with
``min_mass``, makes the blocks below it dense in place. Cost: one q k^T product over the sampled rows (e.g. 2
rows of each 128-query block: 1/64 of dense attention's q k^T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..environment import interpreting
from .key_splits import key_splits

# (rows per program, keys per step, num_warps, num_stages) of pass 1; key split: programs per SM that the grid
# aims at, the fewest BLOCK_K steps per split. Chosen, not measured, for an H200 (to be swept:
# bench/predict_stages.py --sweep): 128 rows halve the L2 reads of k against 64; the program takes 128
# registers x 256 threads and 48 KB of shared memory (ptxas, sm_90a), 2 resident per SM, so 8 per SM is
# ~4 waves; e.g. HunyuanVideo 720p, 2 rows of each of 931 blocks, 24 heads: 15 row tiles x 3 splits x 24 =
# 1,080 programs of 621 steps (was 30 x 24 = 720 of 1,861); S = 32,760: 4 x 11 x 24 = 1,056 of 47 steps.
LAUNCH = (128, 64, 8, 3)
PROGRAMS_PER_SM = 8
MIN_SPLIT_STEPS = 8
_MERGE_BLOCKS = 64  # query blocks per program of pass 2
_WIDEN_WORDS = 32  # words per store when a block is made dense


@triton.jit
def _row_mass_kernel(Q, ROWS, K, BITS, PART, stride_qb, stride_qh, stride_qs, stride_rn, stride_kb, stride_kh,
                     stride_ks, n_heads, n_rows, samples, n_keys, split_keys, n_words, n_qblocks, scale_log2,
                     HEAD_DIM: tl.constexpr, KEY_GRAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """Q [B, H, Sq, D]; ROWS int64 [n, R] (stride_rn 0: one row list for every head); K [B, H, Sk, D];
    BITS int32 [n, n_qblocks, n_words]; PART fp32 [3, n, splits, R_pad]: max (log2 units), sum, selected sum.
    Program (row tile, split, n)."""
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    b = n // n_heads
    h = n % n_heads
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_r < n_rows
    index = tl.load(ROWS + n * stride_rn + offs_r, mask=row_ok, other=0)
    q = tl.load(Q + b * stride_qb + h * stride_qh + index[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    blk = tl.minimum(offs_r // samples, n_qblocks - 1)
    word_row = BITS + (n * n_qblocks + blk.to(tl.int64)) * n_words  # [BLOCK_R] pointers
    k_head = K + b * stride_kb + h * stride_kh
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_R], tl.float32)
    l_sel = tl.zeros([BLOCK_R], tl.float32)
    lo = split * split_keys
    hi = tl.minimum(lo + split_keys, n_keys)
    for k0 in range(lo, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = offs_k < hi
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
    part_size = tl.num_programs(2) * tl.num_programs(1) * tl.num_programs(0) * BLOCK_R
    part = PART + (n * tl.num_programs(1) + split) * (tl.num_programs(0) * BLOCK_R) + offs_r
    tl.store(part, m)
    tl.store(part + part_size, l_all)
    tl.store(part + 2 * part_size, l_sel)


@triton.jit
def _block_mass_kernel(PART, WEIGHTS, OUT, BITS, n_splits, r_pad, samples, n_qblocks, n_words, last_word, min_mass,
                       SAMPLES: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr, WIDEN: tl.constexpr):
    """PART fp32 [3, n, splits, r_pad] (pass 1); WEIGHTS fp32 [n_qblocks, samples]; OUT fp32 [n, n_qblocks];
    with WIDEN, BITS int32 [n, n_qblocks, n_words] rows of blocks below min_mass become every key
    (``last_word``: the last word's valid bits). Program (block tile, n)."""
    n = tl.program_id(1).to(tl.int64)
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_j = tl.arange(0, SAMPLES)
    ok = (offs_q < n_qblocks)[:, None] & (offs_j < samples)[None, :]
    r = offs_q[:, None] * samples + offs_j[None, :]
    part_size = tl.num_programs(1) * n_splits * r_pad
    m = tl.full([BLOCK_Q, SAMPLES], float("-inf"), tl.float32)
    for j in range(0, n_splits):
        m = tl.maximum(m, tl.load(PART + (n * n_splits + j) * r_pad + r, mask=ok, other=float("-inf")))
    m = tl.where(ok, m, 0.0)
    l_all = tl.zeros([BLOCK_Q, SAMPLES], tl.float32)
    l_sel = tl.zeros([BLOCK_Q, SAMPLES], tl.float32)
    for j in range(0, n_splits):
        part = PART + (n * n_splits + j) * r_pad + r
        alpha = tl.math.exp2(tl.load(part, mask=ok, other=0.0) - m)
        l_all += alpha * tl.load(part + part_size, mask=ok, other=1.0)
        l_sel += alpha * tl.load(part + 2 * part_size, mask=ok, other=0.0)
    weight = tl.load(WEIGHTS + offs_q[:, None] * samples + offs_j[None, :], mask=ok, other=0.0)
    mass = tl.sum(tl.where(ok, l_sel / l_all, 0.0) * weight, 1)
    tl.store(OUT + n * n_qblocks + offs_q, mass, mask=offs_q < n_qblocks)
    if WIDEN:
        low = (mass < min_mass) & (offs_q < n_qblocks)
        row = BITS + (n * n_qblocks + offs_q[:, None].to(tl.int64)) * n_words
        for w0 in range(0, n_words, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            full = tl.where(offs_w == n_words - 1, last_word, -1)
            tl.store(row + offs_w[None, :], tl.broadcast_to(full[None, :], [BLOCK_Q, BLOCK_W]),
                     mask=low[:, None] & (offs_w < n_words)[None, :])


def runs_fused(q: torch.Tensor) -> bool:
    """Whether the fused kernels run for q (CUDA, or Triton's interpreter) rather than torch ops."""
    return q.is_cuda or interpreting()


def block_mass(q: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, *,
               block_n: int, scale: float, min_mass: float | None = None) -> torch.Tensor:
    """fp32 ``[B, H, n_qblocks]``: per query block, the weighted mean over its sampled rows of each row's softmax
    mass on the block's selected keys. No host synchronisation.

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Sk, D]`` (last dims contiguous).
        bits: int32 ``[B, H, n_qblocks, n_words]`` contiguous KeySet words; with ``min_mass`` the rows of the
            blocks below it are set to every key in place.
        rows: int64 ``[n_qblocks, s]`` (the same for every head) or ``[B, H, n_qblocks, s]`` (e.g. through a
            query order): the query index of each sampled row of each block.
        weights: fp32 ``[n_qblocks, s]``: each row's weight in its block's mean (0 for padding slots).
        block_n: keys per key block; scale: softmax scale.
        min_mass: None, or the estimate below which a block keeps every key.
    """
    b, h, seq_q, d = q.shape
    n_qblocks, s = weights.shape
    n_words = bits.shape[-1]
    n_rows = n_qblocks * s
    n = b * h
    rows = rows.reshape(-1, n_rows)
    block_r, block_k, warps, stages = LAUNCH
    row_tiles = triton.cdiv(n_rows, block_r)
    splits, split_keys = key_splits(k.shape[2], block_k, row_tiles * n, q.device, programs_per_sm=PROGRAMS_PER_SM,
                                    min_steps=MIN_SPLIT_STEPS)
    part = torch.empty(3, n, splits, row_tiles * block_r, dtype=torch.float32, device=q.device)
    _row_mass_kernel[(row_tiles, splits, n)](
        q, rows, k, bits, part, q.stride(0), q.stride(1), q.stride(2), rows.stride(0) if rows.shape[0] > 1 else 0,
        k.stride(0), k.stride(1), k.stride(2), h, n_rows, s, k.shape[2], split_keys, n_words, n_qblocks,
        scale * 1.4426950408889634, HEAD_DIM=d, KEY_GRAN=block_n, BLOCK_R=block_r, BLOCK_K=block_k,
        DOT_FP32=interpreting() or q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    out = torch.empty(b, h, n_qblocks, dtype=torch.float32, device=q.device)
    n_kblocks = triton.cdiv(k.shape[2], block_n)
    tail = n_kblocks % 32
    last_word = -1 if tail == 0 else (1 << tail) - 1
    _block_mass_kernel[(triton.cdiv(n_qblocks, _MERGE_BLOCKS), n)](
        part, weights, out, bits, splits, row_tiles * block_r, s, n_qblocks, n_words, last_word,
        0.0 if min_mass is None else float(min_mass), SAMPLES=triton.next_power_of_2(s), BLOCK_Q=_MERGE_BLOCKS,
        BLOCK_W=_WIDEN_WORDS, WIDEN=min_mass is not None, num_warps=4)
    return out
