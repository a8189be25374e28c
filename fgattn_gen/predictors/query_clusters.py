"""Clustered query blocks: an order of each head's queries in which a block of ``block_m`` holds similar ones.

Semantically similar tokens of a video DiT are scattered in raster order, so a raster block of 128 queries
mixes several content clusters and its union of keys is wide (Sparse VideoGen 2). ``cluster_order`` runs
spherical k-means on each head's queries (``S / tokens_per_cluster`` centroids, strided start, ``steps``
Lloyd steps on every ``subsample``-th query, then one assignment of every query) and orders the queries by
cluster, raster order inside a cluster, so each cluster's queries fill consecutive blocks and keep their
spatial locality. The order goes into a KeySet (``KeySet.query_order``); ``attention`` gathers and scatters
the rows. ``ordered_block_means`` gives the mean query of each block of an order without gathering q.

GPU / interpreter: fused Triton kernels, no score matrix in memory and no host synchronisation.
- assignment: program (tile of ``BLOCK_M`` queries, head) scores the tile against every centroid (bf16/fp16
  tensor-core dots, fp32 accumulation; fp32 in the interpreter) with a running max/argmax in registers. In a
  Lloyd step it also adds each query to its centroid's fp32 sum (atomics); in the final assignment it counts
  each tile's queries per cluster (``counts[head, cluster, tile]``).
- centroid update: each centroid becomes its normalised sum (an empty cluster keeps its centroid); the sums
  are cleared for the next step.
- order (a counting sort, stable in position): one cumsum of ``counts`` over (head, cluster, tile) gives the
  number of queries before each (cluster, tile) run; a query's slot adds its rank among its tile's queries of
  the same cluster. Where ``counts`` would exceed ``workspace_budget()`` (very long sequences) an argsort of
  ``cluster * S + position`` does the same.
CPU without the interpreter: the same steps in torch ops (``cluster_order_torch``, the reference of the tests),
a chunk of heads at a time under the workspace budget. The fused assignment compares fp32 scores where the
torch ops on CUDA would round them to bf16 first: fewer ties, otherwise the same rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..compaction import workspace_budget
from ..environment import interpreting
from ..query_order import mark_permutation

# Assignment kernel: (queries per program, centroids per step, num_warps, num_stages); also the tile of the
# counting sort. A [128, D] bf16 tile against [D, 64] centroid tiles, 80 (159 with the Lloyd sums) registers and
# 80 KB of shared memory (ptxas, sm_90a); HunyuanVideo 720p: 931 x 24 = 22,344 programs (a Lloyd step: 2,808),
# each reading the head's 465 bf16 centroids (119 KB) from L2. Swept on an H200 (bench/predict_stages.py
# --sweep, scattered family): 4 warps beat 8 at 720p (2.74 vs 2.81 ms) and at S = 32,760 (0.386 vs 0.409 ms);
# 256 queries per program was 2.67 ms at 720p but 0.395 ms at 32,760.
LAUNCH = (128, 64, 4, 3)
_CENTROIDS_PER_PROGRAM = 16  # centroid init / update kernel
_MEAN_ROWS = 64  # rows per step of the block-mean kernel
_EPS = 1e-12
_BYTES_PER_SCORE = 4  # torch path, per (query, centroid): the bf16 score and the argmax temporaries


@triton.jit
def _centroid_kernel(X, CENT, SUMS, stride_xb, stride_xh, stride_xs, n_heads, seq, n_clusters, eps,
                     HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, INIT: tl.constexpr):
    """CENT [n, C, D] (the dot dtype), SUMS fp32 [n, C, D]. INIT: centroid c is query ``c * seq // C`` of X
    [B, H, S, D], normalised. Else: the normalised sum where it is non-zero (else the centroid stays).
    Either way SUMS is cleared. Program (centroid tile, n)."""
    n = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_c < n_clusters)[:, None]
    at = (n * n_clusters + offs_c[:, None].to(tl.int64)) * HEAD_DIM + offs_d[None, :]
    if INIT:
        rows = offs_c.to(tl.int64) * seq // n_clusters
        x = tl.load(X + (n // n_heads) * stride_xb + (n % n_heads) * stride_xh + rows[:, None] * stride_xs
                    + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        cent = x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), eps)[:, None]
    else:
        total = tl.load(SUMS + at, mask=ok, other=0.0)
        norm = tl.sqrt(tl.sum(total * total, 1))[:, None]
        cent = tl.where(norm > 0, total / tl.maximum(norm, eps), tl.load(CENT + at, mask=ok, other=0.0).to(tl.float32))
    tl.store(CENT + at, cent.to(CENT.dtype.element_ty), mask=ok)
    tl.store(SUMS + at, tl.zeros([BLOCK_C, HEAD_DIM], tl.float32), mask=ok)


@triton.jit
def _assign_kernel(X, CENT, ASSIGN, SUMS, COUNTS, stride_xb, stride_xh, stride_xs, n_heads, n_points, n_clusters,
                   n_tiles, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                   ACCUMULATE: tl.constexpr, COUNT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Point i of head n is X[b, h, i * stride_xs] (X [B, H, ., D]); ASSIGN int32 [n, n_points]: argmax_c x . c
    (first on ties) over CENT [n, C, D]. ACCUMULATE: SUMS fp32 [n, C, D] += x. COUNT: COUNTS int32
    [n, C, n_tiles] += 1 at (cluster, tile). Program (tile, n)."""
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_points
    x = tl.load(X + (n // n_heads) * stride_xb + (n % n_heads) * stride_xh + offs_m[:, None].to(tl.int64) * stride_xs
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    else:
        x = x.to(CENT.dtype.element_ty)
    cent = CENT + n * n_clusters * HEAD_DIM
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_M], tl.int32)
    for c0 in range(0, n_clusters, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ct = tl.load(cent + offs_c[None, :] * HEAD_DIM + offs_d[:, None], mask=(offs_c < n_clusters)[None, :],
                     other=0.0)
        if DOT_FP32:
            s = tl.dot(x, ct.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(x, ct)
        s = tl.where((offs_c < n_clusters)[None, :], s, float("-inf"))
        tile_best, tile_arg = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strictly: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg + c0, arg)
    tl.store(ASSIGN + n * n_points + offs_m, arg, mask=row_ok)
    if ACCUMULATE:
        tl.atomic_add(SUMS + (n * n_clusters + arg[:, None]) * HEAD_DIM + offs_d[None, :], x.to(tl.float32),
                      mask=row_ok[:, None], sem="relaxed")
    if COUNT:
        tl.atomic_add(COUNTS + (n * n_clusters + arg) * n_tiles + tile, tl.full([BLOCK_M], 1, tl.int32), mask=row_ok,
                      sem="relaxed")


@triton.jit
def _rank_kernel(ASSIGN, BEFORE, ORDER, n_points, n_clusters, n_tiles, BLOCK_M: tl.constexpr):
    """BEFORE int [n * C * n_tiles]: inclusive cumsum of the flattened counts [n, C, n_tiles] (one scan over every
    head). Query i of head n (tile t, cluster a) goes to slot ``queries before (n, a, t) - queries before head n
    + (earlier queries of tile t in cluster a)``; ORDER int64 [n, S][slot] = i. Program (tile, n)."""
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_points
    a = tl.load(ASSIGN + n * n_points + offs_m, mask=row_ok, other=-1)
    same = (a[:, None] == a[None, :]) & (tl.arange(0, BLOCK_M)[None, :] < tl.arange(0, BLOCK_M)[:, None])
    rank = tl.sum(same.to(tl.int32), 1)
    head = n * n_clusters * n_tiles
    flat = head + a.to(tl.int64) * n_tiles + tile
    before = tl.load(BEFORE + flat - 1, mask=row_ok & (flat > 0), other=0)
    if n > 0:
        before -= tl.load(BEFORE + head - 1)
    tl.store(ORDER + n * n_points + before + rank, offs_m.to(tl.int64), mask=row_ok)


@triton.jit
def _block_mean_kernel(X, ORDER, MEAN, stride_xb, stride_xh, stride_xs, n_heads, seq, block,
                       HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """MEAN fp32 [n, G, D]: mean of the X [B, H, S, D] rows that ORDER int64 [n, S] puts in block g.
    Program (block, n)."""
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    first = g * block
    count = tl.minimum(block, seq - first)
    offs_d = tl.arange(0, HEAD_DIM)
    x_head = X + (n // n_heads) * stride_xb + (n % n_heads) * stride_xh
    total = tl.zeros([HEAD_DIM], tl.float32)
    for r0 in range(0, count, CHUNK):
        slots = first + r0 + tl.arange(0, CHUNK)
        ok = slots < first + count
        rows = tl.load(ORDER + n * seq + slots, mask=ok, other=0)
        x = tl.load(x_head + rows[:, None] * stride_xs + offs_d[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
    tl.store(MEAN + (n * tl.num_programs(0) + g) * HEAD_DIM + offs_d, total / count)


def _check_knobs(tokens_per_cluster, steps, subsample) -> None:
    for name, value, low in (("tokens_per_cluster", tokens_per_cluster, 1), ("steps", steps, 0),
                             ("subsample", subsample, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def runs_fused(q: torch.Tensor) -> bool:
    """Whether ``cluster_order`` runs the fused kernels (CUDA, or Triton's interpreter) for q."""
    return q.is_cuda or interpreting()


def cluster_order(q: torch.Tensor, *, tokens_per_cluster: int = 256, steps: int = 4,
                  subsample: int = 8) -> torch.Tensor:
    """int64 ``[B, H, Sq]``: per head a permutation of the queries, grouped by k-means cluster.

    Args:
        q: ``[B, H, Sq, D]`` bf16/fp16/fp32, last dim contiguous (D a power of two for the fused kernels).
        tokens_per_cluster: queries per centroid on average (>= 1); the number of centroids is
            ``max(1, Sq // tokens_per_cluster)``.
        steps: Lloyd steps (>= 0) after the strided initialisation.
        subsample: the Lloyd steps see every ``subsample``-th query (>= 1); the final assignment sees all.
    No host synchronisation.
    """
    _check_knobs(tokens_per_cluster, steps, subsample)
    if not runs_fused(q):
        return cluster_order_torch(q, tokens_per_cluster=tokens_per_cluster, steps=steps, subsample=subsample)
    b, h, seq, d = q.shape
    n = b * h
    n_clusters = max(1, seq // tokens_per_cluster)
    dot_fp32 = interpreting() or q.dtype == torch.float32
    dev = q.device
    cent = torch.empty(n, n_clusters, d, dtype=torch.float32 if dot_fp32 else q.dtype, device=dev)
    sums = torch.empty(n, n_clusters, d, dtype=torch.float32, device=dev)
    strides = (q.stride(0), q.stride(1))
    cent_grid = (triton.cdiv(n_clusters, _CENTROIDS_PER_PROGRAM), n)
    block_m, block_c, warps, stages = LAUNCH
    launch = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_C=block_c, DOT_FP32=dot_fp32, num_warps=warps,
                  num_stages=stages)
    _centroid_kernel[cent_grid](q, cent, sums, *strides, q.stride(2), h, seq, n_clusters, _EPS, HEAD_DIM=d,
                                BLOCK_C=_CENTROIDS_PER_PROGRAM, INIT=True)
    few = triton.cdiv(seq, subsample)
    assign = torch.empty(n, seq, dtype=torch.int32, device=dev)
    for _step in range(steps):
        _assign_kernel[(triton.cdiv(few, block_m), n)](q, cent, assign, sums, sums, *strides, q.stride(2) * subsample,
                                                       h, few, n_clusters, 1, ACCUMULATE=True, COUNT=False, **launch)
        _centroid_kernel[cent_grid](q, cent, sums, *strides, q.stride(2), h, seq, n_clusters, _EPS, HEAD_DIM=d,
                                    BLOCK_C=_CENTROIDS_PER_PROGRAM, INIT=False)
    n_tiles = triton.cdiv(seq, block_m)
    by_count = n * n_clusters * n_tiles * 8 <= workspace_budget()  # int32 counts and their cumsum
    counts = torch.zeros(n, n_clusters, n_tiles, dtype=torch.int32, device=dev) if by_count else assign
    _assign_kernel[(n_tiles, n)](q, cent, assign, sums, counts, *strides, q.stride(2), h, seq, n_clusters, n_tiles,
                                 ACCUMULATE=False, COUNT=by_count, **launch)
    if by_count:
        order = torch.empty(n, seq, dtype=torch.int64, device=dev)
        # one flat scan (a device-wide scan, not one thread block per head); int32 while it cannot overflow
        before = torch.cumsum(counts.view(-1), dim=0, dtype=torch.int32 if n * seq < 2**31 else torch.int64)
        _rank_kernel[(n_tiles, n)](assign, before, order, seq, n_clusters, n_tiles, BLOCK_M=block_m, num_warps=4)
    else:
        order = (assign.to(torch.int64) * seq + torch.arange(seq, device=dev)).argsort(-1)
    return mark_permutation(order.view(b, h, seq))  # a counting sort or an argsort: a permutation per head


def ordered_block_means(q: torch.Tensor, order: torch.Tensor, block_m: int) -> torch.Tensor:
    """fp32 ``[B * H, ceil(Sq / block_m), D]``: the mean of the queries that ``order`` puts in each block of
    ``block_m`` (``group_mean`` of the gathered queries, without gathering them).

    q ``[B, H, Sq, D]`` (last dim contiguous; D a power of two on the fused path); order int64 ``[B, H, Sq]``."""
    b, h, seq, d = q.shape
    n_blocks = triton.cdiv(seq, block_m)
    if not runs_fused(q):
        gathered = q.gather(2, order[..., None].expand(-1, -1, -1, d)).float()
        padded = torch.nn.functional.pad(gathered, (0, 0, 0, n_blocks * block_m - seq))
        counts = (seq - torch.arange(n_blocks, device=q.device) * block_m).clamp_max(block_m)
        return (padded.view(b * h, n_blocks, block_m, d).sum(2) / counts[:, None]).contiguous()
    mean = torch.empty(b * h, n_blocks, d, dtype=torch.float32, device=q.device)
    _block_mean_kernel[(n_blocks, b * h)](q, order.contiguous(), mean, q.stride(0), q.stride(1), q.stride(2), h, seq,
                                          block_m, HEAD_DIM=d, CHUNK=min(_MEAN_ROWS, triton.next_power_of_2(block_m)),
                                          num_warps=4)
    return mean


def cluster_order_torch(q: torch.Tensor, *, tokens_per_cluster: int = 256, steps: int = 4,
                        subsample: int = 8) -> torch.Tensor:
    """``cluster_order`` in torch ops (CPU without the interpreter; the tests' reference): heads in chunks
    whose score matrix stays under the index workspace budget."""
    _check_knobs(tokens_per_cluster, steps, subsample)
    b, h, seq, d = q.shape
    n_clusters = max(1, seq // tokens_per_cluster)
    x = q.reshape(b * h, seq, d)
    on_tensor_cores = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    order = torch.empty(b * h, seq, dtype=torch.int64, device=q.device)
    chunk = max(1, workspace_budget() // max(1, seq * n_clusters * _BYTES_PER_SCORE))
    position = torch.arange(seq, device=q.device)
    for start in range(0, b * h, chunk):
        # the assignment argmax_c x . c does not depend on |x|: the points are used as they are
        points = x[start:start + chunk] if on_tensor_cores else x[start:start + chunk].float()
        centroids = _unit(points[:, position[:n_clusters] * seq // n_clusters].float())
        few = points[:, ::subsample]
        for _step in range(steps):
            assign = torch.matmul(few, centroids.to(points.dtype).transpose(1, 2)).argmax(-1)  # [n, S/sub]
            sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, d), few.float())
            centroids = torch.where(sums.norm(dim=-1, keepdim=True) > 0, _unit(sums), centroids)
        assign = torch.matmul(points, centroids.to(points.dtype).transpose(1, 2)).argmax(-1)  # [n, S]
        order[start:start + chunk] = (assign * seq + position).argsort(-1)
    return mark_permutation(order.view(b, h, seq))  # argsorts: a permutation per head


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
