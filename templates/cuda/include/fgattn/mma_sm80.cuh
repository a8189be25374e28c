// Matrix work of one warp with mma.sync m16n8k16 (sm_80+; runs on Hopper, wgmma replaces it later).
//
// A warp owns 16 query rows. Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4 * g + t):
//   accumulator c[4]: rows g (c0, c1) and g + 8 (c2, c3), columns 2t, 2t + 1 of an 8-wide n block
//   A a[4] (16 x 16): a0 rows g / k 2t.., a1 rows g+8 / k 2t.., a2 rows g / k 2t+8.., a3 rows g+8 / k 2t+8..
// so the score accumulators of n blocks 2j, 2j + 1 repack in place into the A operand of P V (no shuffles).
//
//   S[TILE_N/8][4]   = Q_warp (16 x D, registers) . K_tile^T (TILE_N x D, swizzled smem)
//   O[D/8][4]       += P (16 x TILE_N, registers) . V_tile (TILE_N x D, swizzled smem)
#pragma once

#include "fgattn/ptx.cuh"
#include "fgattn/smem_layout.cuh"

namespace fgattn {

template <class T, int HEAD_DIM, int TILE_M, int TILE_N>
struct WarpMmaSm80 {
  using QLayout = SwizzledTile<HEAD_DIM, TILE_M>;
  using KVLayout = SwizzledTile<HEAD_DIM, TILE_N>;
  static constexpr int kKSteps = HEAD_DIM / 16;  // k16 steps of Q K^T
  static constexpr int kNFrags = TILE_N / 8;     // 8-wide key blocks of S
  static constexpr int kDFrags = HEAD_DIM / 8;   // 8-wide head-dim blocks of O
  static_assert(TILE_N % 16 == 0 && HEAD_DIM % 16 == 0, "");

  static constexpr bool kAsyncProxy = false;  // reads shared memory with ldmatrix (generic proxy)
  struct QFrags {
    u32 a[kKSteps][4];
  };

  // The warp's 16 Q rows (rows 16 * warp .. of the TILE_M-row smem tile at sq) as A fragments.
  static __device__ __forceinline__ void load_q(QFrags& q, u32 sq, int warp, int lane) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      ldmatrix_x4(q.a[kk], sq + QLayout::offset(16 * warp + (lane & 15), 2 * kk + (lane >> 4)));
    }
  }

  static __device__ __forceinline__ void qk(float (&s)[kNFrags][4], const QFrags& q, u32, u32 sk, int, int lane) {
#pragma unroll
    for (int n = 0; n < kNFrags; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
    }
    // ldmatrix x4 over K rows: matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15)
    const int key_in = ((lane >> 4) << 3) + (lane & 7);
    const int chunk_in = (lane >> 3) & 1;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int nn = 0; nn < TILE_N / 16; ++nn) {
        u32 b[4];
        ldmatrix_x4(b, sk + KVLayout::offset(16 * nn + key_in, 2 * kk + chunk_in));
        Elem<T>::mma(s[2 * nn], q.a[kk], b[0], b[1]);
        Elem<T>::mma(s[2 * nn + 1], q.a[kk], b[2], b[3]);
      }
    }
  }

  static __device__ __forceinline__ void pv(float (&o)[kDFrags][4], const u32 (&pa)[TILE_N / 16][4], u32 sv, int lane) {
    // ldmatrix x4 .trans over V rows: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
    const int key_in = (((lane >> 3) & 1) << 3) + (lane & 7);
    const int chunk_in = lane >> 4;
#pragma unroll
    for (int j = 0; j < TILE_N / 16; ++j) {
#pragma unroll
      for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {
        u32 b[4];
        ldmatrix_x4_trans(b, sv + KVLayout::offset(16 * j + key_in, 2 * dp + chunk_in));
        Elem<T>::mma(o[2 * dp], pa[j], b[0], b[1]);
        Elem<T>::mma(o[2 * dp + 1], pa[j], b[2], b[3]);
      }
    }
  }
};

}  // namespace fgattn
