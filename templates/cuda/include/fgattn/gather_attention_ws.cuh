// Warp-specialized gather-load sparse attention forward (sm_90a, -DFGATTN_WARP_SPECIALIZED), after
// FlashAttention-3. A CTA computes tiles of TILE_M query rows of one (batch, head) row, as in
// gather_attention.cuh: one, or several in a row when persistent (schedule.cuh picks which); the roles are
// split by warpgroup:
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
//   q_empty            (persistent) every consumer warp has stored its output rows, which it stages in
//                      the Q tile: one arrival per consumer warp. The producer gathers a tile's first key
//                      tiles before it waits on it, so they overlap the previous tile's epilogue.
//   k_full[s] v_full[s] slot s of the K / V ring landed   128 cp.async arrivals
//   k_empty[s] v_empty[s] every consumer warp has read slot s: one arrival per consumer warp
// cp.async writes through the generic proxy and wgmma reads through the async proxy, so a consumer
// fences (fence.proxy.async) after its full-barrier waits and before its wgmma. The ring positions run on
// over a persistent CTA's tiles; there, q_full and q_empty alternate once per tile (a tile without keys
// too: the producer arrives on q_full without copying), so neither side is ever two phases ahead.
#pragma once

#include "fgattn/epilogue.cuh"
#include "fgattn/gather.cuh"
#include "fgattn/kernel_args.cuh"
#include "fgattn/ptx.cuh"
#include "fgattn/schedule.cuh"
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
  static_assert(8 * (2 + 4 * Cfg::kStages) <= kWsExtraBytes, "the mbarriers must fit the extra bytes");
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
  __device__ __forceinline__ u32 q_empty() const { return base + 8 * (1 + 4 * STAGES); }

  __device__ __forceinline__ void init(int consumer_warps) const {
    mbar_init(q_full(), 128);
    mbar_init(q_empty(), consumer_warps);
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(k_full(s), 128);
      mbar_init(v_full(s), 128);
      mbar_init(k_empty(s), consumer_warps);
      mbar_init(v_empty(s), consumer_warps);
    }
  }
};

// The producer warpgroup (threads 0 .. 127): per query tile Q, K_0, (K_1, V_0), (K_2, V_1), .., V_last. On a
// persistent CTA's later tiles Q comes after the first min(STAGES - 1, key tiles) steps: those only need
// ring slots the previous tile has released, so they are in flight while its epilogue runs.
template <class Cfg>
struct WsProducer {
  static constexpr int D = Cfg::kHeadDim, TN = Cfg::kTileN, STAGES = Cfg::kStages;
  static constexpr u32 kKVBytes = TN * D * 2;
  using Gather = WarpgroupGather<D, TN, Cfg::kKeyGran>;

  // Few registers held across a persistent CTA's tiles (the producer has 40): the K and V rings and the
  // barriers are at fixed offsets from the Q tile.
  u32 sq;
  RingPos<STAGES> kpos, vpos;  // run on over the tiles

  __device__ __forceinline__ u32 sk() const { return sq + Cfg::kTileM * D * 2; }
  __device__ __forceinline__ u32 sv() const { return sk() + STAGES * kKVBytes; }
  __device__ __forceinline__ WsBarriers<STAGES> bars() const { return {sv() + STAGES * kKVBytes}; }

  // Q tile -> shared memory, completing q_full; after the CTA's first tile (`before` tiles before this one),
  // only once the consumers' previous tile is out of it.
  __device__ __forceinline__ void load_q(const unsigned short* q_tile, long long q_sm, int rows_left, int before,
                                         bool copy, int tid) {
    if (before > 0) mbar_wait(bars().q_empty(), u32(before - 1) & 1u);
    if (copy) {
      // Opaque, so that the copy's addresses are computed here, not hoisted out of a persistent CTA's tile
      // loop into registers the producer does not have.
      if constexpr (Cfg::kPersist != 0) asm volatile("" : "+r"(tid));
      load_rows_async<D, Cfg::kTileM, 128>(sq, q_tile, q_sm, rows_left, tid);
      mbar_arrive_cp_async(bars().q_full());
    } else {
      mbar_arrive(bars().q_full());  // a tile without keys: the consumers only take their turn
    }
  }

  // One query tile, `before` tiles after the CTA's first (Schedule::tiles_before). n_keys == 0 only on a
  // persistent CTA (the others skip such tiles).
  __device__ __forceinline__ void tile(const AttentionArgs& a, const unsigned short* q_tile, int rows_left,
                                       const unsigned short* k_head, const unsigned short* v_head, const int* idx_row,
                                       int n_keys, int before) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (n_keys == 0) {
      load_q(q_tile, a.q_sm, rows_left, before, false, tid);
      return;
    }
    const int n_tiles = (n_keys + TN - 1) / TN;
    const u32 k_row_bytes = u32(a.k_sn * 2), v_row_bytes = u32(a.v_sn * 2);
    int key_k = Gather::fetch(idx_row, n_keys, 0, warp, lane);  // this lane's key row of K tile t
    int key_v = -1;                                              // .. of V tile t - 1
    int t = 0;
    if (before > 0) {  // two loops, not a test in one: the Q copy's addresses would cost the loop registers
      for (const int q_at = min(STAGES - 1, n_tiles); t < q_at; ++t) {
        step(t, n_tiles, k_head, k_row_bytes, v_head, v_row_bytes, idx_row, n_keys, key_k, key_v, warp, lane);
      }
    }
    load_q(q_tile, a.q_sm, rows_left, before, true, tid);
    for (; t <= n_tiles; ++t) {
      step(t, n_tiles, k_head, k_row_bytes, v_head, v_row_bytes, idx_row, n_keys, key_k, key_v, warp, lane);
    }
  }

  // Step t of a tile: K tile t (t < n_tiles), V tile t - 1 (t > 0); then the key rows of K tile t + 1.
  __device__ __forceinline__ void step(int t, int n_tiles, const unsigned short* k_head, u32 k_row_bytes,
                                       const unsigned short* v_head, u32 v_row_bytes, const int* idx_row, int n_keys,
                                       int& key_k, int& key_v, int warp, int lane) {
    if (t < n_tiles) {
      mbar_wait(bars().k_empty(kpos.slot), kpos.phase ^ 1u);  // the consumers are done with K tile t - STAGES
      Gather::issue(sk() + kpos.slot * kKVBytes, k_head, k_row_bytes, key_k, warp, lane);
      mbar_arrive_cp_async(bars().k_full(kpos.slot));
      kpos.advance();
    }
    if (t > 0) {
      mbar_wait(bars().v_empty(vpos.slot), vpos.phase ^ 1u);  // .. with V tile t - 1 - STAGES
      Gather::issue(sv() + vpos.slot * kKVBytes, v_head, v_row_bytes, key_v, warp, lane);
      mbar_arrive_cp_async(bars().v_full(vpos.slot));
      vpos.advance();
    }
    key_v = key_k;
    key_k = Gather::fetch(idx_row, n_keys, t + 1, warp, lane);  // in flight during the next empty-wait
  }
};

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
  int c, cwarp, lane;
  float qk_scale;
  int n_keys = 0, n_tiles = 0;  // of the current query tile
  u32 q_phase = 0;
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

  // Every key tile of a query tile selecting `keys` keys; leaves the normalised O fragments in o and the rows'
  // LSE in lse. `take_q`: wait for the Q tile's turn even without keys (persistent CTAs).
  __device__ __forceinline__ void run(int keys, bool take_q, float (&lse)[2]) {
    n_keys = keys;
    n_tiles = (keys + TN - 1) / TN;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
    }
    softmax.init();
    if (take_q || n_keys > 0) {
      mbar_wait(bars.q_full(), q_phase);  // (its proxy fence is the first step's)
      q_phase ^= 1u;
    }
    if (n_keys > 0) {
      if (kPingPong && c == 1) named_arrive(kSchedBar + 0, 256);  // consumer 0 issues first
      step<false>(0);
      for (int j = 1; j < n_tiles; ++j) step<true>(j);
      mbar_wait(bars.v_full(vpos.slot), vpos.phase);  // the last tile's P V
      fence_proxy_async_shared();
      Mma::pv(o, pa, sv + vpos.slot * kKVBytes, lane);
      if constexpr (Cfg::kPersist != 0) {  // the ring runs on into the CTA's next tile
        if (lane == 0) mbar_arrive(bars.v_empty(vpos.slot));
        vpos.advance();
      }
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

  using Sched = Schedule<Cfg>;
  const int wg = threadIdx.x >> 7;

  // setmaxnreg moves registers from the producer to the consumers (with two consumers: 128 x 40 +
  // 256 x 232 = 384 x 168, the budget at entry); one consumer fits in the entry budget.
  if (wg == 0) {
    if constexpr (Shape::kConsumers == 2) setmaxnreg_dec<40>();
    WsProducer<Cfg> producer{sq};
    for (int item = Sched::first(); item < a.n_items; item = Sched::next(a, item)) {
      const WorkTile t = Sched::tile(a, item);
      const int bh = a.bh_start + t.bh_local;
      const int b = bh / a.n_heads, h = bh % a.n_heads;
      const long long list = (long long)t.bh_local * a.n_qblocks + t.m0 / Cfg::kQueryBlock;
      const int n_keys = __ldg(a.n_keys + list);
      if (n_keys > 0 || Sched::kPersistent) {
        producer.tile(a, a.q + b * a.q_sb + h * a.q_sh + t.m0 * a.q_sm, a.seq_q - t.m0, a.k + b * a.k_sb + h * a.k_sh,
                      a.v + b * a.v_sb + h * a.v_sh, a.idx + list * a.idx_row_stride, n_keys,
                      Sched::tiles_before(item));
      }
    }
    cp_async_wait_all();  // no copy outlives its issuing thread
  } else {
    if constexpr (Shape::kConsumers == 2) setmaxnreg_inc<232>();
    const int c = wg - 1, cwarp = (threadIdx.x >> 5) - 4, lane = threadIdx.x & 31;
    WsConsumer<Cfg> consumer{bars, sq, sk, sv, c, cwarp, lane, a.qk_scale};
    for (int item = Sched::first(); item < a.n_items; item = Sched::next(a, item)) {
      const WorkTile t = Sched::tile(a, item);
      const int bh = a.bh_start + t.bh_local;
      const int b = bh / a.n_heads, h = bh % a.n_heads;
      const long long list = (long long)t.bh_local * a.n_qblocks + t.m0 / Cfg::kQueryBlock;
      float lse[2];
      consumer.run(__ldg(a.n_keys + list), Sched::kPersistent, lse);
      named_sync(kEpilogueBar + c, 128);  // every warp of this consumer is done reading its Q rows
      store_warp_rows<T, D, TM>(consumer.o, lse, sq, cwarp * 16, lane, a.seq_q - t.m0,
                                a.o + b * a.o_sb + h * a.o_sh + t.m0 * a.o_sm, a.o_sm,
                                a.lse + (long long)bh * a.seq_q + t.m0, a.write_lse);
      if (Sched::kPersistent) {  // this warp's output rows are out of the Q tile
        __syncwarp();
        if (lane == 0) mbar_arrive(bars.q_empty());
      }
    }
  }
}

}  // namespace fgattn
