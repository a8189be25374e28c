// Synchronisation primitives of the warp-specialized kernel (sm_90a): shared-memory mbarriers, named
// barriers, and setmaxnreg. Self-contained PTX wrappers (no CUDA headers), like ptx.cuh.
//
// mbarrier phases: a barrier initialised with count N completes its current phase after N arrivals and
// starts the next; wait(bar, parity) returns once the phase of that parity has completed. A fresh barrier
// is in phase 0, and a wait for parity 1 returns at once (the phase "before" 0 counts as completed), so a
// producer waiting for a free slot starts with parity 1.
#pragma once

#include "fgattn/ptx.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace fgattn {

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// One arrival (release semantics: this thread's earlier memory accesses happen before the phase completes).
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// One arrival, made by the hardware once every cp.async this thread issued before it has landed
// (.noinc: it counts against the barrier's initial count, so each copying thread arrives once per phase).
__device__ __forceinline__ void mbar_arrive_cp_async(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Blocks until the phase of `parity` has completed (acquire semantics).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Named barriers (ids 1..15; 0 is __syncthreads): `threads` arrivals in all, a multiple of 32.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Registers per thread of the executing warpgroup (a multiple of 8 in [24, 256]); every warp of the
// warpgroup must execute it.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace fgattn
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
