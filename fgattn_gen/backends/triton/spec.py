"""The Triton gather-load kernel (``templates/triton/gather_attention.py.j2``): its rules and defaults."""

from __future__ import annotations

from ..spec import BackendSpec

_TL_DTYPES = {"bf16": "tl.bfloat16", "fp16": "tl.float16"}


class TritonSpec(BackendSpec):
    name = "triton"
    template = "triton/gather_attention.py.j2"
    source_suffix = ".py"
    head_dims = (64, 128)
    tunable = {"tile_m": (64, 128), "tile_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
    block_m_multiple = 16

    def smem_bytes(self, variant) -> int:
        """An estimate for filtering: the pipelined K/V tiles and the Q tile."""
        elt = 2
        kv = 2 * variant.tile_n * variant.head_dim * elt * max(1, variant.num_stages - 1)
        return kv + variant.tile_m * variant.head_dim * elt

    def default_tiles(self, *, head_dim: int, block_m: int) -> list[dict[str, int]]:
        """The best measured on H200 (bench/results/part1_triton_h200.md, every density): 128x64 tiles, 4 warps,
        4 stages at head dim 128; 64x64 tiles, 4 warps, 3 stages at 64; then 64x64 with 2 stages for GPUs
        with less shared memory."""
        tile_m = next(t for t in (128, 64, 32, 16) if block_m % t == 0)
        if head_dim == 128 and tile_m == 128:
            best = dict(tile_m=128, tile_n=64, num_warps=4, num_stages=4)
        else:
            best = dict(tile_m=min(tile_m, 64), tile_n=64, num_warps=4, num_stages=3)
        return [best, dict(tile_m=min(tile_m, 64), tile_n=64, num_warps=4, num_stages=2)]

    def render_context(self, variant, *, interpret: bool) -> dict:
        """``tl_dtype``; ``dot_fp32`` upcasts the dots in Triton's interpreter (its bf16 dots are wrong)."""
        return dict(tl_dtype=_TL_DTYPES[variant.dtype], dot_fp32=interpret)


TRITON = TritonSpec()
