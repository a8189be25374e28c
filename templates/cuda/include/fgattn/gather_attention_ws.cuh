// Warp-specialized gather-load sparse attention forward (sm_90a, -DFGATTN_WARP_SPECIALIZED), after
// FlashAttention-3. One CTA per (tile of TILE_M query rows, batch * head), as in gather_attention.cuh;
// the roles are split by warpgroup:
//
//   warpgroup 0, producer (40 registers): copies Q, then gathers the selected K and V rows of every key
//     tile (gather.cuh WarpgroupGather, 16-byte cp.async, zero-fill past n_keys) into rings of kStages
//     shared-memory slots, K of tile t before V of tile t - 1: the order the consumers need them.
//   warpgroups 1 .. TILE_M / 64, consumers (232 registers): 64 query rows each. S = Q K^T and O += P V with
//     wgmma (wgmma_sm90.cuh), online softmax in fp32, base 2 (softmax.cuh). In a consumer, P V of tile
//     j - 1 runs while the softmax of tile j is computed; with two consumers their GEMMs alternate
//     (ping-pong), so one's softmax overlaps the other's GEMMs.
//
// Shared memory: Q tile | K ring | V ring (kernel_args.cuh SmemBytes), then the mbarriers:
//   q_full             Q landed                          128 cp.async arrivals (producer threads)
//   k_full[s] v_full[s] slot s of the K / V ring landed   128 cp.async arrivals
//   k_empty[s] v_empty[s] every consumer warp has read slot s: one arrival per consumer warp
// cp.async writes through the generic proxy and wgmma reads through the async proxy, so a consumer
// fences (fence.proxy.async) after its full-barrier waits and before its wgmma.
#pragma once

#include "fgattn/epilogue.cuh"
#include "fgattn/gather.cuh"
#include "fgattn/kernel_args.cuh"
#include "fgattn/ptx.cuh"
#include "fgattn/softmax.cuh"
#include "fgattn/sync_sm90.cuh"
#include "fgattn/wgmma_sm90.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "FGATTN_WARP_SPECIALIZED needs the sm_90a target (wgmma, setmaxnreg)"
#endif

namespace fgattn {

// Shared memory the launcher adds after the tiles for the mbarriers (cuda_backend.WS_EXTRA_SMEM_BYTES).
constexpr int kWsExtraBytes = 256;

template <class Cfg>
struct WsShape {
  static constexpr int kConsumers = Cfg::kTileM / 64;        // consumer warpgroups
  static constexpr int kThreads = 128 * (kConsumers + 1);   // + the producer warpgroup
  static_assert(8 * (1 + 4 * Cfg::kStages) <= kWsExtraBytes, "the mbarriers must fit the extra bytes");
};

// Named barriers (0 is __syncthreads).
enum WsNamedBarrier : int {
  kSchedBar = 1,     // kSchedBar + c: consumer c may issue its GEMMs (the other consumer has issued its own)
  kEpilogueBar = 3,  // kEpilogueBar + c: every warp of consumer c is done with wgmma on its Q rows
};

// Slot and phase parity of a ring position; advance() steps to the next tile.
template <int STAGES>
struct RingPos {
  int slot = 0;
  u32 phase = 0;
  __device__ __forceinline__ void advance() {
    if (++slot == STAGES) {
      slot = 0;
      phase ^= 1u;
    }
  }
};

// Barrier addresses (shared memory, 8 bytes each).
template <int STAGES>
struct WsBarriers {
  u32 base;
  __device__ __forceinline__ u32 q_full() const { return base; }
  __device__ __forceinline__ u32 k_full(int s) const { return base + 8 * (1 + s); }
  __device__ __forceinline__ u32 v_full(int s) const { return base + 8 * (1 + STAGES + s); }
  __device__ __forceinline__ u32 k_empty(int s) const { return base + 8 * (1 + 2 * STAGES + s); }
  __device__ __forceinline__ u32 v_empty(int s) const { return base + 8 * (1 + 3 * STAGES + s); }

  __device__ __forceinline__ void init(int consumer_warps) const {
    mbar_init(q_full(), 128);
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(k_full(s), 128);
      mbar_init(v_full(s), 128);
      mbar_init(k_empty(s), consumer_warps);
      mbar_init(v_empty(s), consumer_warps);
    }
  }
};

// The producer warpgroup (threads 0 .. 127): Q, then K_0, (K_1, V_0), (K_2, V_1), .., V_last.
template <class Cfg>
__device__ __forceinline__ void ws_produce(const AttentionArgs& a, const WsBarriers<Cfg::kStages>& bars, u32 sq,
                                           u32 sk, u32 sv, const unsigned short* q_tile, int rows_left,
                                           const unsigned short* k_head, const unsigned short* v_head,
                                           const int* idx_row, int n_keys) {
  constexpr int D = Cfg::kHeadDim, TN = Cfg::kTileN;
  constexpr u32 kKVBytes = TN * D * 2;
  using Gather = WarpgroupGather<D, TN, Cfg::kKeyGran>;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  load_rows_async<D, Cfg::kTileM, 128>(sq, q_tile, a.q_sm, rows_left, tid);
  mbar_arrive_cp_async(bars.q_full());

  const int n_tiles = (n_keys + TN - 1) / TN;
  const u32 k_row_bytes = u32(a.k_sn * 2), v_row_bytes = u32(a.v_sn * 2);
  int key_k = Gather::fetch(idx_row, n_keys, 0, warp, lane);  // this lane's key row of K tile t
  int key_v = -1;                                              // .. of V tile t - 1
  RingPos<Cfg::kStages> kpos, vpos;
  for (int t = 0; t <= n_tiles; ++t) {
    if (t < n_tiles) {
      mbar_wait(bars.k_empty(kpos.slot), kpos.phase ^ 1u);  // the consumers are done with K tile t - STAGES
      Gather::issue(sk + kpos.slot * kKVBytes, k_head, k_row_bytes, key_k, warp, lane);
      mbar_arrive_cp_async(bars.k_full(kpos.slot));
      kpos.advance();
    }
    if (t > 0) {
      mbar_wait(bars.v_empty(vpos.slot), vpos.phase ^ 1u);  // .. with V tile t - 1 - STAGES
      Gather::issue(sv + vpos.slot * kKVBytes, v_head, v_row_bytes, key_v, warp, lane);
      mbar_arrive_cp_async(bars.v_full(vpos.slot));
      vpos.advance();
    }
    key_v = key_k;
    key_k = Gather::fetch(idx_row, n_keys, t + 1, warp, lane);  // in flight during the next empty-wait
  }
  cp_async_wait_all();  // no copy outlives its issuing thread
}

// One consumer warpgroup c (64 query rows, warps cwarp = 4 c .. 4 c + 3 of the consumers).
template <class Cfg>
struct WsConsumer {
  using T = typename Cfg::T;
  static constexpr int D = Cfg::kHeadDim, TM = Cfg::kTileM, TN = Cfg::kTileN;
  static constexpr u32 kKVBytes = TN * D * 2;
  static constexpr bool kPingPong = WsShape<Cfg>::kConsumers == 2;
  using Mma = WarpgroupMmaSm90<T, D, TM, TN>;

  const WsBarriers<Cfg::kStages>& bars;
  u32 sq, sk, sv;
  int n_keys, n_tiles, c, cwarp, lane;
  float qk_scale;
  float o[D / 8][4];
  float s[TN / 8][4];
  u32 pa[TN / 16][4];  // P of the previous tile, the A operand of its P V
  OnlineSoftmax<TN / 8, D / 8> softmax;
  RingPos<Cfg::kStages> kpos, vpos;

  // Key tile j: S_j = Q K_j^T (and, kWithPV, O += P_{j-1} V_{j-1}) issued in this consumer's turn, then the
  // softmax of S_j while P V runs. Two instantiations rather than a run-time "j > 0": ptxas serialises
  // every wgmma (C7514) unless each path from an issue to a read of its accumulators waits for it.
  template <bool kWithPV>
  __device__ __forceinline__ void step(int j) {
    mbar_wait(bars.k_full(kpos.slot), kpos.phase);
    if (kWithPV) mbar_wait(bars.v_full(vpos.slot), vpos.phase);
    fence_proxy_async_shared();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads

    if (kPingPong) named_sync(kSchedBar + c, 256);
    Mma::qk_issue(s, sq, sk + kpos.slot * kKVBytes, cwarp);
    if (kWithPV) Mma::pv_issue(o, pa, sv + vpos.slot * kKVBytes);
    // The other consumer's turn; consumer 1 hands none over after its last tile (consumer 0 has none left).
    if (kPingPong && (c == 0 || j + 1 < n_tiles)) named_arrive(kSchedBar + (c ^ 1), 256);

    Mma::template wait<kWithPV ? 1 : 0>();  // S_j
    Mma::fence_regs(s);
    if (lane == 0) mbar_arrive(bars.k_empty(kpos.slot));  // this warp has read K_j
    kpos.advance();

    const int valid = n_keys - j * TN;
    if (valid < TN) mask_tail(s, valid, lane);
    float alpha[2];
    softmax.update(s, qk_scale, alpha);
    if (kWithPV) {
      Mma::template wait<0>();  // P_{j-1} V_{j-1}
      Mma::fence_regs(o);
      if (lane == 0) mbar_arrive(bars.v_empty(vpos.slot));  // .. and V_{j-1}
      vpos.advance();
    }
    softmax.rescale(o, alpha);
    pack_p<T>(pa, s);
  }

  // Every key tile; leaves the normalised O fragments in o and the rows' LSE in lse.
  __device__ __forceinline__ void run(float (&lse)[2]) {
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
    }
    softmax.init();
    if (n_keys > 0) {
      mbar_wait(bars.q_full(), 0);  // (its proxy fence is the first step's)
      if (kPingPong && c == 1) named_arrive(kSchedBar + 0, 256);  // consumer 0 issues first
      step<false>(0);
      for (int j = 1; j < n_tiles; ++j) step<true>(j);
      mbar_wait(bars.v_full(vpos.slot), vpos.phase);  // the last tile's P V
      fence_proxy_async_shared();
      Mma::pv(o, pa, sv + vpos.slot * kKVBytes, lane);
    }
    softmax.finish(o, lse);
  }
};

template <class Cfg>
__device__ __forceinline__ void gather_attention_ws(const AttentionArgs& a) {
  using T = typename Cfg::T;
  constexpr int D = Cfg::kHeadDim, TM = Cfg::kTileM, TN = Cfg::kTileN, STAGES = Cfg::kStages;
  using Shape = WsShape<Cfg>;
  static_assert(TM == 16 * Cfg::kWarps && (TM == 64 || TM == 128), "one or two consumer warpgroups of 64 rows");
  static_assert(Cfg::kQueryBlock % TM == 0, "a CTA's rows must lie in one query block");
  static_assert(STAGES >= 2, "the rings need at least two slots");

  extern __shared__ __align__(1024) unsigned char fgattn_smem[];  // swizzle atoms are 1024-byte aligned
  const u32 sq = smem_u32(fgattn_smem);
  const u32 sk = sq + TM * D * 2;
  const u32 sv = sk + STAGES * TN * D * 2;
  const WsBarriers<STAGES> bars{sv + STAGES * TN * D * 2};
  if (threadIdx.x == 0) {
    // wgmma's swizzle needs 1024-byte aligned tiles; the barriers need the launcher's extra bytes.
    if ((sq & 1023u) || dynamic_smem_bytes() < u32(SmemBytes<Cfg>::value + kWsExtraBytes)) asm volatile("trap;");
    bars.init(Cfg::kWarps);
  }
  __syncthreads();  // the barriers are initialised before any thread uses them

  const int m0 = blockIdx.x * TM;
  const int bh_local = blockIdx.y;
  const int bh = a.bh_start + bh_local;
  const int b = bh / a.n_heads, h = bh % a.n_heads;
  const long long list = (long long)bh_local * a.n_qblocks + m0 / Cfg::kQueryBlock;
  const int n_keys = __ldg(a.n_keys + list);
  const int rows_left = a.seq_q - m0;  // valid rows of this tile (>= 1)
  const int wg = threadIdx.x >> 7;

  // setmaxnreg moves registers from the producer to the consumers (with two consumers: 128 x 40 +
  // 256 x 232 = 384 x 168, the budget at entry); one consumer fits in the entry budget.
  if (wg == 0) {
    if constexpr (Shape::kConsumers == 2) setmaxnreg_dec<40>();
    if (n_keys > 0) {
      ws_produce<Cfg>(a, bars, sq, sk, sv, a.q + b * a.q_sb + h * a.q_sh + m0 * a.q_sm, rows_left,
                      a.k + b * a.k_sb + h * a.k_sh, a.v + b * a.v_sb + h * a.v_sh,
                      a.idx + list * a.idx_row_stride, n_keys);
    }
  } else {
    if constexpr (Shape::kConsumers == 2) setmaxnreg_inc<232>();
    const int c = wg - 1, cwarp = (threadIdx.x >> 5) - 4, lane = threadIdx.x & 31;
    WsConsumer<Cfg> consumer{bars, sq, sk, sv, n_keys, (n_keys + TN - 1) / TN, c, cwarp, lane, a.qk_scale};
    float lse[2];
    consumer.run(lse);
    named_sync(kEpilogueBar + c, 128);  // every warp of this consumer is done reading its Q rows
    store_warp_rows<T, D, TM>(consumer.o, lse, sq, cwarp * 16, lane, rows_left,
                              a.o + b * a.o_sb + h * a.o_sh + m0 * a.o_sm, a.o_sm,
                              a.lse + (long long)bh * a.seq_q + m0, a.write_lse);
  }
}

}  // namespace fgattn
