"""Top-p key selection, shared by the predictors: per row of scores, the smallest set of keys whose softmax
mass reaches ``top_p``, found by searching the threshold value instead of sorting.

For a row of scores s (probabilities p = softmax(s)), the kept keys are ``{j : p_j >= tau}`` with tau the
largest value such that the kept mass reaches ``top_p``. With e = exp(s - max s) and Z = sum(e), the search
keeps ``lo <= log tau < hi`` in the log domain, from ``lo = log((1 - top_p) Z / n) - 1`` (the keys below
exp(lo) hold less than ``1 - top_p`` of the mass together, so ``tau`` is above it) and ``hi = 1``, and halves
the interval ``iters`` times; the kept keys are those with ``e >= exp(lo)``. The kept mass therefore always
reaches ``top_p``; keys within ``(hi - lo) / 2**iters`` (in log probability) below tau may be kept too.

Rows belong to blocks (``rows_per_block`` consecutive rows each, e.g. the pooled sub-blocks of one kernel
query block); a block keeps the union of its rows' keys. The result is written as KeySet words.

GPU: a CUDA block per (block, head) walks its rows (``templates/cuda/top_p_words.cu``, built with NVRTC); a
row of up to ``CUDA_RESIDENT_KEYS`` keys is held in registers, loaded once, and bisected there, one block
reduction per step, and its words are written by warp ballots. Interpreter, and longer rows on the GPU: a
Triton program per (block, head), the row in registers up to ``RESIDENT_KEYS`` keys, else streamed in
chunks, ``_PROBES`` thresholds per pass, so a pass narrows the interval ``_PROBES + 1``-fold.
CPU without the interpreter: the same search in torch ops.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from .. import nvrtc
from ..environment import templates_dir
from .words import full_row_words, pack_mask

CUDA_RESIDENT_KEYS = 32768  # GPU: rows up to this many keys go to the CUDA kernel (512 threads x 64 keys)
RESIDENT_KEYS = 32768  # Triton: rows up to this many keys are searched in registers
_CHUNK_WORDS = 64  # streamed rows: words (x32 keys) per chunk
_PROBES = 8  # streamed rows: thresholds tried per pass over the row


def keeps_every_key(top_p: float) -> bool:
    """True when ``top_p`` is 1 in fp32 (the search's precision): every key is kept, no search runs."""
    return float(np.float32(top_p)) == 1.0


@triton.jit
def _or_words(out_words, w, lane, keep, n_words):
    """OR the packed ``keep`` [W, 32] into ``out_words[w]`` (bit j of word w = key 32 w + j)."""
    words = tl.xor_sum(keep.to(tl.int32) << lane[None, :], 1)
    ok = w < n_words
    old = tl.load(out_words + w, mask=ok, other=0)
    tl.store(out_words + w, old | words, mask=ok)


@triton.jit
def _resident_row(s_row, out_words, n_keys, n_words, top_p, STEPS: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    """Bisection with the whole row in registers. Padding keys (e = 0) are never kept: z >= 1 and
    top_p < 1 in fp32 put lo above log(2**-24 / n_keys) - 1, so exp(lo) > 0."""
    w = tl.arange(0, BLOCK_WORDS)
    lane = tl.arange(0, 32)
    offs = w[:, None] * 32 + lane[None, :]
    valid = offs < n_keys
    s = tl.load(s_row + offs, mask=valid, other=float("-inf"))
    e = tl.exp(s - tl.max(tl.max(s, 1), 0))
    z = tl.sum(tl.sum(e, 1), 0)
    target = top_p * z
    lo = tl.log((1.0 - top_p) * z / n_keys) - 1.0
    hi = tl.full((), 1.0, tl.float32)
    for _ in range(STEPS):
        t = 0.5 * (lo + hi)
        mass = tl.sum(tl.sum(tl.where(e >= tl.exp(t), e, 0.0), 1), 0)
        ok = mass >= target
        lo = tl.where(ok, t, lo)
        hi = tl.where(ok, hi, t)
    _or_words(out_words, w, lane, e >= tl.exp(lo), n_words)


@triton.jit
def _streamed_row(s_row, out_words, n_keys, n_words, top_p, STEPS: tl.constexpr, BLOCK_WORDS: tl.constexpr,
                  PROBES: tl.constexpr):
    """The same search for rows too long for registers: STEPS passes over the row, PROBES thresholds each."""
    chunk = tl.arange(0, BLOCK_WORDS * 32)
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.full((), 0.0, tl.float32)
    for c0 in range(0, n_keys, BLOCK_WORDS * 32):
        s = tl.load(s_row + c0 + chunk, mask=c0 + chunk < n_keys, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), 0)
        m = m_new
    target = top_p * z
    lo = tl.log((1.0 - top_p) * z / n_keys) - 1.0
    hi = tl.full((), 1.0, tl.float32)
    probe = tl.arange(0, PROBES)
    for _ in range(STEPS):
        t = lo + (hi - lo) * (probe + 1).to(tl.float32) / (PROBES + 1)
        te = tl.exp(t)
        mass = tl.zeros([PROBES], tl.float32)
        for c0 in range(0, n_keys, BLOCK_WORDS * 32):
            s = tl.load(s_row + c0 + chunk, mask=c0 + chunk < n_keys, other=float("-inf"))
            e = tl.exp(s - m)
            mass += tl.sum(tl.where(e[:, None] >= te[None, :], e[:, None], 0.0), 0)
        n_ok = tl.sum((mass >= target).to(tl.int32), 0)  # masses fall with t: probes 0 .. n_ok-1 reach target
        new_lo = tl.sum(tl.where(probe == n_ok - 1, t, 0.0), 0)
        new_hi = tl.sum(tl.where(probe == n_ok, t, 0.0), 0)
        lo = tl.where(n_ok > 0, new_lo, lo)
        hi = tl.where(n_ok < PROBES, new_hi, hi)
    threshold = tl.exp(lo)
    w = tl.arange(0, BLOCK_WORDS)
    lane = tl.arange(0, 32)
    for w0 in range(0, n_words, BLOCK_WORDS):
        offs = (w0 + w)[:, None] * 32 + lane[None, :]
        valid = offs < n_keys
        s = tl.load(s_row + offs, mask=valid, other=float("-inf"))
        _or_words(out_words + w0, w, lane, (tl.exp(s - m) >= threshold) & valid, n_words - w0)


@triton.jit
def _top_p_words_kernel(S, WORDS, n_rows, n_keys, n_words, rows_per_block, top_p, STEPS: tl.constexpr,
                        BLOCK_WORDS: tl.constexpr, RESIDENT: tl.constexpr, PROBES: tl.constexpr):
    """S: fp32 [n, n_rows, n_keys]; WORDS: int32 [n, n_blocks, n_words], zeroed. Program (block, n)."""
    blk = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    first = blk * rows_per_block
    out_words = WORDS + (n * tl.num_programs(0) + blk) * n_words
    for r in range(first, tl.minimum(first + rows_per_block, n_rows)):
        s_row = S + (n * n_rows + r) * n_keys
        if RESIDENT:
            _resident_row(s_row, out_words, n_keys, n_words, top_p, STEPS, BLOCK_WORDS)
        else:
            _streamed_row(s_row, out_words, n_keys, n_words, top_p, STEPS, BLOCK_WORDS, PROBES)


def _top_p_words_triton(scores: torch.Tensor, top_p: float, rows_per_block: int, n_blocks: int, iters: int,
                        num_warps: int | None) -> torch.Tensor:
    n, n_rows, n_keys = scores.shape
    n_words = triton.cdiv(n_keys, 32)
    words = torch.zeros(n, n_blocks, n_words, dtype=torch.int32, device=scores.device)
    resident = n_keys <= RESIDENT_KEYS
    if resident:
        block_words, steps = triton.next_power_of_2(n_words), iters
        default_warps = max(1, min(16, block_words // 64))
    else:
        block_words, steps = _CHUNK_WORDS, math.ceil(iters / math.log2(_PROBES + 1))
        default_warps = 8
    _top_p_words_kernel[(n_blocks, n)](
        scores, words, n_rows, n_keys, n_words, rows_per_block, top_p,
        STEPS=steps, BLOCK_WORDS=block_words, RESIDENT=resident, PROBES=_PROBES,
        num_warps=num_warps or default_warps,
    )
    return words


def _cuda_launch_shape(n_keys: int) -> tuple[int, int]:
    """(threads, keys per thread) of the CUDA kernel for rows of ``n_keys``: at most 64 keys per thread
    (registers), keys per thread a multiple of 8 so few variants get compiled."""
    threads = min(512, max(128, triton.next_power_of_2(triton.cdiv(n_keys, 64))))
    return threads, 8 * triton.cdiv(triton.cdiv(n_keys, threads), 8)


@functools.cache
def _top_p_kernel(device_index: int, threads: int, elems: int) -> nvrtc.CudaKernel:
    """The CUDA kernel for one launch shape, looked up once (the predictor runs on every denoising step)."""
    return nvrtc.load_kernel(templates_dir() / "cuda" / "top_p_words.cu", "fgattn_top_p_words", device_index,
                             (("FGATTN_TOPP_THREADS", threads), ("FGATTN_TOPP_ELEMS", elems)))


def _top_p_words_cuda(scores: torch.Tensor, top_p: float, rows_per_block: int, n_blocks: int, iters: int,
                      keep_all: torch.Tensor) -> torch.Tensor:
    n, n_rows, n_keys = scores.shape
    n_words = triton.cdiv(n_keys, 32)
    threads, elems = _cuda_launch_shape(n_keys)
    device = scores.device.index if scores.device.index is not None else torch.cuda.current_device()
    kernel = _top_p_kernel(device, threads, elems)
    words = torch.empty(n, n_blocks, n_words, dtype=torch.int32, device=scores.device)
    kernel((n_blocks, n, 1), (threads, 1, 1), scores, keep_all, words, n_rows, n_keys, n_words, rows_per_block,
           float(top_p), iters)
    return words


def _top_p_words_torch(scores: torch.Tensor, top_p: float, rows_per_block: int, n_blocks: int,
                       iters: int) -> torch.Tensor:
    n, n_rows, n_keys = scores.shape
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    z = e.sum(-1)
    target = top_p * z
    lo = torch.log((1.0 - top_p) * z / n_keys) - 1.0
    hi = torch.ones_like(lo)
    for _ in range(iters):
        t = 0.5 * (lo + hi)
        ok = torch.where(e >= torch.exp(t)[..., None], e, 0.0).sum(-1) >= target
        lo = torch.where(ok, t, lo)
        hi = torch.where(ok, hi, t)
    keep = e >= torch.exp(lo)[..., None]
    keep = torch.nn.functional.pad(keep, (0, 0, 0, n_blocks * rows_per_block - n_rows))
    blocks = keep.view(n, n_blocks, rows_per_block, n_keys).any(2)
    return pack_mask(blocks)


def top_p_words(scores: torch.Tensor, top_p: float, *, rows_per_block: int, n_blocks: int, iters: int,
                impl: str, keep_all: torch.Tensor | None = None, num_warps: int | None = None) -> torch.Tensor:
    """KeySet words of the top-p keys of each row, OR-ed over each block's rows (no host sync).

    Args:
        scores: fp32 ``[n, R, n_keys]``, contiguous: logits (softmax is taken over the last dim).
        top_p: mass to reach, in (0, 1); callers handle ``keeps_every_key(top_p)`` themselves.
        rows_per_block: rows per block; block i owns rows ``[i * rows_per_block, (i + 1) * rows_per_block)``.
        n_blocks: number of blocks, ``>= ceil(R / rows_per_block)`` (blocks past the rows stay empty).
        iters: bisection steps (resolution of the threshold, see the module docstring).
        impl: ``"kernels"`` (fgattn's Triton/CUDA kernels: CUDA tensors, or the interpreter) or ``"torch"``.
        keep_all: optional bool ``[n, n_blocks]``: these blocks keep every key (the CUDA kernel skips
            their search).
        num_warps: Triton launch override (benchmarks; it selects the Triton kernel on the GPU too); default
            by row length.
    Returns:
        int32 ``[n, n_blocks, ceil(n_keys / 32)]``.
    """
    n, _, n_keys = scores.shape
    if impl == "kernels" and scores.is_cuda and n_keys <= CUDA_RESIDENT_KEYS and num_warps is None:
        if keep_all is None:
            keep_all = torch.zeros(n, n_blocks, dtype=torch.bool, device=scores.device)
        return _top_p_words_cuda(scores.contiguous(), top_p, rows_per_block, n_blocks, iters,
                                 keep_all.contiguous())
    if impl == "kernels":
        words = _top_p_words_triton(scores, top_p, rows_per_block, n_blocks, iters, num_warps)
    else:
        words = _top_p_words_torch(scores, top_p, rows_per_block, n_blocks, iters)
    if keep_all is not None:
        words = torch.where(keep_all[..., None], full_row_words(n_keys, scores.device), words)
    return words
