"""A kernel variant: one point of the template parameter space, with a readable key.

The key names every parameter, e.g. ``triton_bf16_d128_qb128_kg1_bm128_bn64_w8_s3``:
backend, dtype, head dim, query block (KeySet ``block_m``), key granularity (KeySet ``block_n``),
kernel tile BLOCK_M x BLOCK_N, warps, pipeline stages. The same string names the rendered source
file, the build cache entry and the registry entry.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

BACKENDS = ("triton", "cuda")
HEAD_DIMS = (64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


_KEY_RE = re.compile(r"(?P<backend>[a-z]+)_(?P<dtype>[a-z0-9]+)_d(?P<head_dim>\d+)_qb(?P<block_m>\d+)"
                     r"_kg(?P<block_n>\d+)_bm(?P<tile_m>\d+)_bn(?P<tile_n>\d+)_w(?P<num_warps>\d+)_s(?P<num_stages>\d+)")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bf16"``; raises for unsupported dtypes."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of torch.bfloat16, torch.float16; got {dtype}")
    return DTYPE_NAMES[dtype]


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class Variant:
    """Parameters of one rendered kernel.

    ``block_m`` must be a multiple of ``tile_m``: a kernel program covers ``tile_m`` query rows of a
    single query block, so all its rows share one key list.
    """

    backend: str
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    tile_m: int
    tile_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid variant {self.key}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Why this point is invalid (empty when valid)."""
        p = []
        if self.backend not in BACKENDS:
            p.append(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            p.append(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.head_dim not in HEAD_DIMS:
            p.append(f"head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        if not (_is_pow2(self.tile_m) and 16 <= self.tile_m <= 256):
            p.append(f"tile_m (BLOCK_M) must be a power of two in [16, 256], got {self.tile_m}")
        elif self.block_m < 1 or self.block_m % self.tile_m:
            p.append(f"tile_m (BLOCK_M) = {self.tile_m} must divide the query block block_m = {self.block_m}")
        if not (_is_pow2(self.tile_n) and 16 <= self.tile_n <= 256):
            p.append(f"tile_n (BLOCK_N) must be a power of two in [16, 256], got {self.tile_n}")
        if self.block_n < 1:
            p.append(f"block_n (key granularity) must be >= 1, got {self.block_n}")
        if self.num_warps not in (4, 8):
            p.append(f"num_warps must be 4 or 8, got {self.num_warps}")
        if not 1 <= self.num_stages <= 6:
            p.append(f"num_stages must be in [1, 6], got {self.num_stages}")
        if self.backend == "cuda" and not p:
            p.extend(self._cuda_problems())
        return p

    def _cuda_problems(self) -> list[str]:
        """The CUDA kernel's own rules (templates/cuda/include/fgattn/gather_attention.cuh)."""
        p = []
        if self.tile_m != 16 * self.num_warps:
            p.append(f"cuda: each warp owns 16 query rows, so tile_m (BLOCK_M) must be 16 * num_warps = "
                     f"{16 * self.num_warps}, got {self.tile_m}")
        if self.tile_n not in CUDA_TILE_N:
            p.append(f"cuda: tile_n (BLOCK_N) must be one of {CUDA_TILE_N}, got {self.tile_n}")
        if not 2 <= self.num_stages <= 4:
            p.append(f"cuda: num_stages must be in [2, 4] (cp.async pipeline), got {self.num_stages}")
        if not p and self.smem_bytes() > HOPPER_SMEM:
            p.append(f"cuda: needs {self.smem_bytes()} bytes of shared memory, more than a block gets ({HOPPER_SMEM})")
        return p

    @property
    def key(self) -> str:
        return (f"{self.backend}_{self.dtype}_d{self.head_dim}_qb{self.block_m}_kg{self.block_n}"
                f"_bm{self.tile_m}_bn{self.tile_n}_w{self.num_warps}_s{self.num_stages}")

    @classmethod
    def from_key(cls, key: str) -> "Variant":
        """Inverse of ``key``: ``Variant.from_key(v.key) == v``; ValueError for a malformed key."""
        match = _KEY_RE.fullmatch(key)
        if not match:
            raise ValueError(f"variant key {key!r} does not look like "
                             f"'<backend>_<dtype>_d<D>_qb<block_m>_kg<block_n>_bm<tile_m>_bn<tile_n>_w<warps>_s<stages>'")
        f = match.groupdict()
        return cls(backend=f.pop("backend"), dtype=f.pop("dtype"), **{name: int(v) for name, v in f.items()})

    @property
    def params(self) -> dict:
        return asdict(self)

    def smem_bytes(self) -> int:
        """Shared memory the pipelined K/V tiles and the Q tile need (Triton: an estimate for filtering;
        CUDA: exactly the dynamic shared memory of a launch)."""
        elt = 2
        if self.backend == "cuda":
            return (self.tile_m + 2 * self.num_stages * self.tile_n) * self.head_dim * elt
        kv = 2 * self.tile_n * self.head_dim * elt * max(1, self.num_stages - 1)
        return kv + self.tile_m * self.head_dim * elt


HOPPER_SMEM = 227 * 1024
CUDA_TILE_N = (32, 64, 128)


def default_variant(*, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                    smem_limit: int = HOPPER_SMEM, backend: str = "triton") -> Variant:
    """A variant that exists for every valid layout (served when nothing tuned matches).

    ``backend="cuda"``: see ``default_cuda_variant``.

    The tile shapes are the best measured on H200 (bench/results/part1_triton_h200.md, every density):
    128x64 tiles, 4 warps, 4 stages at head dim 128; 64x64 tiles, 4 warps, 3 stages at 64. On GPUs with
    less shared memory than that needs (``smem_limit`` bytes per block), 64x64 tiles with 2 stages.
    """
    if backend == "cuda":
        return default_cuda_variant(dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
                                    smem_limit=smem_limit)
    if backend != "triton":
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if block_m % 16:
        raise ValueError(f"keys: block_m must be a multiple of 16, got {block_m}")
    tile_m = next(t for t in (128, 64, 32, 16) if block_m % t == 0)
    common = dict(backend="triton", dtype=dtype_name(dtype), head_dim=head_dim, block_m=block_m, block_n=block_n)
    if head_dim == 128 and tile_m == 128:
        best = Variant(**common, tile_m=128, tile_n=64, num_warps=4, num_stages=4)
    else:
        best = Variant(**common, tile_m=min(tile_m, 64), tile_n=64, num_warps=4, num_stages=3)
    if best.smem_bytes() <= smem_limit:
        return best
    return Variant(**common, tile_m=min(tile_m, 64), tile_n=64, num_warps=4, num_stages=2)


def default_cuda_variant(*, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                         smem_limit: int = HOPPER_SMEM) -> Variant:
    """The CUDA variant served without tuning, the best measured on H200 (warp-specialized path,
    bench/results/part2_cuda_h200.md): 128 x 128 tiles, 8 warps (two consumer warpgroups), 2 stages at head
    dim 128 and 64. tile_m 64 (4 warps) where
    block_m is a multiple of 64 only; smaller K/V tiles and 2 stages where ``smem_limit`` (bytes per block)
    is lower. ValueError naming ``keys`` when block_m is not a multiple of 64 (a CTA's rows must lie in one
    query block and each warp owns 16 rows, each warpgroup 64)."""
    if block_m % 64:
        raise ValueError(f"keys: the CUDA backend needs block_m to be a multiple of 64, got {block_m}")
    tile_m = 128 if block_m % 128 == 0 else 64
    common = dict(backend="cuda", dtype=dtype_name(dtype), head_dim=head_dim, block_m=block_m, block_n=block_n,
                  tile_m=tile_m, num_warps=tile_m // 16)
    for tile_n, stages in ((128, 2), (64, 3), (64, 2), (32, 2)):
        variant = Variant(**common, tile_n=tile_n, num_stages=stages)
        if variant.smem_bytes() <= smem_limit:
            return variant
    return variant
