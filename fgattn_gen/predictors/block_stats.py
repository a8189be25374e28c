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

Hopper GPUs, fp8 words of 128-row blocks (the exact-mask refresh): a hand-written sm_90a kernel instead,
``templates/cuda/block_stat_fp8.cu`` (built with NVRTC): a CTA per (pair of query blocks, head), keys
streamed by bulk copies through a shared-memory ring by a producer warpgroup, wgmma e4m3 with keys as M, two
consumer warpgroups taking turns so one's epilogue (one compare per score, ballots) overlaps the other's
tensor-core work. Its operands come from the same conversion pass, written pre-swizzled and padded
(``_fp8_operands(..., layout="wgmma")``) so each tile is one contiguous copy. ``kernel="triton"`` keeps the
Triton kernel there.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .. import nvrtc
from ..environment import cuda_sm_count, interpreting, templates_dir
from ..render import cuda_headers
from .words import pack_mask

PRECISIONS = ("exact", "fp8")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
_MODE = {"max": 0, "mean": 1, "words": 2}
KERNELS = ("auto", "triton", "cuda")
# templates/cuda/block_stat_fp8.cu: its launch shape and operand padding (the kernel derives the same).
CUDA_Q_ROWS = 256  # two query blocks of 128 rows per CTA
CUDA_TILE_KEYS = 64  # keys per shared-memory stage
CUDA_STAGES = 8
CUDA_THREADS = 384  # producer warpgroup + two consumer warpgroups
CUDA_KEY_SPLITS: int | None = None  # key ranges per (pair, head): None picks by the wave model below
_CUDA_CTA_OVERHEAD_TILES = 8  # wave model: a CTA's fixed cost (query load, pipeline fill), in key tiles (guess)


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
def _to_fp8_kernel(X, OUT, MEAN, HEAD_SCALE, ROW_SCALE, DOT, stride_xn, stride_xs, n_rows, n_out_rows,
                   HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, PER_ROW: tl.constexpr, SWIZZLE: tl.constexpr):
    """One pass over X [n, S, D] (last dim contiguous) to e4m3 OUT [n, n_out_rows, D] (contiguous; rows from S
    on are written from zeros). PER_ROW (queries): x / (max|x| / 448) per row, the row scale to ROW_SCALE
    [n, S] and x . MEAN[n] to DOT [n, S]. Else (keys): (x - MEAN[n]) / HEAD_SCALE[n]. SWIZZLE 1 / 2: each
    row's 16-byte chunk c is stored at c ^ (row % 8) / c ^ ((row // 2) % 4) (``_swizzle_chunks``)."""
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
    if SWIZZLE == 1:
        cols = ((dims[None, :] // 16) ^ (rows[:, None] % 8)) * 16 + dims[None, :] % 16
    elif SWIZZLE == 2:
        cols = ((dims[None, :] // 16) ^ ((rows[:, None] // 2) % 4)) * 16 + dims[None, :] % 16
    else:
        cols = rows[:, None] * 0 + dims[None, :]
    out = OUT + (n * n_out_rows + rows[:, None]) * HEAD_DIM + cols
    tl.store(out, x.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=(rows < n_out_rows)[:, None])


def _swizzle_mode(layout: str, d: int) -> int:
    """0: rows as they are; 1 / 2: the 128-byte (D = 128) / 64-byte (D = 64) wgmma swizzle of
    ``templates/cuda/block_stat_fp8.cu``."""
    if layout == "plain":
        return 0
    if layout == "wgmma" and d in (64, 128):
        return 1 if d == 128 else 2
    raise ValueError(f"layout: expected 'plain', or 'wgmma' with D in (64, 128); got {layout!r} with D={d}")


def _swizzle_chunks(x8: torch.Tensor, mode: int) -> torch.Tensor:
    """Torch form of the kernel's SWIZZLE on e4m3 ``[n, R, D]``: row r's chunk c moves to c ^ f(r) (an
    involution, so applying it twice gives ``x8`` back)."""
    if mode == 0:
        return x8
    n, rows, d = x8.shape
    r = torch.arange(rows, device=x8.device)
    sw = r % 8 if mode == 1 else (r // 2) % 4
    idx = (torch.arange(d // 16, device=x8.device)[None, :] ^ sw[:, None])  # [R, chunks]: logical chunk
    bytes_ = x8.view(torch.uint8).view(n, rows, d // 16, 16)
    out = torch.gather(bytes_, 2, idx[None, :, :, None].expand(n, rows, d // 16, 16))
    return out.reshape(n, rows, d).view(_FP8)


def _to_fp8_triton(x, mean, head_scale=None, *, out_rows=None, swizzle=0):
    """GPU form of the conversions in ``_fp8_operands``: e4m3 x (``out_rows`` rows, default x's), and for
    queries (``head_scale`` None) the per-row scale and x . mean."""
    n, rows, d = x.shape
    out_rows = rows if out_rows is None else out_rows
    out = torch.empty(n, out_rows, d, dtype=_FP8, device=x.device)
    per_row = head_scale is None
    row_scale = torch.empty(n, rows, dtype=torch.float32, device=x.device) if per_row else out
    dot = torch.empty(n, rows, dtype=torch.float32, device=x.device) if per_row else out
    block_r = 32
    _to_fp8_kernel[(triton.cdiv(out_rows, block_r), n)](
        x, out, mean, head_scale if head_scale is not None else mean, row_scale, dot, x.stride(0), x.stride(1),
        rows, out_rows, HEAD_DIM=d, BLOCK_R=block_r, PER_ROW=per_row, SWIZZLE=swizzle, num_warps=4)
    return (out, row_scale, dot) if per_row else out


def _fp8_operands(q, k, lse, scale, layout="plain"):
    """fp8 operands of q k^T: q scaled per row, k centred (minus its mean key: each row's scores shift by
    q_i . mean, which the returned LSE absorbs) and scaled per head. Returns (q8, k8, shifted lse fp32
    [n, Sq], per-row score scale fp32 [n, Sq] in log2 units per unit of q8.k8). On CUDA one Triton pass per
    operand; elsewhere torch ops (Triton's interpreter rounds fp32 -> e4m3 wrongly).

    ``layout="wgmma"`` (the CUDA kernel's operands): q8 ``[n, CUDA_Q_ROWS * ceil(Sq / CUDA_Q_ROWS), D]`` and
    k8 ``[n, CUDA_TILE_KEYS * ceil(Sk / CUDA_TILE_KEYS), D]`` (padding rows: finite values, masked by the
    kernel), each row's 16-byte chunks permuted by ``_swizzle_chunks``."""
    swizzle = _swizzle_mode(layout, q.shape[-1])
    q_rows, k_rows = q.shape[1], k.shape[1]
    if layout == "wgmma":
        q_rows, k_rows = _round_up(q_rows, CUDA_Q_ROWS), _round_up(k_rows, CUDA_TILE_KEYS)
    mean_k, k_scale = _key_fp8_scale(k)
    if q.is_cuda and not interpreting():
        q8, q_scale, q_dot_mean = _to_fp8_triton(q, mean_k, out_rows=q_rows, swizzle=swizzle)
        k8 = _to_fp8_triton(k, mean_k, k_scale, out_rows=k_rows, swizzle=swizzle)
    else:
        qf = q.float()
        q_scale = qf.abs().amax(-1).clamp_min(1e-30) / _FP8_MAX
        q8 = (qf * (1.0 / q_scale)[..., None]).to(_FP8)
        k8 = ((k.float() - mean_k[:, None, :]) * (1.0 / k_scale)[:, None, None]).to(_FP8)
        q_dot_mean = (qf * mean_k[:, None, :]).sum(-1)
        if layout == "wgmma":
            q8 = _swizzle_chunks(_pad_rows(q8, q_rows), swizzle)
            k8 = _swizzle_chunks(_pad_rows(k8, k_rows), swizzle)
    shifted_lse = lse - scale * q_dot_mean
    return q8, k8, shifted_lse, q_scale * (k_scale * (scale * _LOG2E))[:, None]


def _pad_rows(x8: torch.Tensor, rows: int) -> torch.Tensor:
    """e4m3 ``[n, R, D]`` -> ``[n, rows, D]``, zero rows appended."""
    return torch.nn.functional.pad(x8.view(torch.uint8), (0, 0, 0, rows - x8.shape[1])).view(_FP8)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def cuda_kernel_applies(q: torch.Tensor, *, block_m: int, mode: str, precision: str) -> bool:
    """Whether ``block_stat`` runs ``templates/cuda/block_stat_fp8.cu``: fp8 words of 128-row blocks, D 64 or
    128, on a Hopper GPU (wgmma, sm_90a), outside Triton's interpreter."""
    return (q.is_cuda and not interpreting() and precision == "fp8" and mode == "words" and block_m == 128
            and q.shape[-1] in (64, 128) and torch.cuda.get_device_capability(q.device) == (9, 0))


def cuda_stat_smem_bytes(d: int, stages: int = CUDA_STAGES) -> int:
    """Dynamic shared memory of the CUDA kernel (must equal its SMEM_BYTES; the kernel traps if short):
    256 query rows, ``stages`` stages of 64 keys, 256 row thresholds, 2 * stages + 1 mbarriers, and 1 KB to
    align the base to 1024 bytes."""
    return CUDA_Q_ROWS * d + stages * CUDA_TILE_KEYS * d + CUDA_Q_ROWS * 4 + (2 * stages + 1) * 8 + 1024


@functools.cache
def _cuda_stat_kernel(device_index: int, d: int, stages: int) -> nvrtc.CudaKernel:
    kernel = nvrtc.load_kernel(templates_dir() / "cuda" / "block_stat_fp8.cu", "fgattn_block_stat_fp8",
                               device_index, (("FGATTN_STAT_HEAD_DIM", d), ("FGATTN_STAT_STAGES", stages)),
                               headers=cuda_headers())
    kernel.set_max_dynamic_smem(cuda_stat_smem_bytes(d, stages))
    return kernel


def cuda_key_splits(units: int, n_tiles: int, sms: int, splits: int | None = None) -> tuple[int, int]:
    """(tiles per CTA, CTAs per (pair, head)) of the CUDA kernel: ``splits`` key ranges, or by default the
    count in 1..8 with the least modelled time, waves x (tiles per CTA + fixed cost), for ``units``
    (pair, head) CTAs of ``n_tiles`` tiles on ``sms`` multiprocessors (one CTA each)."""
    def shape(s):
        per = -(-n_tiles // s)
        return per, -(-n_tiles // per)

    def cost(s):
        per, z = shape(s)
        return -(-units * z // sms) * (per + _CUDA_CTA_OVERHEAD_TILES), s

    return shape(splits if splits else min(range(1, 9), key=cost))


def _block_stat_cuda(q, k, lse, *, scale, threshold):
    """fp8 words of 128-row query blocks with the hand-written sm_90a kernel (see its header)."""
    n, seq_q, d = q.shape
    seq_k = k.shape[1]
    n_qblocks = triton.cdiv(seq_q, 128)
    n_words = triton.cdiv(seq_k, 32)
    out = torch.empty(n, n_qblocks, n_words, dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    q8, k8, lse, qscale = _fp8_operands(q, k, lse, scale, layout="wgmma")
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    kernel = _cuda_stat_kernel(device, d, CUDA_STAGES)
    pairs = triton.cdiv(n_qblocks, 2)
    sms = cuda_sm_count(device)
    per_cta, splits = cuda_key_splits(pairs * n, triton.cdiv(seq_k, CUDA_TILE_KEYS), sms, CUDA_KEY_SPLITS)
    kernel((pairs, n, splits), (CUDA_THREADS, 1, 1), q8, k8, lse.contiguous(), qscale.contiguous(), out, seq_q,
           seq_k, n_qblocks, n_words, float(math.log2(threshold)), per_cta,
           shared_mem=cuda_stat_smem_bytes(d, CUDA_STAGES))
    return out


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
               impl: str, precision: str = "exact", threshold: float | None = None,
               launch: dict | None = None, kernel: str = "auto") -> torch.Tensor:
    """Per (query block, key) statistic of the softmax probabilities of one chunk of heads.

    Args:
        q: ``[n, Sq, D]``; k: ``[n, Sk, D]`` (bf16/fp16/fp32, last dim contiguous, D in {64, 128}).
        lse: fp32 ``[n, Sq]``: natural-log LSE of each query row's scaled scores (from the dense pass).
        mode: ``"max"`` or ``"mean"`` (fp32 ``[n, ceil(Sq / block_m), Sk]``, natural log; see the module
            docstring), or ``"words"``: int32 ``[n, ceil(Sq / block_m), ceil(Sk / 32)]``, bit set where the
            block's max probability exceeds ``threshold``.
        precision: ``"exact"`` (q k^T in the input dtype) or ``"fp8"`` (e4m3 tensor cores; see above).
        impl: ``"kernels"`` (fgattn's Triton/CUDA kernels: CUDA tensors, or the interpreter) or ``"torch"``.
        launch: Triton launch overrides ``{"tile_n", "num_warps", "num_stages", "pair"}`` (benchmarks; ``pair``:
            a program handles two query blocks of at most 128 rows, sharing the key tiles it loads). Given,
            even empty, it selects the Triton kernel.
        kernel: ``"auto"`` (the CUDA kernel where ``cuda_kernel_applies`` and ``launch`` is None, else
            Triton), ``"triton"``, or ``"cuda"`` (``templates/cuda/block_stat_fp8.cu``; raises where it does
            not apply). Only the ``"kernels"`` impl has kernels.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    cuda_ok = impl == "kernels" and cuda_kernel_applies(q, block_m=block_m, mode=mode, precision=precision)
    if kernel == "cuda" and not cuda_ok:
        raise ValueError("kernel='cuda': the CUDA statistics kernel needs impl 'kernels', a Hopper GPU "
                         "(sm_90), precision 'fp8', mode 'words', block_m 128 and D in (64, 128)")
    if kernel == "cuda" or (kernel == "auto" and cuda_ok and launch is None):
        return _block_stat_cuda(q, k, lse, scale=scale, threshold=threshold)
    if impl == "torch":
        return _block_stat_torch(q, k, lse, block_m=block_m, scale=scale, mode=mode, precision=precision,
                                 threshold=threshold)
    return _block_stat_triton(q, k, lse, block_m=block_m, scale=scale, mode=mode, precision=precision,
                              threshold=threshold, launch=launch)
