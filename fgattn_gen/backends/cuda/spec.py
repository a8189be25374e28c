"""The CUDA gather-load kernel (``templates/cuda/gather_attention.cu.j2`` + ``templates/cuda/include/fgattn``):
its rules and defaults."""

from __future__ import annotations

from ..spec import BackendSpec

HOPPER_SMEM = 227 * 1024  # shared memory one block may opt in to on sm_90


class CudaSpec(BackendSpec):
    name = "cuda"
    template = "cuda/gather_attention.cu.j2"
    source_suffix = ".cu"
    head_dims = (64, 128)
    # 16 query rows per (consumer) warp, so tile_m = 16 * num_warps (``problems`` rejects the other pairs);
    # order / persist: the work schedule (variant.ORDERS, PERSIST; include/fgattn/schedule.cuh)
    tunable = {"tile_m": (64, 128), "tile_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4),
               "order": (0, 1, 2), "persist": (0, 1)}
    block_m_multiple = 64  # a CTA's rows lie in one query block; each warpgroup owns 64 rows
    tile_n_values = (32, 64, 128)

    def problems(self, variant) -> list[str]:
        """The kernel's own rules (templates/cuda/include/fgattn/gather_attention.cuh)."""
        p = []
        if variant.tile_m != 16 * variant.num_warps:
            p.append(f"cuda: each warp owns 16 query rows, so tile_m (BLOCK_M) must be 16 * num_warps = "
                     f"{16 * variant.num_warps}, got {variant.tile_m}")
        if variant.tile_n not in self.tile_n_values:
            p.append(f"cuda: tile_n (BLOCK_N) must be one of {self.tile_n_values}, got {variant.tile_n}")
        if not 2 <= variant.num_stages <= 4:
            p.append(f"cuda: num_stages must be in [2, 4] (cp.async pipeline), got {variant.num_stages}")
        if not p and self.smem_bytes(variant) > HOPPER_SMEM:
            p.append(f"cuda: needs {self.smem_bytes(variant)} bytes of shared memory, more than a block gets "
                     f"({HOPPER_SMEM})")
        return p

    def smem_bytes(self, variant) -> int:
        """Exactly the dynamic shared memory of a launch: the Q tile and ``stages`` K and V tiles."""
        return (variant.tile_m + 2 * variant.num_stages * variant.tile_n) * variant.head_dim * 2

    def default_tiles(self, *, head_dim: int, block_m: int) -> list[dict[str, int]]:
        """The best measured on H200 (warp-specialized path, bench/results/part2_cuda_h200.md): 128 x 128
        tiles, 8 warps (two consumer warpgroups), 2 stages at head dim 128 and 64; tile_m 64 (4 warps) where
        block_m is a multiple of 64 only; smaller K/V tiles and 2 stages for less shared memory. The raster
        schedule (order 0, persist 0) until the tuner measures another."""
        tile_m = 128 if block_m % 128 == 0 else 64
        return [dict(tile_m=tile_m, num_warps=tile_m // 16, tile_n=tile_n, num_stages=stages)
                for tile_n, stages in ((128, 2), (64, 3), (64, 2), (32, 2))]

    def render_context(self, variant, *, interpret: bool) -> dict:
        """``smem_bytes``: the kernel static_asserts that it agrees with the launcher."""
        return dict(smem_bytes=self.smem_bytes(variant))

    def supports(self, sm: tuple[int, int] | None) -> bool:
        """sm_80+ (cp.async, ldmatrix, mma.sync); never the interpreter."""
        return sm is not None and sm[0] >= 8


CUDA = CudaSpec()
