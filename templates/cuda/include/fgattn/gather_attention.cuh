// Gather-load sparse attention forward: a CTA computes tiles of TILE_M query rows of one (batch, head) row,
// one per launch or several in a row when persistent (schedule.cuh picks which).
//
// The CTA's rows lie in one query block, so they share one sorted key list (idx, n_keys from
// fgattn_gen/compaction.py). Q (TILE_M x D) is copied once to shared memory and kept in registers as
// mma A fragments; then the block's selected keys are walked TILE_N at a time: the K/V rows of key
// tile j + STAGES - 1 are gathered (gather.cuh, cp.async) while tile j is multiplied (mma_sm80.cuh)
// and folded into the online softmax (softmax.cuh). Each warp owns 16 query rows. Matrix work: wgmma
// (wgmma_sm90.cuh, one warpgroup per 64 rows) when built for sm_90a, else mma.sync (mma_sm80.cuh);
// -DFGATTN_MMA_SYNC forces mma.sync.
//
// Config (pinned by templates/cuda/gather_attention.cu.j2): T (bf16 | fp16), kHeadDim, kQueryBlock,
// kKeyGran, kTileM, kTileN, kWarps, kStages, kOrder, kPersist. Shared memory: (kTileM + 2 * kStages * kTileN) * kHeadDim * 2 bytes.
#pragma once

#include "fgattn/epilogue.cuh"
#include "fgattn/gather.cuh"
#include "fgattn/kernel_args.cuh"
#include "fgattn/mma_sm80.cuh"
#include "fgattn/ptx.cuh"
#include "fgattn/schedule.cuh"
#include "fgattn/smem_layout.cuh"
#include "fgattn/softmax.cuh"
#include "fgattn/wgmma_sm90.cuh"

namespace fgattn {

// One query tile: Q, every key tile of its block's list, the output rows.
template <class Cfg>
__device__ __forceinline__ void gather_attention_tile(const AttentionArgs& a, const WorkTile tile) {
  using T = typename Cfg::T;
  constexpr int D = Cfg::kHeadDim, TM = Cfg::kTileM, TN = Cfg::kTileN, STAGES = Cfg::kStages;
  constexpr int THREADS = 32 * Cfg::kWarps;
  static_assert(TM == 16 * Cfg::kWarps, "each warp owns 16 query rows");
  static_assert(Cfg::kQueryBlock % TM == 0, "a CTA's rows must lie in one query block");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(FGATTN_MMA_SYNC)
  static_assert(TM % 64 == 0, "wgmma: whole warpgroups of 64 rows");
  using Mma = WarpgroupMmaSm90<T, D, TM, TN>;
#else
  using Mma = WarpMmaSm80<T, D, TM, TN>;
#endif
  using Gather = KeyGather<D, TN, THREADS, Cfg::kKeyGran>;
  constexpr u32 kQBytes = TM * D * 2, kKVBytes = TN * D * 2;

  extern __shared__ __align__(1024) unsigned char fgattn_smem[];  // swizzle atoms are 1024-byte aligned
  const u32 sq = smem_u32(fgattn_smem);
  const u32 sk = sq + kQBytes;
  const u32 sv = sk + STAGES * kKVBytes;
  if (Mma::kAsyncProxy && (sq & 1023u)) asm volatile("trap;");  // wgmma's swizzle needs 1024-byte aligned tiles

  int tid = threadIdx.x;
  // Persistent: opaque, so that the tile's copy addresses are computed per tile, not hoisted out of the
  // CTA's tile loop into registers.
  if constexpr (Cfg::kPersist != 0) asm volatile("" : "+r"(tid));
  const int lane = tid & 31, warp = tid >> 5;
  const int m0 = tile.m0;
  const int bh_local = tile.bh_local;
  const int bh = a.bh_start + bh_local;
  const int b = bh / a.n_heads, h = bh % a.n_heads;
  const long long list = (long long)bh_local * a.n_qblocks + m0 / Cfg::kQueryBlock;
  const int n_keys = __ldg(a.n_keys + list);
  const int* idx_row = a.idx + list * a.idx_row_stride;
  const int rows_left = a.seq_q - m0;  // valid rows of this tile (>= 1)

  unsigned short* o_tile = a.o + b * a.o_sb + h * a.o_sh + m0 * a.o_sm;
  float* lse_tile = a.lse + (long long)bh * a.seq_q + m0;

  float o[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  }
  OnlineSoftmax<TN / 8, D / 8> softmax;
  softmax.init();

  if (n_keys > 0) {
    const unsigned short* k_head = a.k + b * a.k_sb + h * a.k_sh;
    const unsigned short* v_head = a.v + b * a.v_sb + h * a.v_sh;
    const int n_tiles = (n_keys + TN - 1) / TN;

    // Tiles in flight ahead of the one being multiplied. The overlapped wgmma loop still reads tile
    // j - 1's V while tile j is multiplied, so it keeps one stage fewer ahead.
    constexpr bool kOverlap = Mma::kAsyncProxy && STAGES >= 3;
    constexpr int kAhead = kOverlap ? STAGES - 2 : STAGES - 1;

    // Prologue: Q with key tile 0 in one group, then tiles 1 .. kAhead - 1 (one group each, empty past the end).
    load_rows_async<D, TM, THREADS>(sq, a.q + b * a.q_sb + h * a.q_sh + m0 * a.q_sm, a.q_sm, rows_left, tid);
    Gather gather;
#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
      gather.fetch(idx_row, n_keys, s, tid);
      if (s < n_tiles) gather.issue(sk + s * kKVBytes, sv + s * kKVBytes, k_head, a.k_sn, v_head, a.v_sn, tid);
      cp_async_commit();
    }
    gather.fetch(idx_row, n_keys, kAhead, tid);

    typename Mma::QFrags qa;
    float s[TN / 8][4];
    u32 pa[TN / 16][4];
    for (int j = 0; j < n_tiles; ++j) {
      cp_async_wait<kAhead - 1>();  // tile j (and Q) landed for this thread's copies
      if (Mma::kAsyncProxy) fence_proxy_async_shared();  // cp.async writes -> wgmma's async-proxy reads
      __syncthreads();  // ... for every thread's; and every warp is done with the stage refilled below
      if (j == 0) Mma::load_q(qa, sq, warp, lane);
      {
        const int next = j + kAhead;  // refill the stage of tile j - 1 (j - 2 when overlapped)
        const int st = next % STAGES;
        if (next < n_tiles) gather.issue(sk + st * kKVBytes, sv + st * kKVBytes, k_head, a.k_sn, v_head, a.v_sn, tid);
        cp_async_commit();
        gather.fetch(idx_row, n_keys, next + 1, tid);  // index loads in flight during this tile's math
      }
      const int st = j % STAGES;
      const int valid = n_keys - j * TN;  // key slots of this tile that exist
      if constexpr (kOverlap) {
        // S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together; softmax of S_j while P V runs.
        Mma::qk_issue(s, sq, sk + st * kKVBytes, warp);
        if (j > 0) {
          Mma::pv_issue(o, pa, sv + ((j + STAGES - 1) % STAGES) * kKVBytes);
          Mma::template wait<1>();
        } else {
          Mma::template wait<0>();
        }
        Mma::fence_regs(s);
        if (valid < TN) mask_tail(s, valid, lane);
        float alpha[2];
        softmax.update(s, a.qk_scale, alpha);
        Mma::template wait<0>();
        Mma::fence_regs(o);
        softmax.rescale(o, alpha);
        pack_p<T>(pa, s);
      } else {
        Mma::qk(s, qa, sq, sk + st * kKVBytes, warp, lane);
        if (valid < TN) mask_tail(s, valid, lane);
        softmax.step(s, o, a.qk_scale);
        pack_p<T>(pa, s);
        Mma::pv(o, pa, sv + st * kKVBytes, lane);
      }
    }
    if constexpr (kOverlap) {  // the last tile's P V
      Mma::pv(o, pa, sv + ((n_tiles - 1) % STAGES) * kKVBytes, lane);
    }
    cp_async_wait<0>();
  }

  float lse[2];
  softmax.finish(o, lse);
  // With wgmma a warpgroup reads all its 64 Q rows, so every warp must be done before any stages output.
  if (Mma::kAsyncProxy) __syncthreads();
  store_warp_rows<T, D, TM>(o, lse, sq, warp * 16, lane, rows_left, o_tile, a.o_sm, lse_tile, a.write_lse);
}

template <class Cfg>
__device__ __forceinline__ void gather_attention(const AttentionArgs& a) {
  using Sched = Schedule<Cfg>;
  for (int item = Sched::first(); item < a.n_items; item = Sched::next(a, item)) {
    if (Sched::kPersistent) __syncthreads();  // every warp's previous tile is out of the Q tile (its staging)
    gather_attention_tile<Cfg>(a, Sched::tile(a, item));
  }
}

}  // namespace fgattn
