// The work schedule: which query tiles a CTA computes and in which order (variant fields order, persist;
// FgattnConfig kOrder, kPersist).
//
// A launch covers n_items = n_bh * n_mtiles query tiles of kTileM rows (n_bh: the launch's (batch, head)
// rows). Tile g is (bh_local = g / n_mtiles, m tile g % n_mtiles): consecutive tiles share a head, so
// CTAs that run together gather K/V rows of the same head and meet in L2. Item i of the launch is tile
// g = order[i] when kOrder != 0 (a permutation from fgattn_gen.compaction.work_order: heavier tiles first),
// else g = i.
//   kPersist == 0: grid (n_mtiles, n_bh); CTA (x, y) takes item y * n_mtiles + x, the order in which the
//     hardware dispatches CTAs (raster order without kOrder: tile g = that item).
//   kPersist == 1: grid (min(n_items, #SMs), 1); CTA c takes items c, c + gridDim.x, c + 2 gridDim.x, ..
//     (static stride; with kOrder the CTAs take the heavy tiles first, round-robin).
#pragma once

#include "fgattn/kernel_args.cuh"

namespace fgattn {

struct WorkTile {
  int bh_local;  // (batch, head) row of the launch
  int m0;        // first query row
};

template <class Cfg>
struct Schedule {
  static constexpr bool kOrdered = Cfg::kOrder != 0;
  static constexpr bool kPersistent = Cfg::kPersist != 0;
  static_assert(Cfg::kOrder >= 0 && Cfg::kOrder <= 2 && (Cfg::kPersist == 0 || Cfg::kPersist == 1),
                "order in {0, 1, 2}, persist in {0, 1}");

  // This CTA's first item (< n_items: the launcher never starts an idle CTA).
  static __device__ __forceinline__ int first() {
    return kPersistent ? int(blockIdx.x) : int(blockIdx.y * gridDim.x + blockIdx.x);
  }
  // The item after `item`; n_items or more when this CTA is done.
  static __device__ __forceinline__ int next(const AttentionArgs& a, int item) {
    return kPersistent ? item + int(gridDim.x) : a.n_items;
  }
  // The CTA's tiles before `item` (item = first() + n gridDim.x with first() < gridDim.x when persistent).
  static __device__ __forceinline__ int tiles_before(int item) { return kPersistent ? item / int(gridDim.x) : 0; }
  static __device__ __forceinline__ WorkTile tile(const AttentionArgs& a, int item) {
    if (!kOrdered && !kPersistent) return {int(blockIdx.y), int(blockIdx.x) * Cfg::kTileM};
    const int g = kOrdered ? __ldg(a.order + item) : item;
    return {g / a.n_mtiles, (g % a.n_mtiles) * Cfg::kTileM};
  }
};

}  // namespace fgattn
