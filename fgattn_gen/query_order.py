"""Clustered query blocks: a KeySet's ``query_order`` permutes each head's queries so that a block of
``block_m`` holds similar ones. ``attention`` runs the kernels on the gathered rows and scatters the output
back, two passes over q and out (the kernels themselves are unchanged, so is their rate)."""

from __future__ import annotations

import torch


def check_permutation(order: torch.Tensor) -> None:
    """ValueError naming ``query_order`` unless every ``order[b, h]`` is a permutation of ``0 .. Sq-1``.
    Synchronises; skipped while a CUDA graph is being captured (the capture's eager run has checked it)."""
    if order.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    expected = torch.arange(order.shape[-1], device=order.device)
    if not torch.equal(order.sort(dim=-1).values, expected.expand_as(order)):
        raise ValueError("query_order: each [b, h] row must be a permutation of 0 .. Sq-1")


def gather_queries(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, Sq, D]`` -> rows in ``order`` (int64 ``[B, H, Sq]``): ``out[b, h, p] = x[b, h, order[b, h, p]]``."""
    return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def scatter_queries(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``gather_queries`` for y ``[B, H, Sq, ...]`` (output rows, or LSE ``[B, H, Sq]``)."""
    index = order.view(*order.shape, *([1] * (y.dim() - 3))).expand_as(y)
    return torch.empty_like(y).scatter_(2, index, y)
