// Online softmax of one warp's 16 rows, in fp32, base 2: scores are scaled by qk_scale = scale * log2(e).
//
// A lane holds two rows (g and g + 8, see mma_sm80.cuh): index 0 and 1 of m / l. m is the running max
// of the scaled scores (quad-reduced, identical across the 4 lanes of a row); l is this lane's partial
// row sum, reduced over the quad only at the end (finish), since every rescale factor is quad-uniform.
#pragma once

#include "fgattn/ptx.cuh"

namespace fgattn {

// Scores of key slots >= valid (past the block's key count) -> -inf, before the softmax update.
template <int N_FRAGS>
__device__ __forceinline__ void mask_tail(float (&s)[N_FRAGS][4], int valid, int lane) {
#pragma unroll
  for (int n = 0; n < N_FRAGS; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (8 * n + 2 * (lane & 3) + (e & 1) >= valid) s[n][e] = neg_inf();
    }
  }
}

// Lazy rescaling (as in FlashAttention-4): m moves only when a row of the warp would see a score more than
// kRescaleLog2 above it; then every row of the warp moves to its true max and the accumulator is rescaled.
// Otherwise the tile is exponentiated against the stale m (probabilities up to 2^kRescaleLog2, well inside
// fp32 and bf16/fp16 range) and the accumulator is left as it is. finish() divides by the row sums and
// reports m + log2(sum) with the same m, so the result does not depend on when m moved; past the first
// tiles m rarely moves, which saves the D / 2 multiplies of every rescale and the alpha exponentials.
constexpr float kRescaleLog2 = 8.f;

template <int N_FRAGS, int D_FRAGS>
struct OnlineSoftmax {
  float m[2];
  float l[2];
  bool moved;  // the last update moved m (warp-uniform): the accumulator needs rescale()

  __device__ __forceinline__ void init() {
    m[0] = m[1] = neg_inf();
    l[0] = l[1] = 0.f;
  }

  static __device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  }

  static __device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
  }

  // Scores s (raw q.k, masked entries -inf) -> probabilities in place; updates m and l and returns in
  // alpha the factor the accumulator must be rescaled by (rescale; 1 when m did not move), which the
  // caller may defer until the accumulator is no longer being written (wgmma in flight).
  __device__ __forceinline__ void update(float (&s)[N_FRAGS][4], float qk_scale, float (&alpha)[2]) {
    float m_tile[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = neg_inf();
#pragma unroll
      for (int n = 0; n < N_FRAGS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      m_tile[r] = quad_max(mx) * qk_scale;
    }
    // -inf + 8 = -inf: a row's first unmasked scores always move its m
    moved = __any_sync(0xffffffffu, m_tile[0] > m[0] + kRescaleLog2 || m_tile[1] > m[1] + kRescaleLog2);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      alpha[r] = 1.f;
      if (moved) {
        const float m_new = fmaxf(m[r], m_tile[r]);
        // a row with only masked scores so far keeps m = -inf: alpha 0 (its l and o are 0 anyway)
        alpha[r] = fast_exp2(m[r] - (m_new == neg_inf() ? 0.f : m_new));
        m[r] = m_new;
      }
      const float offset = m[r] == neg_inf() ? 0.f : m[r];  // avoids -inf - -inf for fully masked rows
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < N_FRAGS; ++n) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[n][e] = fast_exp2(fmaf(s[n][e], qk_scale, -offset));
          sum += s[n][e];
        }
      }
      l[r] = (moved ? l[r] * alpha[r] : l[r]) + sum;
    }
  }

  __device__ __forceinline__ void rescale(float (&o)[D_FRAGS][4], const float (&alpha)[2]) const {
    if (!moved) return;
#pragma unroll
    for (int d = 0; d < D_FRAGS; ++d) {
      o[d][0] *= alpha[0];
      o[d][1] *= alpha[0];
      o[d][2] *= alpha[1];
      o[d][3] *= alpha[1];
    }
  }

  __device__ __forceinline__ void step(float (&s)[N_FRAGS][4], float (&o)[D_FRAGS][4], float qk_scale) {
    float alpha[2];
    update(s, qk_scale, alpha);
    rescale(o, alpha);
  }

  // Normalise o by the row sums; returns per row the natural-log LSE (-inf and o = 0 for a row with no key;
  // NaN, not -inf, where a non-finite score made the sum NaN, so an LSE merge cannot drop that row).
  __device__ __forceinline__ void finish(float (&o)[D_FRAGS][4], float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(l[r]);
      const bool any = sum != 0.f;  // true for NaN
      const float inv = any ? 1.f / sum : 0.f;
      lse[r] = any ? (m[r] + fast_log2(sum)) * 0.6931471805599453f : neg_inf();
#pragma unroll
      for (int d = 0; d < D_FRAGS; ++d) {
        o[d][2 * r] *= inv;
        o[d][2 * r + 1] *= inv;
      }
    }
  }
};

}  // namespace fgattn
