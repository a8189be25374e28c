"""Per (query block, key) statistics of the exact softmax probabilities, given each query row's LSE.

For query block b (rows ``[b * block_m, (b + 1) * block_m)``) and key j, with p_ij = exp(scale q_i.k_j - lse_i):

- ``max``:  log max_i p_ij   (the "OR" rule: key j matters to some query of the block)
- ``mean``: log mean_i p_ij  (the block's attention mass on key j; sums to 1 over j)
- words: bit j set where max_i p_ij > threshold (KeySet words, key granularity 1)

GPU / interpreter: a Triton program per (query block, head) holds the block's queries and walks the keys a
tile at a time, computing k q^T (keys as rows, so the reduction over queries stays inside a warp) and only
the statistic: no P V product, no exponential for ``max`` and words (it works on log probabilities).
``precision="fp8"`` runs that product on fp8 tensor cores: q (scaled per row) and mean-centred k (scaled
per head; centring shifts each row's scores by a constant, which the LSE absorbs) are converted to e4m3 by
one Triton pass each. CPU without the interpreter: the same statistics from fp32 score matrices in torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..build import interpreting
from .words import pack_mask

PRECISIONS = ("exact", "fp8")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
_MODE = {"max": 0, "mean": 1, "words": 2}


@triton.jit
def _load_queries(q_head, lse_head, qscale_head, stride_qs, stride_fs, qb, sub, seq_q, block_m,
                  HEAD_DIM: tl.constexpr, TILE_M: tl.constexpr, DOT_FP32: tl.constexpr):
    """Rows sub*TILE_M .. +TILE_M of query block qb, their LSE in log2 units (+inf on rows outside) and their
    score scale (log2 units per unit of q.k)."""
    in_block = sub * TILE_M + tl.arange(0, TILE_M)
    rows = qb * block_m + in_block
    ok = (in_block < block_m) & (rows < seq_q)
    q = tl.load(q_head + rows[:, None].to(tl.int64) * stride_qs + tl.arange(0, HEAD_DIM)[None, :],
                mask=ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)  # Triton's interpreter mis-computes bf16 dots: upcast there
    lse2 = tl.load(lse_head + rows, mask=ok, other=float("inf")) * 1.4426950408889634
    row_scale = tl.load(qscale_head + rows * stride_fs, mask=ok, other=0.0)
    return q, lse2, row_scale


@triton.jit
def _tile_stat(kt, q, lse2, row_scale, best, total, MODE: tl.constexpr, IEEE: tl.constexpr):
    """Fold one (key tile, query tile) into the per-key running max (MODE 0, 2) or sum (MODE 1)."""
    if IEEE:
        s = tl.dot(kt, tl.trans(q), input_precision="ieee")
    else:
        s = tl.dot(kt, tl.trans(q))
    logp2 = s * row_scale[None, :] - lse2[None, :]  # [keys, queries]: log2 of the probabilities
    if MODE == 1:
        total += tl.sum(tl.exp2(logp2), 1)
    else:
        best = tl.maximum(best, tl.max(logp2, 1))
    return best, total


@triton.jit
def _store_stat(out_base, keys, key_ok, k0, best, total, n_rows, out_row, log2_threshold, block_ok,
                MODE: tl.constexpr, TILE_N: tl.constexpr):
    """Write one key tile of a block's statistic (nothing when ``block_ok`` is false)."""
    if MODE == 0:
        tl.store(out_base + keys, best * 0.6931471805599453, mask=key_ok & block_ok)
    elif MODE == 1:
        tl.store(out_base + keys, tl.log(total / n_rows), mask=key_ok & block_ok)
    else:  # pack: word w of the tile collects keys 32 w .. 32 w + 31
        bits = ((best > log2_threshold) & key_ok).to(tl.int32) << (tl.arange(0, TILE_N) % 32)
        words = tl.xor_sum(tl.reshape(bits, [TILE_N // 32, 32]), 1)
        w = k0 // 32 + tl.arange(0, TILE_N // 32)
        tl.store(out_base + w, words, mask=(w < out_row) & block_ok)


@triton.jit
def _block_stat_kernel(Q, K, LSE, QSCALE, OUT, stride_qn, stride_qs, stride_kn, stride_ks, stride_ln,
                       stride_fn, stride_fs, seq_q, seq_k, n_qblocks, out_row, block_m, log2_threshold,
                       HEAD_DIM: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, N_SUB: tl.constexpr,
                       PAIR: tl.constexpr, MODE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """Q [n, Sq, D], K [n, Sk, D] (last dim contiguous), LSE fp32 [n, Sq], QSCALE fp32 [n, Sq] (log2 units per
    unit of q_i.k_j; any strides); OUT fp32 [n, n_qblocks, Sk] (MODE 0 max, 1 mean) or int32
    [n, n_qblocks, words] (MODE 2). A program owns query block ``qb`` (with PAIR, also ``qb + 1``: both share
    every key tile it loads); a block of more than TILE_M rows is N_SUB tiles, reloaded for every key tile."""
    qb = tl.program_id(0) * (2 if PAIR else 1)
    n = tl.program_id(1).to(tl.int64)
    q_head = Q + n * stride_qn
    k_head = K + n * stride_kn
    lse_head = LSE + n * stride_ln
    qscale_head = QSCALE + n * stride_fn
    out_base = OUT + (n * n_qblocks + qb) * out_row
    n_rows = tl.minimum(block_m, seq_q - qb * block_m)
    offs_d = tl.arange(0, HEAD_DIM)
    if N_SUB == 1:
        q, lse2, row_scale = _load_queries(q_head, lse_head, qscale_head, stride_qs, stride_fs, qb, 0, seq_q,
                                           block_m, HEAD_DIM, TILE_M, DOT_FP32)
        if PAIR:
            q1, lse2_1, row_scale_1 = _load_queries(q_head, lse_head, qscale_head, stride_qs, stride_fs, qb + 1, 0,
                                                    seq_q, block_m, HEAD_DIM, TILE_M, DOT_FP32)
            n_rows_1 = tl.maximum(tl.minimum(block_m, seq_q - (qb + 1) * block_m), 1)  # >= 1: masked if none
    for k0 in range(0, seq_k, TILE_N):
        keys = k0 + tl.arange(0, TILE_N)
        key_ok = keys < seq_k
        kt = tl.load(k_head + keys[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=key_ok[:, None],
                     other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        best = tl.full([TILE_N], float("-inf"), tl.float32)
        total = tl.zeros([TILE_N], tl.float32)
        if N_SUB == 1:
            best, total = _tile_stat(kt, q, lse2, row_scale, best, total, MODE, IEEE)
        else:
            for sub in tl.static_range(N_SUB):
                q_sub, lse2_sub, row_scale_sub = _load_queries(q_head, lse_head, qscale_head, stride_qs, stride_fs,
                                                               qb, sub, seq_q, block_m, HEAD_DIM, TILE_M, DOT_FP32)
                best, total = _tile_stat(kt, q_sub, lse2_sub, row_scale_sub, best, total, MODE, IEEE)
        _store_stat(out_base, keys, key_ok, k0, best, total, n_rows, out_row, log2_threshold, True, MODE, TILE_N)
        if PAIR:  # no branch on whether block qb + 1 exists (keeps the loop pipelined): its stores are masked
            best = tl.full([TILE_N], float("-inf"), tl.float32)
            total = tl.zeros([TILE_N], tl.float32)
            best, total = _tile_stat(kt, q1, lse2_1, row_scale_1, best, total, MODE, IEEE)
            _store_stat(out_base + out_row, keys, key_ok, k0, best, total, n_rows_1, out_row, log2_threshold,
                        qb + 1 < n_qblocks, MODE, TILE_N)


def _key_fp8_scale(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 mean key ``[n, D]`` and a per-head scale ``[n]`` bounding max |k - mean| / 448 (one read each)."""
    mean_k = k.mean(1, dtype=torch.float32)
    low, high = torch.aminmax(k.reshape(k.shape[0], -1), dim=1)
    bound = torch.maximum(-low.float(), high.float()) + mean_k.abs().amax(1)
    return mean_k, bound.clamp_min(1e-30) / _FP8_MAX


@triton.jit
def _to_fp8_kernel(X, OUT, MEAN, HEAD_SCALE, ROW_SCALE, DOT, stride_xn, stride_xs, n_rows,
                   HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, PER_ROW: tl.constexpr):
    """One pass over X [n, S, D] (last dim contiguous) to e4m3 OUT [n, S, D] (contiguous). PER_ROW (queries):
    x / (max|x| / 448) per row, the row scale to ROW_SCALE [n, S] and x . MEAN[n] to DOT [n, S]. Else (keys):
    (x - MEAN[n]) / HEAD_SCALE[n]."""
    n = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(X + n * stride_xn + rows[:, None].to(tl.int64) * stride_xs + dims[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    mean = tl.load(MEAN + n * HEAD_DIM + dims)
    if PER_ROW:
        row_scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-30) / 448.0
        tl.store(ROW_SCALE + n * n_rows + rows, row_scale, mask=ok)
        tl.store(DOT + n * n_rows + rows, tl.sum(x * mean[None, :], 1), mask=ok)
        x = x * (1.0 / row_scale)[:, None]
    else:
        x = (x - mean[None, :]) * (1.0 / tl.load(HEAD_SCALE + n))
    out = OUT + (n * n_rows + rows[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(out, x.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=ok[:, None])


def _to_fp8_triton(x, mean, head_scale=None):
    """GPU form of the conversions in ``_fp8_operands``: e4m3 x, and for queries (``head_scale`` None) the
    per-row scale and x . mean."""
    n, rows, d = x.shape
    out = torch.empty(n, rows, d, dtype=_FP8, device=x.device)
    per_row = head_scale is None
    row_scale = torch.empty(n, rows, dtype=torch.float32, device=x.device) if per_row else out
    dot = torch.empty(n, rows, dtype=torch.float32, device=x.device) if per_row else out
    block_r = 32
    _to_fp8_kernel[(triton.cdiv(rows, block_r), n)](
        x, out, mean, head_scale if head_scale is not None else mean, row_scale, dot, x.stride(0), x.stride(1),
        rows, HEAD_DIM=d, BLOCK_R=block_r, PER_ROW=per_row, num_warps=4)
    return (out, row_scale, dot) if per_row else out


def _fp8_operands(q, k, lse, scale):
    """fp8 operands of q k^T: q scaled per row, k centred (minus its mean key: each row's scores shift by
    q_i . mean, which the returned LSE absorbs) and scaled per head. Returns (q8, k8, shifted lse fp32
    [n, Sq], per-row score scale fp32 [n, Sq] in log2 units per unit of q8.k8). On CUDA one Triton pass per
    operand; elsewhere torch ops (Triton's interpreter rounds fp32 -> e4m3 wrongly)."""
    mean_k, k_scale = _key_fp8_scale(k)
    if q.is_cuda and not interpreting():
        q8, q_scale, q_dot_mean = _to_fp8_triton(q, mean_k)
        k8 = _to_fp8_triton(k, mean_k, k_scale)
    else:
        qf = q.float()
        q_scale = qf.abs().amax(-1).clamp_min(1e-30) / _FP8_MAX
        q8 = (qf * (1.0 / q_scale)[..., None]).to(_FP8)
        k8 = ((k.float() - mean_k[:, None, :]) * (1.0 / k_scale)[:, None, None]).to(_FP8)
        q_dot_mean = (qf * mean_k[:, None, :]).sum(-1)
    shifted_lse = lse - scale * q_dot_mean
    return q8, k8, shifted_lse, q_scale * (k_scale * (scale * _LOG2E))[:, None]


def _block_stat_triton(q, k, lse, *, block_m, scale, mode, precision, threshold, launch):
    n, seq_q, d = q.shape
    seq_k = k.shape[1]
    n_qblocks = triton.cdiv(seq_q, block_m)
    interp = interpreting()
    if precision == "fp8":
        q, k, lse, qscale = _fp8_operands(q, k, lse, scale)
    else:
        qscale = torch.full((1, 1), scale * _LOG2E, dtype=torch.float32, device=q.device).expand(n, seq_q)
    if mode == "words":
        out_row = triton.cdiv(seq_k, 32)
        out = torch.empty(n, n_qblocks, out_row, dtype=torch.int32, device=q.device)
    else:
        out_row = seq_k
        out = torch.empty(n, n_qblocks, seq_k, dtype=torch.float32, device=q.device)
    tile_m = min(128, max(16, triton.next_power_of_2(block_m)))
    if precision == "fp8":  # fastest measured on H200 (bench/results/predictors_h200.md)
        config = dict(tile_n=64, num_warps=4, num_stages=4, pair=False)
    else:
        config = dict(tile_n=64 if interp else 128, num_warps=8 if tile_m >= 128 else 4, num_stages=3, pair=False)
    config.update(launch or {})
    n_sub = triton.cdiv(block_m, tile_m)
    pair = config["pair"] and n_sub == 1
    lse = lse.contiguous()
    _block_stat_kernel[(triton.cdiv(n_qblocks, 2) if pair else n_qblocks, n)](
        q, k, lse, qscale, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
        qscale.stride(0), qscale.stride(1), seq_q, seq_k, n_qblocks, out_row, block_m,
        math.log2(threshold) if threshold else 0.0,
        HEAD_DIM=d, TILE_M=tile_m, TILE_N=config["tile_n"], N_SUB=n_sub, PAIR=pair, MODE=_MODE[mode],
        DOT_FP32=interp, IEEE=q.dtype == torch.float32, num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out


def _block_stat_torch(q, k, lse, *, block_m, scale, mode, precision, threshold):
    if precision == "fp8":
        q8, k8, lse, qscale = _fp8_operands(q, k, lse, scale)
        logp = torch.bmm(q8.float(), k8.float().transpose(1, 2)) * (qscale * _LN2)[..., None]
    else:
        logp = torch.bmm(q.float(), k.float().transpose(1, 2)) * scale
    logp = logp - lse[..., None]
    n, seq_q, seq_k = logp.shape
    n_qblocks = -(-seq_q // block_m)
    blocks = torch.nn.functional.pad(logp, (0, 0, 0, n_qblocks * block_m - seq_q), value=float("-inf"))
    blocks = blocks.view(n, n_qblocks, block_m, seq_k)
    if mode == "mean":
        rows = torch.full((n_qblocks,), float(block_m), device=q.device)
        rows[-1] = seq_q - (n_qblocks - 1) * block_m
        return torch.logsumexp(blocks, 2) - rows.log()[:, None]
    best = blocks.amax(2)
    if mode == "max":
        return best
    return pack_mask(best > math.log(threshold))


def block_stat(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_m: int, scale: float, mode: str,
               backend: str, precision: str = "exact", threshold: float | None = None,
               launch: dict | None = None) -> torch.Tensor:
    """Per (query block, key) statistic of the softmax probabilities of one chunk of heads.

    Args:
        q: ``[n, Sq, D]``; k: ``[n, Sk, D]`` (bf16/fp16/fp32, last dim contiguous, D in {64, 128}).
        lse: fp32 ``[n, Sq]``: natural-log LSE of each query row's scaled scores (from the dense pass).
        mode: ``"max"`` or ``"mean"`` (fp32 ``[n, ceil(Sq / block_m), Sk]``, natural log; see the module
            docstring), or ``"words"``: int32 ``[n, ceil(Sq / block_m), ceil(Sk / 32)]``, bit set where the
            block's max probability exceeds ``threshold``.
        precision: ``"exact"`` (q k^T in the input dtype) or ``"fp8"`` (e4m3 tensor cores; see above).
        backend: ``"triton"`` (CUDA, or the interpreter) or ``"torch"``.
        launch: Triton launch overrides ``{"tile_n", "num_warps", "num_stages", "pair"}`` (benchmarks; ``pair``:
            a program handles two query blocks of at most 128 rows, sharing the key tiles it loads).
    """
    if backend == "torch":
        return _block_stat_torch(q, k, lse, block_m=block_m, scale=scale, mode=mode, precision=precision,
                                 threshold=threshold)
    return _block_stat_triton(q, k, lse, block_m=block_m, scale=scale, mode=mode, precision=precision,
                              threshold=threshold, launch=launch)
