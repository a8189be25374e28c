"""Sequence parallelism: Ulysses.

Each of the P ranks of a process group holds one sequence shard of q, k, v, ``[B, H, S/P, D]``. One
all-to-all over the group trades sequence shards for head shards, so each rank holds all S tokens of H/P
heads; attention runs there unchanged (a KeySet's rows and a predictor are per head), and the inverse
all-to-all brings the output back to the rank's sequence shard. Communication is
``torch.distributed.all_to_all_single``: NCCL on GPUs, gloo on the CPU (the tests).

``ulysses_attention`` is ``attention()`` this way, for engines that drive torch.distributed themselves (xDiT,
custom loops). ``ulysses_apply`` is the exchange around any attention function; the diffusers processors
(``integrations``) run it over the group of diffusers' context parallelism, with the shard made of segments
(HunyuanVideo: the rank's video tokens, then its text tokens).
"""

from __future__ import annotations

import functools

from typing import Callable

import torch

from .attention_api import attention
from .keyset import KeySet
from .query_order import check_permutation, mark_permutation



def _group_size_and_rank(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: ulysses_attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``all_to_all_single`` of a contiguous ``[P, ...]`` tensor: slice j goes to rank j, slice j of the result
    came from rank j. On gloo the payload travels as its bytes (a uint8 view: exact, and independent of which
    float dtypes the installed gloo accepts)."""
    import torch.distributed as dist

    send = x.view(torch.uint8) if dist.get_backend(group) == "gloo" else x
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(x.dtype) if recv.dtype != x.dtype else recv


@functools.lru_cache(maxsize=64)
def _segment_order(segments: tuple[int, ...], world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 ``[P*s]`` positions in the rank-major sequence of the segment-major tokens, its inverse), made
    once per (segments, P, device) (a prompt length is a new key: bounded) on the host and copied: under CUDA
    graph capture a first call fails loudly instead of caching tensors that only a replay would fill."""
    shard = sum(segments)
    starts = [sum(segments[:i]) for i in range(len(segments))]
    rank_starts = torch.arange(world)[:, None] * shard
    order = torch.cat([(rank_starts + start + torch.arange(n)).flatten() for start, n in zip(starts, segments)])
    return order.to(device), torch.argsort(order).to(device)


def rank_major(x: torch.Tensor, segments: tuple[int, ...], world: int, dim: int) -> torch.Tensor:
    """Reorder dim ``dim`` of x (``P * sum(segments)`` long) from segment-major to rank-major.

    Segment-major is the model's order (segment 0 of every rank's shard in rank order, then segment 1, ...:
    HunyuanVideo's ``[video; text]``); rank-major is the order of the shards themselves (rank 0's segments,
    then rank 1's), which is what an all-to-all over the shards gathers. x itself with one segment.
    ``segments``: the positive token counts of one rank's segments; x any dtype, its other dims unchanged.
    """
    if len(segments) == 1:
        return x
    return x.index_select(dim, _segment_order(segments, world, x.device)[1])


def _segment_major(x: torch.Tensor, segments: tuple[int, ...], world: int, dim: int) -> torch.Tensor:
    """The inverse of ``rank_major``."""
    if len(segments) == 1:
        return x
    return x.index_select(dim, _segment_order(segments, world, x.device)[0])


def _check_shards(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a tensor [B, H, S/P, D], got "
                             f"{type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: Ulysses needs q, k, v shards of one shape and dtype, got q "
                         f"{tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}")
    if q.shape[1] % world:
        raise ValueError(f"q: Ulysses needs the head count divisible by the group size; q has "
                         f"H={q.shape[1]} heads over P={world} ranks")


def _exchange(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Callable, group, world: int,
              segments: tuple[int, ...]) -> torch.Tensor:
    """The two all-to-alls around ``attend`` (checked arguments; see ``ulysses_apply``)."""
    b, h, s_local, d = q.shape
    hp = h // world
    # [B, H, s, D] -> [P, 3, B, H/P, s, D]: slice j (head chunk j of q, k, v) goes to rank j
    send = torch.stack([t.reshape(b, world, hp, s_local, d) for t in (q, k, v)]).permute(2, 0, 1, 3, 4, 5)
    recv = _all_to_all(send.contiguous(), group)  # [P, 3, B, H/P, s, D]: slice j = sequence shard j
    full = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, hp, world * s_local, d)  # [3, B, H/P, S, D], rank-major
    full = _segment_major(full, segments, world, dim=3)
    out = attend(full[0], full[1], full[2])
    if out.shape != (b, hp, world * s_local, d):
        raise RuntimeError(f"attend: expected an output [B, H/P, S, D] = {(b, hp, world * s_local, d)}, got "
                           f"{tuple(out.shape)}")
    out = rank_major(out, segments, world, dim=2)
    # [B, H/P, S, D] -> [P, B, H/P, s, D]: sequence shard j goes back to rank j
    send = out.reshape(b, hp, world, s_local, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = _all_to_all(send, group)  # [P, B, H/P, s, D]: slice j = head chunk j of this rank's shard
    return recv.permute(1, 0, 2, 3, 4).reshape(b, h, s_local, d)


def ulysses_apply(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], *, group=None,
                  segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """Any attention function over a sequence sharded across the ranks of ``group`` (Ulysses all-to-all).

    Every rank of ``group`` calls this with its own shard, in the same order (it runs collectives).

    Args:
        q, k, v: this rank's shard ``[B, H, s, D]``, one shape and dtype on every rank (any strides); H
            divisible by the group size P (ValueError naming ``q``).
        attend: ``attend(q, k, v)`` on ``[B, H/P, P*s, D]`` (this rank's heads, every token, contiguous) ->
            ``[B, H/P, P*s, D]``.
        group: the process group (default: the world group).
        segments: the shard as consecutive segments, lengths summing to s (default: one segment). ``attend``
            then sees the segment-major order: segment 0 of every rank in rank order, then segment 1, ... —
            the model's order when the model shards each segment evenly (HunyuanVideo under diffusers:
            ``(video tokens, text tokens)`` of the shard gives ``[video; text]``).
    Returns:
        ``[B, H, s, D]``: this rank's shard of ``attend``'s output, in its dtype.
    """
    world, _ = _group_size_and_rank(group)
    _check_shards(q, k, v, world)
    s_local = q.shape[2]
    segments = (s_local,) if segments is None else tuple(segments)
    if not segments or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in segments) \
            or sum(segments) != s_local:
        raise ValueError(f"segments: expected positive ints summing to the shard length s={s_local}, got {segments}")
    return _exchange(q, k, v, attend, group, world, segments)


def _shard_keys(keys: KeySet, heads: int, world: int, rank: int) -> KeySet:
    """The rows of this rank's heads of a KeySet over all ``heads`` heads and the full sequence."""
    if not isinstance(keys, KeySet):
        raise TypeError(f"keys: expected a fgattn_gen.KeySet, got {type(keys).__name__}")
    if keys.bits.shape[1] != heads:
        raise ValueError(f"keys: ulysses_attention takes a KeySet over all heads and the full sequence "
                         f"(H={heads} heads), got one with {keys.bits.shape[1]} heads")
    per_rank = heads // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    order = None
    if keys.query_order is not None:  # the rows of a checked permutation are permutations: no check per rank
        check_permutation(keys.query_order)
        order = mark_permutation(keys.query_order[:, rows].contiguous())
    return KeySet(keys.bits[:, rows].contiguous(), keys.n_kblocks, keys.block_m, keys.block_n,
                  keys.density_hint, order)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet | None = None, *,
                      predictor=None, group=None, scale: float | None = None) -> torch.Tensor:
    """``attention()`` over a sequence sharded across the ranks of ``group`` (Ulysses all-to-all).

    Every rank of ``group`` calls this with its own shard, in the same order (it runs collectives).

    Args:
        q, k, v: this rank's sequence shard ``[B, H, S/P, D]``, bf16 or fp16, same shape, dtype and device
            on every rank (P = the group's size; rank r holds tokens ``r*S/P .. (r+1)*S/P - 1``); any strides.
            H must be divisible by P (ValueError naming ``q`` otherwise). S must be divisible by P: every
            rank must pass the same shard length (not checked, as that would cost another collective; a
            ragged tail is to be padded by the caller, whose padding keys the KeySet or predictor must then
            leave out, e.g. ``keep_keys``/masks that never select them).
        keys: a KeySet over the FULL sequence and ALL heads, ``[B, H, ceil(S/block_m), ceil(S/block_n)]``,
            the same on every rank: each rank takes the rows of its heads (``bits[:, r*H/P:(r+1)*H/P]``, and
            the same rows of ``query_order`` when the KeySet has one; its query indices refer to the full
            sequence, which is what each rank holds after the all-to-all). Or None with ``predictor``.
        predictor: as in ``attention()``; it runs on each rank over the full sequence of that rank's H/P
            heads (predictors are per head, so the keys are those of the single-process call). A stateful
            predictor (``CachedMask``) then keeps only its rank's heads.
        group: the process group (default: the world group).
        scale: softmax scale, default ``D ** -0.5``.
    Returns:
        out ``[B, H, S/P, D]`` in q's dtype, on q's device: this rank's shard of the attention output.

    Cost: one all-to-all of q, k, v stacked together (a copy of the three shards to send, one to receive)
    and one of the output; no host synchronisation beyond what the collectives themselves need.
    """
    world, rank = _group_size_and_rank(group)
    _check_shards(q, k, v, world)
    if (keys is None) == (predictor is None):
        raise ValueError("keys: pass either keys (a KeySet) or predictor=, not both and not neither")
    if keys is not None:
        keys = _shard_keys(keys, q.shape[1], world, rank)

    def attend(q_heads, k_heads, v_heads):
        return attention(q_heads, k_heads, v_heads, keys, predictor=predictor, scale=scale)

    return _exchange(q, k, v, attend, group, world, (q.shape[2],))
