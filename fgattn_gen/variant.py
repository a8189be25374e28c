"""A kernel variant: one point of a backend's template parameter space, with a readable key.

The key names every parameter, e.g. ``triton_bf16_d128_qb128_kg1_bm128_bn64_w8_s3``:
backend, dtype, head dim, query block (KeySet ``block_m``), key granularity (KeySet ``block_n``),
kernel tile BLOCK_M x BLOCK_N, warps, pipeline stages, then the work schedule where it is not the
default: ``_o<order>`` (1: heavier query tiles first within a head, 2: over all heads of a launch) and
``_p<persist>`` (1: a persistent grid of one CTA per SM looping over the tiles); CUDA only
(``compaction.work_order``, ``templates/cuda/include/fgattn/schedule.cuh``). The same string names the rendered source file, the build cache entry and the
registry entry. The rules a backend adds, its shared memory and its
defaults are in its ``BackendSpec`` (``fgattn_gen.backends``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from .backends import BACKENDS, HEAD_DIMS, HOPPER_SMEM, spec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

__all__ = ["BACKENDS", "DTYPES", "DTYPE_NAMES", "HEAD_DIMS", "HOPPER_SMEM", "ORDERS", "PERSIST", "Variant",
           "default_variant", "dtype_name"]

_KEY_RE = re.compile(r"(?P<backend>[a-z]+)_(?P<dtype>[a-z0-9]+)_d(?P<head_dim>\d+)_qb(?P<block_m>\d+)"
                     r"_kg(?P<block_n>\d+)_bm(?P<tile_m>\d+)_bn(?P<tile_n>\d+)_w(?P<num_warps>\d+)_s(?P<num_stages>\d+)"
                     r"(?:_o(?P<order>[1-9]\d*))?(?:_p(?P<persist>[1-9]\d*))?")
ORDERS = (0, 1, 2)  # work order of the query tiles: raster, heavier first within a head, heavier first overall
PERSIST = (0, 1)  # 0: one CTA per query tile; 1: a persistent grid of one CTA per SM


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
    single query block, so all its rows share one key list. ``order`` and ``persist`` are the work
    schedule (``ORDERS``, ``PERSIST``); a backend that does not tune them (Triton) takes only 0.
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
    order: int = 0
    persist: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid variant {self.key}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Why this point is invalid (empty when valid): the generic rules, then the backend's own."""
        p = []
        if self.backend not in BACKENDS:
            return [f"backend must be one of {BACKENDS}, got {self.backend!r}"]
        if self.dtype not in DTYPES:
            p.append(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.head_dim not in spec(self.backend).head_dims:
            p.append(f"head_dim must be one of {spec(self.backend).head_dims}, got {self.head_dim}")
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
        for name, values in (("order", ORDERS), ("persist", PERSIST)):
            allowed = values if name in spec(self.backend).tunable else (0,)
            if getattr(self, name) not in allowed:
                p.append(f"{name} must be one of {allowed} for the {self.backend} backend, got {getattr(self, name)}")
        return p or spec(self.backend).problems(self)

    @property
    def key(self) -> str:
        return (f"{self.backend}_{self.dtype}_d{self.head_dim}_qb{self.block_m}_kg{self.block_n}"
                f"_bm{self.tile_m}_bn{self.tile_n}_w{self.num_warps}_s{self.num_stages}"
                + (f"_o{self.order}" if self.order else "") + (f"_p{self.persist}" if self.persist else ""))

    @classmethod
    def from_key(cls, key: str) -> "Variant":
        """Inverse of ``key``: ``Variant.from_key(v.key) == v``; ValueError for a malformed key."""
        match = _KEY_RE.fullmatch(key)
        if not match:
            raise ValueError(f"variant key {key!r} does not look like "
                             f"'<backend>_<dtype>_d<D>_qb<block_m>_kg<block_n>_bm<tile_m>_bn<tile_n>_w<warps>_s<stages>"
                             f"[_o<order>][_p<persist>]'")
        f = match.groupdict()
        return cls(backend=f.pop("backend"), dtype=f.pop("dtype"),
                   **{name: int(v) for name, v in f.items() if v is not None})

    @property
    def params(self) -> dict:
        return asdict(self)

    def smem_bytes(self) -> int:
        """Shared memory one block needs (``BackendSpec.smem_bytes``: an estimate for Triton, exactly the
        dynamic shared memory of a launch for CUDA)."""
        return spec(self.backend).smem_bytes(self)


def default_variant(*, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                    smem_limit: int = HOPPER_SMEM, backend: str = "triton") -> Variant:
    """The variant served when nothing tuned matches; it exists for every valid layout.

    The backend's ``default_tiles``, best measured first; the first whose shared memory fits ``smem_limit``
    (bytes per block) is served. ValueError naming ``keys`` when ``block_m`` is not a multiple of what the
    backend serves (16 for Triton, 64 for CUDA).
    """
    backend_spec = spec(backend)
    if block_m % backend_spec.block_m_multiple:
        raise ValueError(f"keys: block_m must be a multiple of {backend_spec.block_m_multiple} for the {backend} "
                         f"backend, got {block_m}")
    common = dict(backend=backend, dtype=dtype_name(dtype), head_dim=head_dim, block_m=block_m, block_n=block_n)
    variants = [Variant(**common, **tiles) for tiles in backend_spec.default_tiles(head_dim=head_dim, block_m=block_m)]
    return next((v for v in variants if v.smem_bytes() <= smem_limit), variants[-1])
