// Matrix work of one warpgroup with wgmma (sm_90a): the Hopper replacement of mma_sm80.cuh, same interface.
//
// A warpgroup (4 consecutive warps) owns 64 query rows; warp w of it holds rows 16w .. 16w + 15 in the
// same register layout as the mma.sync path, so the softmax code is shared. Operands come straight from
// the swizzled shared-memory tiles (smem_layout.cuh = the 128-byte-swizzle canonical layout):
//   S = Q K^T : A = Q (K-major, smem), B = K (K-major, smem)          wgmma m64n{TILE_N}k16, SS
//   O += P V  : A = P (registers),     B = V (MN-major, smem, .trans) wgmma m64n{HEAD_DIM}k16, RS
// qk / pv issue their k16 steps as one wgmma group and wait for it; qk_issue / pv_issue / wait let the
// caller overlap them (gather_attention.cuh: P V of tile j - 1 runs while tile j's softmax is computed).
#pragma once

#include "fgattn/ptx.cuh"
#include "fgattn/smem_layout.cuh"
#include "fgattn/wgmma_ops.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace fgattn {

template <class T, int HEAD_DIM, int TILE_M, int TILE_N>
struct WarpgroupMmaSm90 {
  static constexpr int kKSteps = HEAD_DIM / 16;
  static constexpr int kNFrags = TILE_N / 8;
  static constexpr int kDFrags = HEAD_DIM / 8;
  static constexpr bool kAsyncProxy = true;  // reads shared memory through the async proxy
  struct QFrags {};                          // Q stays in shared memory

  // Shared-memory matrix descriptor, 128-byte swizzle; lbo / sbo in bytes.
  static __device__ __forceinline__ unsigned long long desc(u32 addr, u32 lbo, u32 sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
  }

  static __device__ __forceinline__ void load_q(QFrags&, u32, int, int) {}

  // Pins the accumulator registers at this point of the program: code after it cannot read or write
  // them earlier (e.g. between a wgmma and the wait for it).
  template <int N>
  static __device__ __forceinline__ void fence_regs(float (&d)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
    }
  }

  // wgmma groups complete in issue order: wait<N> leaves at most the N most recent ones in flight.
  template <int N>
  static __device__ __forceinline__ void wait() {
    wgmma_wait<N>();
  }

  // S = Q K^T issued as one wgmma group (not waited for).
  static __device__ __forceinline__ void qk_issue(float (&s)[kNFrags][4], u32 sq, u32 sk, int warp) {
    const u32 q_rows = sq + u32((warp >> 2) * 64 * 128);  // this warpgroup's 64 rows (in every panel)
    fence_regs(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      // k16 step kk: panel kk / 4, 32-byte column offset inside the 128-byte swizzled rows
      const u32 a = q_rows + u32((kk >> 2) * TILE_M * 128 + (kk & 3) * 32);
      const u32 b = sk + u32((kk >> 2) * TILE_N * 128 + (kk & 3) * 32);
      Wgmma<T, TILE_N>::ss(s, desc(a, 16, 1024), desc(b, 16, 1024), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
  }

  // O += P V issued as one wgmma group (not waited for).
  static __device__ __forceinline__ void pv_issue(float (&o)[kDFrags][4], const u32 (&pa)[TILE_N / 16][4], u32 sv) {
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < TILE_N / 16; ++j) {
      // keys 16j .. 16j + 15: two 8-row groups (sbo 1024 bytes); head-dim panels of 64 (lbo TILE_N * 128 bytes)
      Wgmma<T, HEAD_DIM>::rs_tnsp_b(o, pa[j], desc(sv + u32(j * 16 * 128), TILE_N * 128, 1024));
    }
    wgmma_commit();
  }

  static __device__ __forceinline__ void qk(float (&s)[kNFrags][4], const QFrags&, u32 sq, u32 sk, int warp, int) {
    qk_issue(s, sq, sk, warp);
    wgmma_wait<0>();
    fence_regs(s);
  }

  static __device__ __forceinline__ void pv(float (&o)[kDFrags][4], const u32 (&pa)[TILE_N / 16][4], u32 sv, int) {
    pv_issue(o, pa, sv);
    wgmma_wait<0>();
    fence_regs(o);
  }
};

}  // namespace fgattn
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
