// KeySet bitmask -> sorted key-block index lists, one warp per (bh, query block) row.
// Built with NVRTC by fgattn_gen/compaction.py (the Triton kernel there is the interpreter/CPU form).
//
// Each lane loads one word of a batch of 32 words (several batches in flight); a warp scan of the popcounts gives each word's first
// rank; then, word by word, lane l writes the key-block index of bit l if it is set, at rank
// base + popc(word & lanes below l): consecutive selected bits go to consecutive addresses (coalesced).
// Work is per word, not per bit, and empty words are skipped.

extern "C" __global__ void __launch_bounds__(32 * FGATTN_COMPACT_WARPS)
fgattn_compact_keys(const unsigned* __restrict__ bits, int* __restrict__ idx, int* __restrict__ n_keys,
                    int n_words, int n_kblocks, int seq_k, int key_gran, int n_qblocks, int bh_start,
                    int n_rows) {
  const unsigned full = 0xffffffffu;
  const int row = blockIdx.x * FGATTN_COMPACT_WARPS + threadIdx.y;  // local (bh, query block) row
  if (row >= n_rows) return;
  const int lane = threadIdx.x;
  const long long src_row = (long long)bh_start * n_qblocks + row;
  const unsigned* src = bits + src_row * n_words;
  int* dst = idx + (long long)row * n_kblocks;
  const unsigned below = (1u << lane) - 1u;

  // Batches of 32 words (one per lane), loaded DEPTH batches at a time so the loads overlap the work.
  constexpr int DEPTH = 4;
  int rank = 0;
  unsigned next[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) next[d] = (d * 32 + lane < n_words) ? __ldg(src + d * 32 + lane) : 0u;
  for (int g0 = 0; g0 < n_words; g0 += 32 * DEPTH) {
    unsigned batch[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      batch[d] = next[d];
      const int w = g0 + (DEPTH + d) * 32 + lane;
      next[d] = w < n_words ? __ldg(src + w) : 0u;
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int w0 = g0 + d * 32;
      if (w0 >= n_words) break;
      unsigned word = batch[d];
      const int tail = n_kblocks - (w0 + lane) * 32;  // padding bits past n_kblocks count for nothing
      if (tail < 32) word &= tail <= 0 ? 0u : ((1u << tail) - 1u);
      const int count = __popc(word);
      int incl = count;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(full, incl, o);
        if (lane >= o) incl += t;
      }
      const int excl = incl - count;
      unsigned nonzero = __ballot_sync(full, word != 0u);
      while (nonzero) {
        const int j = __ffs(nonzero) - 1;
        nonzero &= nonzero - 1u;
        const unsigned wj = __shfl_sync(full, word, j);
        const int base = rank + __shfl_sync(full, excl, j);
        if ((wj >> lane) & 1u) dst[base + __popc(wj & below)] = (w0 + j) * 32 + lane;
      }
      rank += __shfl_sync(full, incl, 31);
    }
  }
  if (lane == 0) {
    const int last = n_kblocks - 1;
    const int last_selected = (src[last / 32] >> (last % 32)) & 1u;
    n_keys[row] = rank * key_gran - last_selected * (n_kblocks * key_gran - seq_k);
  }
}
