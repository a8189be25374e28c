"""Launch a CUDA variant: render, build with NVRTC (disk-cached), then per compaction head chunk run the
gather-load kernel (with the variant's work schedule: ``compaction.work_order`` when ``order`` is set, a
grid of one CTA per SM when ``persist`` is; ``templates/cuda/include/fgattn/schedule.cuh``).

The variant's source is ``templates/cuda/gather_attention.cu.j2`` rendered with StrictUndefined (it
only pins the parameters); the kernel logic is in ``templates/cuda/include/fgattn/*.cuh``, handed to
NVRTC as named headers, so the cubin cache key (``nvrtc.compile_cubin``) covers them too. The kernel
needs sm_80+ (cp.async, ldmatrix, mma.sync); on Hopper it is built for ``sm_90a`` with the warp-specialized
body (a producer warpgroup gathers, consumer warpgroups multiply with wgmma; 128 more threads per block).
``FGATTN_CUDA_MMA`` picks another matrix path for comparison and debugging (``mma_options``).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
import triton

from ... import compaction, nvrtc, render
from ...environment import cuda_sm_count
from ...keyset import KeySet
from ...variant import Variant

KERNEL = "fgattn_gather_attention"
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535
MMA_PATHS = ("auto", "ws", "wgmma", "sync")
_WS_DEFINE = "-DFGATTN_WARP_SPECIALIZED"
# Shared memory the warp-specialized kernel needs after the tiles for its mbarriers
# (gather_attention_ws.cuh kWsExtraBytes; the kernel traps if the launch gives less).
WS_EXTRA_SMEM_BYTES = 256


def mma_options(arch: str, path: str | None = None) -> tuple[str, ...]:
    """Compiler options choosing the matrix path for ``arch`` (``nvrtc.arch_of``): ``path``, by default
    ``FGATTN_CUDA_MMA``: ``auto`` (default): the warp-specialized wgmma body on sm_90a (fastest measured,
    bench/results), mma.sync elsewhere; ``ws``: that body; ``wgmma``: the body where every warp gathers and
    multiplies with wgmma (sm_90a); ``sync``: ldmatrix + mma.sync (any sm_80+ GPU)."""
    choice = os.environ.get("FGATTN_CUDA_MMA", "auto") if path is None else path
    if choice not in MMA_PATHS:
        raise ValueError(f"FGATTN_CUDA_MMA: expected one of {MMA_PATHS}, got {choice!r}")
    if choice == "auto":
        choice = "ws" if arch == "sm_90a" else "sync"
    if choice in ("ws", "wgmma") and arch != "sm_90a":
        raise ValueError(f"FGATTN_CUDA_MMA: {choice!r} needs sm_90a (wgmma); this GPU is {arch}")
    return {"ws": (_WS_DEFINE,), "wgmma": (), "sync": ("-DFGATTN_MMA_SYNC",)}[choice]


def launch_shape(variant: Variant, options: tuple[str, ...]) -> tuple[int, int]:
    """(threads per block, dynamic shared memory bytes) of ``variant`` built with ``options``: the
    warp-specialized kernel adds a producer warpgroup (128 threads) and its mbarriers."""
    if _WS_DEFINE in options:
        return 32 * variant.num_warps + 128, variant.smem_bytes() + WS_EXTRA_SMEM_BYTES
    return 32 * variant.num_warps, variant.smem_bytes()


def load(variant: Variant, device_index: int, path: str | None = None) -> tuple[nvrtc.CudaKernel, int, int]:
    """Compile (NVRTC, disk-cached) and load ``variant`` for CUDA device ``device_index`` (once per process
    for each variant, device and matrix path; ``path`` as in ``mma_options``); returns the kernel, its threads
    per block and dynamic shared memory bytes."""
    options = mma_options(_arch(device_index), path)
    return (_load(variant, device_index, options), *launch_shape(variant, options))


@functools.cache
def _arch(device_index: int) -> str:
    """``nvrtc.arch_of`` of a device, looked up once (``load`` runs on every attention call)."""
    return nvrtc.arch_of(torch.device("cuda", device_index))


@functools.cache
def _load(variant: Variant, device_index: int, options: tuple[str, ...]) -> nvrtc.CudaKernel:
    device = torch.device("cuda", device_index)
    props = torch.cuda.get_device_properties(device)
    if props.major < 8:
        raise ValueError(f"backend: 'cuda' needs an sm_80+ GPU (cp.async, mma.sync); {props.name} is "
                         f"sm_{props.major}{props.minor}")
    arch = nvrtc.arch_of(device)
    _, smem = launch_shape(variant, options)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit is not None and smem > limit:
        raise ValueError(f"variant: {variant.key} needs {smem} bytes of shared memory; "
                         f"{props.name} allows {limit} per block")
    cubin = nvrtc.compile_cubin(render.render(variant), variant.key, arch, options=options,
                                headers=render.cuda_headers())
    kernel = nvrtc.CudaKernel(cubin, KERNEL, device)
    with torch.cuda.device(device):
        kernel.set_max_dynamic_smem(smem)
    return kernel


def grid(variant: Variant, n_mtiles: int, n_bh: int, sm_count: int) -> tuple[int, int, int]:
    """The launch grid of one head chunk: (n_mtiles, n_bh) CTAs, one per query tile, or with ``persist`` one
    CTA per SM (at most one per tile), each looping over tiles."""
    if variant.persist:
        return (min(n_mtiles * n_bh, variant.persist * sm_count), 1, 1)
    return (n_mtiles, n_bh, 1)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if cp.async can read its rows (16-byte aligned base and row/head/batch strides), else a
    contiguous copy (the only allocation besides compaction; never taken for ordinary layouts)."""
    strides_ok = all(st % 8 == 0 for st, n in zip(t.stride()[:3], t.shape[:3]) if n > 1)
    return t if strides_ok and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _strides(t: torch.Tensor) -> list[ctypes.c_longlong]:
    """Batch, head and row strides in elements as kernel arguments (0 for a dim of size 1)."""
    return [ctypes.c_longlong(st if n > 1 else 0) for st, n in zip(t.stride()[:3], t.shape[:3])]


def run(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet, scale: float,
        out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Write ``out`` ``[B, H, Sq, D]`` (and ``lse`` fp32 ``[B, H, Sq]``, contiguous, if given) for validated
    inputs on the current stream; no host synchronisation. ``out`` must have 16-byte aligned rows
    (``attention`` allocates it contiguous). Heads are processed in compaction's chunks."""
    if q.device.type != "cuda":
        raise ValueError(f"backend: 'cuda' needs CUDA tensors; q is on {q.device}")
    if out.data_ptr() % 16 or any(st % 8 for st, n in zip(out.stride()[:3], out.shape[:3]) if n > 1):
        raise ValueError(f"out: rows must be 16-byte aligned, got strides {out.stride()}")
    if lse is not None and not (lse.is_contiguous() and lse.dtype == torch.float32):
        raise ValueError(f"lse: expected a contiguous fp32 tensor, got {lse.dtype} with strides {lse.stride()}")
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    kernel, threads, smem = load(variant, device_index)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    if max(k.stride(2), v.stride(2)) * k.element_size() >= 2**32:  # the ws producer's 32-bit row offsets
        raise ValueError(f"k, v: row strides must be below 2**32 bytes, got {k.stride(2)} and {v.stride(2)} elements")
    b, h, sq, _ = q.shape
    n_bh = b * h
    n_mtiles = triton.cdiv(sq, variant.tile_m)
    chunk = min(compaction.heads_per_chunk(keys), _MAX_GRID_Y)
    strides = [*_strides(q), *_strides(k), *_strides(v), *_strides(out)]
    lse_arg = lse if lse is not None else out  # never written when write_lse is 0
    if n_mtiles * min(chunk, n_bh) >= 2**31:
        raise ValueError(f"q: {n_mtiles} query tiles x {min(chunk, n_bh)} heads per launch exceed the kernel's "
                         f"32-bit tile index")
    sm_count = cuda_sm_count(device_index)
    for bh_start in range(0, n_bh, chunk):
        n = min(chunk, n_bh - bh_start)
        idx, n_keys = compaction.compact(keys, bh_start, n, k.shape[2])
        order = n_keys  # never read without an order
        if variant.order:
            order = compaction.work_order(n_keys, seq_q=sq, block_m=keys.block_m, tile_m=variant.tile_m,
                                          order=variant.order)
        kernel(grid(variant, n_mtiles, n, sm_count), (threads, 1, 1),
               q, k, v, out, lse_arg, idx, n_keys, order, *strides,
               h, sq, keys.shape[2], idx.shape[-1], bh_start, float(scale * _LOG2E), n_mtiles, n_mtiles * n,
               int(lse is not None), shared_mem=smem)
