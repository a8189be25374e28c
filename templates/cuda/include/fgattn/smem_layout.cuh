// Swizzled shared-memory tile of ROWS x HEAD_DIM 16-bit elements, addressed in 16-byte chunks.
//
// The tile is stored as HEAD_DIM / 64 column panels of ROWS x 128 bytes; in a panel, 16-byte chunk c of
// row r lives at r * 128 + ((c ^ (r % 8)) * 16). That is the 128-byte-swizzle K-major layout the Hopper
// tensor cores (wgmma) read from shared memory, and it keeps the mma.sync path conflict-free: an
// ldmatrix phase reads 8 consecutive rows at one logical chunk, which the XOR spreads over 8 different
// 16-byte bank groups; the 16-byte cp.async writes of a row land in distinct bank groups as well.
#pragma once

#include "fgattn/ptx.cuh"

namespace fgattn {

template <int HEAD_DIM, int ROWS>
struct SwizzledTile {
  static constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks per row
  static constexpr int kPanelBytes = ROWS * 128;
  static_assert(HEAD_DIM % 64 == 0 && ROWS % 8 == 0, "whole 8-row x 128-byte swizzle atoms");

  static __device__ __forceinline__ u32 offset(int row, int chunk) {
    return u32((chunk >> 3) * kPanelBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
  }
};

}  // namespace fgattn
