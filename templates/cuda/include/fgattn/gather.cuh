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
//
// KeyGather spreads a tile over all threads of the CTA (the pipelined kernel); WarpgroupGather over
// the 4 warps of the producer warpgroup (the warp-specialized kernel), holding one key row per thread.
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

// The producer warpgroup's gather: warp w copies rows w * TILE_N / 4 .. of each tile. Lane l looks up the
// key row of the warp's row l (one index load per thread and tile: few registers, as the producer runs
// with 40); a warp-wide cp.async copies STEP = 32 / CHUNKS rows, whose lanes get their key rows by shuffle.
template <int HEAD_DIM, int TILE_N, int KEY_GRAN>
struct WarpgroupGather {
  using Layout = SwizzledTile<HEAD_DIM, TILE_N>;
  static constexpr int kChunks = Layout::kChunks;
  static constexpr int kWarpRows = TILE_N / 4;
  static constexpr int kRowStep = 32 / kChunks;  // rows per warp-wide cp.async
  static_assert(TILE_N % 4 == 0 && kWarpRows <= 32 && kWarpRows % kRowStep == 0,
                "a warp's rows: at most one per lane, whole cp.async steps");

  // Key row of the warp's row `lane` of key tile `tile`; -1 past n_keys and for lanes past the warp's rows.
  static __device__ __forceinline__ int fetch(const int* __restrict__ idx_row, int n_keys, int tile, int warp,
                                              int lane) {
    const int slot = tile * TILE_N + warp * kWarpRows + lane;
    if (lane >= kWarpRows || slot >= n_keys) return -1;
    if (KEY_GRAN == 1) return __ldg(idx_row + slot);
    return __ldg(idx_row + slot / KEY_GRAN) * KEY_GRAN + slot % KEY_GRAN;
  }

  // cp.async the warp's rows of one tile (key rows `key`, from fetch) of `head` into the tile at dst.
  // head: the tensor's (batch, head) base; row_bytes: its row stride in bytes (< 2^32, cuda_backend checks).
  static __device__ __forceinline__ void issue(u32 dst, const unsigned short* head, u32 row_bytes, int key, int warp,
                                               int lane) {
    const int chunk = lane % kChunks;
    int lo = lane / kChunks;  // the lane's row in each step: lo + i * kRowStep
    // Opaque to the compiler, so that each step's source lane is one add, not a register held across the
    // producer loop (the producer has 40).
    asm volatile("" : "+r"(lo));
    // Step i's swizzled offset (smem_layout.cuh): rows are warp * kWarpRows (a multiple of 8) + lo + i * kRowStep
    // with lo < kRowStep, so row % 8 = (i * kRowStep) % 8 ^ lo, and the XOR splits into a per-lane part and
    // a per-step constant.
    const u32 base = dst + u32((chunk >> 3) * Layout::kPanelBytes + (warp * kWarpRows + lo) * 128);
    const u32 swz = u32(((chunk & 7) ^ lo) << 4);
    const unsigned char* src0 = reinterpret_cast<const unsigned char*>(head) + chunk * 16;
#pragma unroll
    for (int i = 0; i < kWarpRows / kRowStep; ++i) {
      const int row_key = __shfl_sync(0xffffffffu, key, lo + i * kRowStep);
      const bool valid = row_key >= 0;
      const u32 row = valid ? u32(row_key) : 0u;  // a valid address even where nothing is read
      const u32 off = u32(i * kRowStep * 128) + (swz ^ u32(((i * kRowStep) & 7) << 4));
      cp_async_16(base + off, src0 + (unsigned long long)row * row_bytes, valid);
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
