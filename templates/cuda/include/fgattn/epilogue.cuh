// Output of one warp's 16 query rows (both kernel bodies): the LSE, then O staged through the warp's own
// rows of the swizzled Q tile (32-bit stores in the accumulator layout) and written out as 16-byte rows.
// The caller makes sure nothing still reads those Q rows (wgmma reads a warpgroup's 64 rows).
#pragma once

#include "fgattn/ptx.cuh"
#include "fgattn/smem_layout.cuh"

namespace fgattn {

// o: normalised accumulators (softmax.finish), lse: natural-log LSE of rows g, g + 8 (lane = 4 g + t).
// row0: the warp's first row in the tile; rows >= rows_left are not written.
template <class T, int HEAD_DIM, int TILE_M>
__device__ __forceinline__ void store_warp_rows(const float (&o)[HEAD_DIM / 8][4], const float (&lse)[2], u32 sq,
                                                int row0, int lane, int rows_left, unsigned short* o_tile,
                                                long long o_sm, float* lse_tile, bool write_lse) {
  using Layout = SwizzledTile<HEAD_DIM, TILE_M>;
  const int g = lane >> 2;
  if (write_lse && (lane & 3) == 0) {
    if (row0 + g < rows_left) lse_tile[row0 + g] = lse[0];
    if (row0 + g + 8 < rows_left) lse_tile[row0 + g + 8] = lse[1];
  }
  __syncwarp();
#pragma unroll
  for (int d = 0; d < HEAD_DIM / 8; ++d) {
    const u32 col = 4 * (lane & 3);
    st_shared_b32(sq + Layout::offset(row0 + g, d) + col, Elem<T>::pack(o[d][0], o[d][1]));
    st_shared_b32(sq + Layout::offset(row0 + g + 8, d) + col, Elem<T>::pack(o[d][2], o[d][3]));
  }
  __syncwarp();
  constexpr int kChunks = Layout::kChunks;
  constexpr int kRowStep = 32 / kChunks;
#pragma unroll
  for (int i = 0; i < 16 / kRowStep; ++i) {
    const int r = row0 + lane / kChunks + i * kRowStep;
    const int c = lane % kChunks;
    if (r < rows_left) {
      u32 v4[4];
      ld_shared_v4(v4, sq + Layout::offset(r, c));
      st_global_v4(o_tile + r * o_sm + c * 8, v4);
    }
  }
}

}  // namespace fgattn
