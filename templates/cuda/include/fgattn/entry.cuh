// The kernel body of a build and its block size: the warp-specialized body (gather_attention_ws.cuh,
// one producer warpgroup + kTileM / 64 consumer warpgroups) with -DFGATTN_WARP_SPECIALIZED (sm_90a only),
// else the pipelined body (gather_attention.cuh, kWarps warps that all gather and multiply).
#pragma once

#include "fgattn/kernel_args.cuh"

#if defined(FGATTN_WARP_SPECIALIZED)
#include "fgattn/gather_attention_ws.cuh"
#else
#include "fgattn/gather_attention.cuh"
#endif

namespace fgattn {

template <class Cfg>
struct Kernel {
#if defined(FGATTN_WARP_SPECIALIZED)
  static constexpr int kThreads = WsShape<Cfg>::kThreads;
  static __device__ __forceinline__ void run(const AttentionArgs& a) { gather_attention_ws<Cfg>(a); }
#else
  static constexpr int kThreads = 32 * Cfg::kWarps;
  static __device__ __forceinline__ void run(const AttentionArgs& a) { gather_attention<Cfg>(a); }
#endif
};

}  // namespace fgattn
