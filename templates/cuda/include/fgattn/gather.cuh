// The gather-load primitive: the selected K/V rows of one key tile -> swizzled shared-memory tiles,
// with 16-byte cp.async (rows past the block's key count are zero-filled, nothing is read for them).
//
// Selected key slot t of a query block (0 <= t < n_keys) is key row idx[t / G] * G + t % G, with
// G = KeySet.block_n (key granularity) and idx the block's sorted key-block list from compaction.
// Thread tid copies chunk tid % CHUNKS of rows tid / CHUNKS + i * ROW_STEP: consecutive threads read
// consecutive 16 bytes of one row, a row is one contiguous HEAD_DIM * 2-byte read.
//
// The row numbers of a tile are looked up (fetch) one pipeline step before its copies are issued
// (issue), so the index loads' latency hides behind the current tile's matrix work.
#pragma once

#include "fgattn/ptx.cuh"
#include "fgattn/smem_layout.cuh"

namespace fgattn {

template <int HEAD_DIM, int TILE_N, int THREADS, int KEY_GRAN>
struct KeyGather {
  using Layout = SwizzledTile<HEAD_DIM, TILE_N>;
  static constexpr int kChunks = Layout::kChunks;
  static constexpr int kRowStep = THREADS / kChunks;
  static constexpr int kRowsPerThread = TILE_N / kRowStep;
  static_assert(THREADS % kChunks == 0 && TILE_N % kRowStep == 0, "tile rows must split evenly over threads");

  int rows[kRowsPerThread];  // key row per copied tile row, -1 past n_keys

  // Key rows of key tile `tile` (slots tile * TILE_N ..) for this thread's tile rows.
  __device__ __forceinline__ void fetch(const int* __restrict__ idx_row, int n_keys, int tile, int tid) {
    const int first = tile * TILE_N + tid / kChunks;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int slot = first + i * kRowStep;
      int key = -1;
      if (slot < n_keys) {
        if (KEY_GRAN == 1) {
          key = __ldg(idx_row + slot);
        } else {
          key = __ldg(idx_row + slot / KEY_GRAN) * KEY_GRAN + slot % KEY_GRAN;
        }
      }
      rows[i] = key;
    }
  }

  // cp.async the fetched rows of K and V into the stage tiles at shared addresses sk, sv.
  __device__ __forceinline__ void issue(u32 sk, u32 sv, const unsigned short* k_head, long long k_stride,
                                        const unsigned short* v_head, long long v_stride, int tid) const {
    const int chunk = tid % kChunks;
    const int row0 = tid / kChunks;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = row0 + i * kRowStep;
      const bool valid = rows[i] >= 0;
      const long long key = valid ? rows[i] : 0;  // a valid address even where nothing is read
      const u32 off = Layout::offset(r, chunk);
      cp_async_16(sk + off, k_head + key * k_stride + chunk * 8, valid);
      cp_async_16(sv + off, v_head + key * v_stride + chunk * 8, valid);
    }
  }
};

// A dense tile of ROWS rows (query rows m0 .., rows >= n_rows zero-filled) -> swizzled shared memory.
template <int HEAD_DIM, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows_async(u32 dst, const unsigned short* base, long long stride, int n_rows,
                                                int tid) {
  using Layout = SwizzledTile<HEAD_DIM, ROWS>;
  constexpr int kChunks = Layout::kChunks;
  constexpr int kRowStep = THREADS / kChunks;
  static_assert(ROWS % kRowStep == 0, "tile rows must split evenly over threads");
  const int chunk = tid % kChunks;
#pragma unroll
  for (int i = 0; i < ROWS / kRowStep; ++i) {
    const int r = tid / kChunks + i * kRowStep;
    const bool valid = r < n_rows;
    cp_async_16(dst + Layout::offset(r, chunk), base + (valid ? r : 0) * stride + chunk * 8, valid);
  }
}

}  // namespace fgattn
