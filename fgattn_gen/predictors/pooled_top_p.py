"""Predictor 1, training-free: pooled-query top-p.

For every pooled query group (``pool`` consecutive queries, a divisor of the kernel's ``block_m``) the mean
query q̄ scores every key group (``block_n`` consecutive keys, pooled to their mean key k̄; a single key when
``block_n == 1``) with ``softmax(scale * q̄ . k̄)``, and keeps the smallest set of key groups whose mass
reaches ``top_p`` (``threshold.top_p_words``), or with ``threshold`` the key groups whose pooled probability
exceeds it (one absolute cut for every group: groups with peaked scores keep few keys, flat ones many, as in
the exact mask's threshold rule). A kernel query block keeps the union of its groups' keys.
A group whose queries are not similar to their mean (mean cosine similarity below ``sim_threshold``) cannot
be represented by q̄: its block keeps every key. With ``block_n = 128`` and ``pool = 128`` this is the
128 x 128 block predictor of SpargeAttn (pooled q̄ and k̄, top-p over blocks).

Everything runs on the inputs' device with no host synchronisation, a chunk of heads at a time so that the
fp32 score matrix ``[heads, ceil(Sq / pool), ceil(Sk / block_n)]`` stays under ``workspace_budget()``.
"""

from __future__ import annotations

import math

import torch

from ..compaction import workspace_budget
from ..keyset import KeySet
from . import checks
from .always_keep import always_keep_words
from .pooling import group_mean, group_mean_and_similarity
from .threshold import keeps_every_key, top_p_words
from .words import full_bits, pack_mask


def _pooled_scores(q_mean: torch.Tensor, k_mean: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``[n, Gq, Gk]`` = scale * q_mean @ k_mean^T, in the inputs' dtype (fp32 accumulation) on CUDA."""
    if q_mean.is_cuda and dtype != torch.float32:
        return torch.bmm((q_mean * scale).to(dtype), k_mean.to(dtype).transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q_mean.float() * scale, k_mean.float().transpose(1, 2))


def _heads_per_chunk(heads: int, seq_q: int, seq_k: int, d: int, pool: int, block_n: int,
                     threshold_rule: bool = False) -> int:
    """Heads whose fp32 workspace (scores, pooled queries, pooled keys) fits ``workspace_budget()``; the
    threshold rule adds 10 bytes per score (its bool masks and ``pack_mask``'s int64 bits, bounded)."""
    n_pool, n_kblocks = -(-seq_q // pool), -(-seq_k // block_n)
    score_bytes = 14 if threshold_rule else 4
    per_head = score_bytes * n_pool * n_kblocks + 4 * (2 * n_pool * d + (n_kblocks * d if block_n > 1 else 0))
    return max(1, min(heads, workspace_budget() // per_head))


def _threshold_words(scores: torch.Tensor, threshold: float, groups_per_block: int, n_blocks: int,
                     keep_all: torch.Tensor) -> torch.Tensor:
    """Scores fp32 ``[n, G, Gk]`` -> int32 words ``[n, n_blocks, ceil(Gk / 32)]``: key group j of block b is
    kept where ``softmax(scores[g])[j] > threshold`` for a group g of the block, or everywhere in
    ``keep_all`` bool ``[n, n_blocks]`` blocks."""
    n, groups, _ = scores.shape
    keep = scores > (scores.logsumexp(-1, keepdim=True) + math.log(threshold))
    keep = torch.nn.functional.pad(keep, (0, 0, 0, n_blocks * groups_per_block - groups))
    keep = keep.view(n, n_blocks, groups_per_block, -1).any(2) | keep_all[..., None]
    return pack_mask(keep)


def pooled_top_p(q: torch.Tensor, k: torch.Tensor, *, block_m: int = 128, block_n: int = 1,
                 top_p: float | None = None, threshold: float | None = None,
                 sim_threshold: float = 0.6, pool: int | None = None,
                 keep_keys: tuple[int, int] | list[tuple[int, int]] | None = None,
                 local_window: int | None = None, scale: float | None = None, search_iters: int = 14,
                 backend: str | None = None) -> KeySet:
    """Predict each query block's keys from pooled queries (see the module docstring).

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Sk, D]``; bf16, fp16 or fp32, same device, last dim contiguous.
        block_m: queries per KeySet query block (the kernel's).
        block_n: keys per key group; groups are scored by their mean key.
        top_p: probability mass to keep per pooled query group, in (0, 1]; 1 keeps every key. Default 0.9
            when ``threshold`` is None.
        threshold: instead keep the key groups whose pooled probability exceeds this, in (0, 1] (e.g. a few
            times the uniform ``1 / ceil(Sk / block_n)``).
        sim_threshold: in [-1, 1]; a group whose mean cosine similarity to q̄ is below it keeps every key
            (-1 turns the gate off).
        pool: queries per pooled group, a divisor of ``block_m`` (default ``block_m``).
        keep_keys: key token range ``(start, end)`` (end exclusive), or a list of them, that every block
            keeps (e.g. the text tokens of joint attention).
        local_window: None, or w: query block ``[qs, qe)`` also keeps the keys in ``[qs - w, qe + w)``.
        scale: softmax scale of the pooled scores, default ``D ** -0.5``.
        search_iters: bisection steps of the top-p threshold search (``threshold`` module).
        backend: ``"triton"`` (CUDA, or CPU with TRITON_INTERPRET=1), ``"torch"``, or None (Triton when it
            can run, else torch).
    Returns:
        KeySet ``[B, H, ceil(Sq / block_m), ceil(Sk / block_n)]`` on q's device.
    """
    checks.check_tensors(q=q, k=k)
    block_m = checks.check_positive_int(block_m, "block_m")
    block_n = checks.check_positive_int(block_n, "block_n")
    if threshold is not None and top_p is not None:
        raise ValueError("threshold, top_p: give one of them (a cut on each pooled probability, or the top_p "
                         "mass of each pooled group), not both")
    if threshold is not None:
        threshold = checks.check_threshold(threshold)
    else:
        top_p = checks.check_top_p(0.9 if top_p is None else top_p)
    sim_threshold = checks.check_sim_threshold(sim_threshold)
    pool = checks.check_pool(pool, block_m)
    search_iters = checks.check_search_iters(search_iters)
    backend = checks.resolve_backend(backend, q.device)
    b, h, seq_q, d = q.shape
    seq_k = k.shape[2]
    keep_keys = checks.check_keep_keys(keep_keys, seq_k)
    local_window = checks.check_local_window(local_window)
    scale = checks.check_scale(scale, d)
    n_qblocks, n_kblocks = -(-seq_q // block_m), -(-seq_k // block_n)
    if top_p is not None and keeps_every_key(top_p):
        return KeySet(full_bits(b, h, n_qblocks, n_kblocks, q.device), n_kblocks, block_m, block_n)
    groups_per_block = block_m // pool
    bits = torch.empty(b, h, n_qblocks, -(-n_kblocks // 32), dtype=torch.int32, device=q.device)
    chunk = _heads_per_chunk(h, seq_q, seq_k, d, pool, block_n, threshold_rule=threshold is not None)
    for bi in range(b):
        for h0 in range(0, h, chunk):
            heads = slice(h0, min(h, h0 + chunk))
            q_mean, similarity = group_mean_and_similarity(q[bi, heads], pool, backend=backend)
            k_mean = k[bi, heads] if block_n == 1 else group_mean(k[bi, heads], block_n, backend=backend)
            dissimilar = torch.nn.functional.pad(similarity < sim_threshold,
                                                 (0, n_qblocks * groups_per_block - similarity.shape[-1]))
            gate = dissimilar.view(-1, n_qblocks, groups_per_block).any(-1)
            scores = _pooled_scores(q_mean, k_mean, scale, q.dtype)
            if threshold is not None:
                bits[bi, heads] = _threshold_words(scores, threshold, groups_per_block, n_qblocks, gate)
            else:
                bits[bi, heads] = top_p_words(scores, top_p, rows_per_block=groups_per_block, n_blocks=n_qblocks,
                                              iters=search_iters, backend=backend, keep_all=gate)
    extra = always_keep_words(seq_q=seq_q, seq_k=seq_k, block_m=block_m, block_n=block_n, keep_keys=keep_keys,
                              local_window=local_window, device=q.device)
    if extra is not None:
        bits |= extra
    return KeySet(bits, n_kblocks, block_m, block_n)
