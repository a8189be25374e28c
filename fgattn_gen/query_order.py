"""Clustered query blocks: a KeySet's ``query_order`` permutes each head's queries so that a block of
``block_m`` holds similar ones. ``attention`` runs the kernels on the gathered rows and scatters the output
back, two passes over q and out (the kernels themselves are unchanged, so is their rate)."""

from __future__ import annotations

import torch


_CHECKED = "_fgattn_permutation_version"  # attribute: the tensor version known to be a permutation


def mark_permutation(order: torch.Tensor) -> torch.Tensor:
    """Record that ``order`` (as it is now) is a permutation by construction (an argsort), so that
    ``check_permutation`` need not synchronise for it; returns ``order``."""
    setattr(order, _CHECKED, order._version)
    return order


def check_permutation(order: torch.Tensor) -> None:
    """ValueError naming ``query_order`` unless every ``order[b, h]`` is a permutation of ``0 .. Sq-1``.
    Free for an order made by ``mark_permutation``'s makers (``cluster_order``) and not modified since, or once
    checked; otherwise it synchronises. Skipped while a CUDA graph is being captured (the capture's eager run
    has checked it)."""
    if getattr(order, _CHECKED, None) == order._version:
        return
    if order.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    expected = torch.arange(order.shape[-1], device=order.device)
    if not torch.equal(order.sort(dim=-1).values, expected.expand_as(order)):
        raise ValueError("query_order: each [b, h] row must be a permutation of 0 .. Sq-1")
    mark_permutation(order)


def gather_queries(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, Sq, D]`` -> rows in ``order`` (int64 ``[B, H, Sq]``): ``out[b, h, p] = x[b, h, order[b, h, p]]``."""
    return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def scatter_queries(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``gather_queries`` for y ``[B, H, Sq, ...]`` (output rows, or LSE ``[B, H, Sq]``)."""
    index = order.view(*order.shape, *([1] * (y.dim() - 3))).expand_as(y)
    return torch.empty_like(y).scatter_(2, index, y)
