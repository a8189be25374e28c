"""Synthetic block masks with spatial locality, for benchmarks and tuning at a chosen key density.

Each query block scores every key block with a smooth random field (bilinear upsampling of a coarse
random grid: neighbouring queries and keys get similar scores, as in video DiT attention) plus a band
around the block's own position, and keeps its ``round(density * n_kblocks)`` best key blocks. Every
query block therefore has the same count, which makes timings comparable across granularities.
"""

from __future__ import annotations

import torch


def local_block_mask(batch: int, heads: int, n_qblocks: int, n_kblocks: int, density: float, *,
                     seed: int = 0, device: torch.device | str | None = None,
                     coarse: int = 16, band: float = 2.0) -> torch.Tensor:
    """bool ``[B, H, n_qblocks, n_kblocks]`` with exactly ``round(density * n_kblocks)`` (at least 1 if
    density > 0) True entries per row, clustered in space. Built on ``device``, one head at a time."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density: expected a value in [0, 1], got {density}")
    keep = 0 if density == 0 else max(1, round(density * n_kblocks))
    mask = torch.zeros(batch, heads, n_qblocks, n_kblocks, dtype=torch.bool, device=device)
    if keep == 0:
        return mask
    if keep == n_kblocks:
        return mask.fill_(True)
    gen = torch.Generator(device=device).manual_seed(seed)
    qpos = (torch.arange(n_qblocks, device=device, dtype=torch.float32) + 0.5) / n_qblocks
    kpos = (torch.arange(n_kblocks, device=device, dtype=torch.float32) + 0.5) / n_kblocks
    diagonal = -band * (qpos[:, None] - kpos[None, :]).abs()
    for b in range(batch):
        for h in range(heads):
            grid = torch.randn(1, 1, coarse, coarse * 4, generator=gen, device=device)
            field = torch.nn.functional.interpolate(grid, size=(n_qblocks, n_kblocks), mode="bilinear",
                                                    align_corners=False)[0, 0]
            noise = 0.1 * torch.randn(n_qblocks, n_kblocks, generator=gen, device=device)
            top = torch.topk(field + diagonal + noise, keep, dim=-1).indices
            mask[b, h].scatter_(-1, top, True)
    return mask
