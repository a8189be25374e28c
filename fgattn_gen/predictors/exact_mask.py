"""Predictor 2, training-free: the exact mask of one dense pass (computed at a few denoising steps, reused
in between by ``CachedMask``).

One refresh = the dense attention output (SDPA, which also returns each query row's LSE) plus a second pass
over q k^T that turns the exact softmax probabilities into a per (query block, key) statistic
(``block_stats``), from which each query block keeps:

- ``threshold`` (default ``0.5 / Sk``, half the uniform weight): the keys whose probability exceeds it for
  at least one query of the block (max over the block's rows);
- or ``top_p``: the smallest set of keys holding ``top_p`` of the block's attention mass (mean over its rows).

With ``block_n > 1`` a key group's statistic is the max (threshold) or the sum (top_p) over its keys, so
``block_n = 128`` gives the exact 128 x 128 block mask. Memory: the statistic is built a chunk of heads at a
time under ``workspace_budget()`` (for ``threshold`` with ``block_n == 1`` the kernel writes bits directly).
"""

from __future__ import annotations

import math

import torch

from ..compaction import workspace_budget
from ..keyset import KeySet
from . import checks
from .always_keep import always_keep_words
from .block_stats import PRECISIONS, block_stat
from .dense import dense_attention_with_lse
from .threshold_rule import head_thresholds
from .top_p_search import keeps_every_key, top_p_words
from .words import full_bits, pack_mask

SCORE_PRECISIONS = ("auto", *PRECISIONS)


def resolve_precision(score_precision: str, q: torch.Tensor) -> str:
    """``"auto"``: fp8 on CUDA GPUs with fp8 tensor cores (compute capability >= 8.9) for bf16/fp16 inputs,
    else exact."""
    if score_precision not in SCORE_PRECISIONS:
        raise ValueError(f"score_precision: expected one of {SCORE_PRECISIONS}, got {score_precision!r}")
    if score_precision != "auto":
        return score_precision
    fp8_cores = q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9)
    return "fp8" if fp8_cores and q.dtype != torch.float32 else "exact"


def _group_keys(stat: torch.Tensor, block_n: int, reduce: str) -> torch.Tensor:
    """``[n, nq, Sk]`` log statistic -> ``[n, nq, ceil(Sk / block_n)]``: max or log-sum-exp over each group."""
    if block_n == 1:
        return stat
    n, nq, seq_k = stat.shape
    groups = -(-seq_k // block_n)
    padded = torch.nn.functional.pad(stat, (0, groups * block_n - seq_k), value=float("-inf"))
    padded = padded.view(n, nq, groups, block_n)
    return padded.amax(-1) if reduce == "max" else torch.logsumexp(padded, -1)


def _heads_per_chunk(heads: int, seq_q: int, seq_k: int, d: int, block_m: int, impl: str,
                     words_only: bool = False) -> int:
    """Heads per statistics launch under ``workspace_budget()``. ``words_only`` (threshold rule, key groups
    of 1): no fp32 statistic, only the words and the operands' copies (fp32 bound, padding included)."""
    n_qblocks = -(-seq_q // block_m)
    if words_only:
        per_head = 4 * n_qblocks * -(-seq_k // 32) + 4 * (seq_q + seq_k + 512) * d + 16 * seq_q
    else:
        per_head = 4 * (2 * n_qblocks * seq_k + 2 * (seq_q + seq_k) * d)
    if impl == "torch":
        per_head += 8 * seq_q * seq_k  # fp32 score matrix and its padded copy
    return max(1, min(heads, workspace_budget() // per_head))


def exact_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = 128, block_n: int = 1,
               threshold: float | list[float] | None = None, top_p: float | None = None,
               keep_keys: tuple[int, int] | list[tuple[int, int]] | None = None, local_window: int | None = None,
               scale: float | None = None, score_precision: str = "auto", search_iters: int = 14,
               impl: str | None = None, dense_backend: str | None = None) -> tuple[torch.Tensor, KeySet]:
    """Dense attention output and the exact mask of its probabilities (see the module docstring).

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Sk, D]``; bf16/fp16 (fp32 too), same device, last dim contiguous,
            D in {64, 128}.
        block_m, block_n: KeySet query block and key group.
        threshold: keep a key whose probability exceeds this for some query of the block; in (0, 1].
            Default ``0.5 / Sk`` when ``top_p`` is None. Or a list (1-D tensor) of H such values, one per head
            (``calibrate``).
        top_p: instead keep the smallest set of keys holding this mass of the block's attention; in (0, 1].
        keep_keys, local_window: always-kept keys, as in ``pooled_top_p``.
        scale: softmax scale, default ``D ** -0.5``.
        score_precision: precision of the statistics pass: ``"exact"`` (input dtype), ``"fp8"`` (e4m3 tensor
            cores, CUDA sm89+ or the interpreter), or ``"auto"`` (fp8 where the GPU has it, see
            ``resolve_precision``). The output is always the exact dense output.
        search_iters: bisection steps of the top-p threshold search.
        impl: statistics pass: ``"kernels"`` (fgattn's Triton/CUDA kernels), ``"torch"`` or None (the kernels
            where they run).
        dense_backend: SDPA kernel of the dense pass (``dense.DENSE_BACKENDS``), None for the fastest.
    Returns:
        out ``[B, H, Sq, D]`` in q's dtype, and KeySet ``[B, H, ceil(Sq / block_m), ceil(Sk / block_n)]``.
    """
    checks.check_tensors(q=q, k=k, v=v)
    block_m = checks.check_positive_int(block_m, "block_m")
    block_n = checks.check_positive_int(block_n, "block_n")
    b, h, seq_q, d = q.shape
    seq_k = k.shape[2]
    if threshold is not None and top_p is not None:
        raise ValueError("threshold, top_p: give one of them (threshold on the max probability, or top_p of "
                         "the block's mass), not both")
    if top_p is not None:
        top_p = checks.check_top_p(top_p)
    else:
        threshold = head_thresholds(0.5 / seq_k if threshold is None else threshold, h)
    keep_keys = checks.check_keep_keys(keep_keys, seq_k)
    local_window = checks.check_local_window(local_window)
    scale = checks.check_scale(scale, d)
    search_iters = checks.check_search_iters(search_iters)
    impl = checks.resolve_impl(impl, q.device)
    precision = resolve_precision(score_precision, q)

    out, lse = dense_attention_with_lse(q, k, v, scale, backend=dense_backend)
    n_qblocks, n_kblocks = -(-seq_q // block_m), -(-seq_k // block_n)
    if top_p is not None and keeps_every_key(top_p):
        return out, KeySet(full_bits(b, h, n_qblocks, n_kblocks, q.device), n_kblocks, block_m, block_n)
    bits = torch.empty(b, h, n_qblocks, -(-n_kblocks // 32), dtype=torch.int32, device=q.device)
    chunk = _heads_per_chunk(h, seq_q, seq_k, d, block_m, impl, words_only=top_p is None and block_n == 1)
    for bi in range(b):
        for h0 in range(0, h, chunk):
            heads = slice(h0, min(h, h0 + chunk))
            args = (q[bi, heads], k[bi, heads], lse[bi, heads])
            opts = dict(block_m=block_m, scale=scale, precision=precision, impl=impl)
            if top_p is not None:
                mass = _group_keys(block_stat(*args, mode="mean", **opts), block_n, "sum")
                words = top_p_words(mass, top_p, rows_per_block=1, n_blocks=n_qblocks, iters=search_iters,
                                    impl=impl)
            elif block_n == 1 and isinstance(threshold, torch.Tensor):  # one threshold per head: a launch each
                words = torch.cat([block_stat(q[bi, i:i + 1], k[bi, i:i + 1], lse[bi, i:i + 1], mode="words",
                                              threshold=float(threshold[i]), **opts) for i in range(*heads.indices(h))])
            elif block_n == 1:
                words = block_stat(*args, mode="words", threshold=threshold, **opts)
            else:
                best = _group_keys(block_stat(*args, mode="max", **opts), block_n, "max")
                log_t = threshold[heads].to(best.device).log()[:, None, None] if isinstance(threshold, torch.Tensor) \
                    else math.log(threshold)
                words = pack_mask(best > log_t)
            bits[bi, heads] = words
    extra = always_keep_words(seq_q=seq_q, seq_k=seq_k, block_m=block_m, block_n=block_n, keep_keys=keep_keys,
                              local_window=local_window, device=q.device)
    if extra is not None:
        bits |= extra
    return out, KeySet(bits, n_kblocks, block_m, block_n)
