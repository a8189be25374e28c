// What both kernel bodies share with the launcher: the argument block and the tiles' shared memory.
#pragma once

namespace fgattn {

// Kernel arguments. Strides are in elements; q/k/v/o rows are 16-byte aligned (checked by the launcher).
struct AttentionArgs {
  const unsigned short* q;
  const unsigned short* k;
  const unsigned short* v;
  unsigned short* o;
  float* lse;          // fp32 [B * H, seq_q]; written when write_lse
  const int* idx;      // int32 [n_bh, n_qblocks, idx_row_stride]: sorted selected key blocks
  const int* n_keys;   // int32 [n_bh, n_qblocks]: selected keys (not blocks)
  const int* order;    // int32 [n_items]: item -> query tile (schedule.cuh); read only when kOrder != 0
  long long q_sb, q_sh, q_sm, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sm;
  int n_heads, seq_q, n_qblocks, idx_row_stride, bh_start;
  int n_mtiles, n_items;  // query tiles per (batch, head) row; tiles of the launch (n_bh * n_mtiles)
  float qk_scale;      // softmax scale * log2(e)
  int write_lse;
};

// Shared memory of the Q tile and the K/V stages: (kTileM + 2 * kStages * kTileN) * kHeadDim * 2 bytes
// (a constant, not a function: NVRTC allows no host code). The warp-specialized kernel adds its barriers.
template <class Cfg>
struct SmemBytes {
  static constexpr int value = (Cfg::kTileM + 2 * Cfg::kStages * Cfg::kTileN) * Cfg::kHeadDim * 2;
};

}  // namespace fgattn
