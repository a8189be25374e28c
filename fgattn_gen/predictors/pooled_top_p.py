"""Predictor 1, training-free: pooled-query top-p.

For every pooled query group (``pool`` consecutive queries, a divisor of the kernel's ``block_m``) the mean
query q̄ scores every key group (``block_n`` consecutive keys, pooled to their mean key k̄; a single key when
``block_n == 1``) with ``softmax(scale * q̄ . k̄)``, and keeps the smallest set of key groups whose mass
reaches ``top_p`` (``top_p_search.top_p_words``), or with ``threshold`` the key groups whose pooled probability
exceeds it (``threshold_rule.pooled_threshold_words``; one absolute cut for every group: groups with peaked scores
keep few keys, flat ones many, as in the exact mask's threshold rule). A kernel query block keeps the union
of its groups' keys.
With ``query_variance`` the pooled logit gets the second-order term of the group's spread,
``scale^2 / 2 * sum_d var_d k̄_d^2`` (var: per-dim variance of the group's queries): the log-normal estimate of
the group's mean ``exp(scale q_i . k̄)``, which raises keys that the group's queries disagree on.
A group whose queries are not similar to their mean (mean cosine similarity below ``sim_threshold``) cannot
be represented by q̄: its block keeps every key. With ``block_n = 128`` and ``pool = 128`` this is the
128 x 128 block predictor of SpargeAttn (pooled q̄ and k̄, top-p over blocks).

Everything runs on the inputs' device with no host synchronisation, a chunk of heads at a time so that the
fp32 score matrix ``[heads, ceil(Sq / pool), ceil(Sk / block_n)]`` stays under ``workspace_budget()``.
"""

from __future__ import annotations

import torch

from ..compaction import workspace_budget
from ..keyset import KeySet
from . import checks
from .always_keep import always_keep_words
from .empty_watch import EmptyWatch
from .pooling import group_mean, group_mean_and_similarity, group_mean_similarity_variance, pooled_scores
from .threshold_rule import device_thresholds, pooled_threshold_words, runs_fused
from .top_p_search import keeps_every_key, top_p_words
from .words import full_bits


def _heads_per_chunk(heads: int, seq_q: int, seq_k: int, d: int, pool: int, block_m: int, block_n: int, *,
                     score_bytes: int, key_copies: int) -> int:
    """Heads whose workspace fits ``workspace_budget()``: ``score_bytes`` per pooled score, the fp32 pooled
    queries and their variance, ``key_copies`` fp32 ``[Gk, D]`` key tensors, and two int32 copies of the
    chunk's KeySet words (the words and the gate's ``torch.where``)."""
    n_pool, n_kblocks = -(-seq_q // pool), -(-seq_k // block_n)
    words = -(-seq_q // block_m) * -(-n_kblocks // 32)
    per_head = score_bytes * n_pool * n_kblocks + 4 * (3 * n_pool * d + key_copies * n_kblocks * d + 2 * words)
    return max(1, min(heads, workspace_budget() // per_head))


_EMPTY = EmptyWatch("pooled_top_p", "threshold")


def _score_bytes(threshold_rule: bool, query_variance: bool, impl: str, rows_per_block: int) -> int:
    """Workspace per pooled score: fp32 scores (twice with the variance term), plus 10 bytes for the torch
    threshold rule's bool masks and packed bits; none for the fused threshold kernel."""
    if threshold_rule and runs_fused(impl, rows_per_block):
        return 0
    return 4 + 4 * query_variance + 10 * threshold_rule


def pooled_top_p(q: torch.Tensor, k: torch.Tensor, *, block_m: int = 128, block_n: int = 1,
                 top_p: float | None = None, threshold: float | list[float] | None = None,
                 sim_threshold: float = 0.6, pool: int | None = None,
                 keep_keys: tuple[int, int] | list[tuple[int, int]] | None = None,
                 local_window: int | None = None, scale: float | None = None, search_iters: int = 14,
                 query_variance: bool = False, impl: str | None = None) -> KeySet:
    """Predict each query block's keys from pooled queries (see the module docstring).

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Sk, D]``; bf16, fp16 or fp32, same device, last dim contiguous.
        block_m: queries per KeySet query block (the kernel's).
        block_n: keys per key group; groups are scored by their mean key.
        top_p: probability mass to keep per pooled query group, in (0, 1]; 1 keeps every key. Default 0.9
            when ``threshold`` is None.
        threshold: instead keep the key groups whose pooled probability exceeds this, in (0, 1] (e.g. a few
            times the uniform ``1 / ceil(Sk / block_n)``); or a list (1-D tensor) of H such values, one per head.
        sim_threshold: in [-1, 1]; a group whose mean cosine similarity to q̄ is below it keeps every key
            (-1 turns the gate off).
        pool: queries per pooled group, a divisor of ``block_m`` (default ``block_m``).
        keep_keys: key token range ``(start, end)`` (end exclusive), or a list of them, that every block
            keeps (e.g. the text tokens of joint attention).
        local_window: None, or w: query block ``[qs, qe)`` also keeps the keys in ``[qs - w, qe + w)``.
        scale: softmax scale of the pooled scores, default ``D ** -0.5``.
        search_iters: bisection steps of the top-p threshold search (``threshold`` module).
        query_variance: add the groups' variance term to the pooled logits (module docstring); one more
            ``[G, D] x [D, Gk]`` product.
        impl: ``"kernels"`` (fgattn's Triton/CUDA kernels: CUDA, or CPU with TRITON_INTERPRET=1), ``"torch"``
            (torch ops), or None (the kernels where they run, else torch).
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
        threshold = device_thresholds(threshold, q.shape[1], q.device)
    else:
        top_p = checks.check_top_p(0.9 if top_p is None else top_p)
    sim_threshold = checks.check_sim_threshold(sim_threshold)
    pool = checks.check_pool(pool, block_m)
    search_iters = checks.check_search_iters(search_iters)
    query_variance = checks.check_bool(query_variance, "query_variance")
    impl = checks.resolve_impl(impl, q.device)
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
    chunk = _heads_per_chunk(h, seq_q, seq_k, d, pool, block_m, block_n,
                             score_bytes=_score_bytes(threshold is not None, query_variance, impl,
                                                      groups_per_block),
                             # pooled keys and their dtype copy; fp32 keys and their squares (torch paths)
                             key_copies=2 * (block_n > 1) + 2 * query_variance)
    for bi in range(b):
        for h0 in range(0, h, chunk):
            heads = slice(h0, min(h, h0 + chunk))
            q_var = None
            if query_variance:
                q_mean, similarity, q_var = group_mean_similarity_variance(q[bi, heads], pool, impl=impl)
            else:
                q_mean, similarity = group_mean_and_similarity(q[bi, heads], pool, impl=impl)
            k_mean = k[bi, heads] if block_n == 1 else group_mean(k[bi, heads], block_n, impl=impl)
            dissimilar = torch.nn.functional.pad(similarity < sim_threshold,
                                                 (0, n_qblocks * groups_per_block - similarity.shape[-1]))
            gate = dissimilar.view(-1, n_qblocks, groups_per_block).any(-1)
            if threshold is not None:
                head_threshold = threshold[heads] if isinstance(threshold, torch.Tensor) else threshold
                bits[bi, heads] = pooled_threshold_words(q_mean, k_mean, scale, head_threshold,
                                                         rows_per_block=groups_per_block, n_blocks=n_qblocks,
                                                         impl=impl, dtype=q.dtype, q_var=q_var,
                                                         keep_all=gate)
            else:
                scores = pooled_scores(q_mean, k_mean, scale, q.dtype, q_var=q_var)
                bits[bi, heads] = top_p_words(scores, top_p, rows_per_block=groups_per_block, n_blocks=n_qblocks,
                                              iters=search_iters, impl=impl, keep_all=gate)
    extra = always_keep_words(seq_q=seq_q, seq_k=seq_k, block_m=block_m, block_n=block_n, keep_keys=keep_keys,
                              local_window=local_window, device=q.device)
    if extra is not None:
        bits |= extra
    keys = KeySet(bits, n_kblocks, block_m, block_n)
    if threshold is not None:
        _EMPTY.watch(keys, "(per head)" if isinstance(threshold, torch.Tensor) else f"{threshold:g}")
    return keys
