// Top-p key selection with the whole row of scores in registers: one CTA per (block, head), it walks the
// block's rows and ORs their kept keys into KeySet words (or, for a block flagged in keep_all, writes every
// key without searching). Built with NVRTC by
// fgattn_gen/predictors/threshold.py, which holds the rule (bisection of the log threshold lo < t < hi,
// kept keys e >= exp(lo)) and the Triton forms (interpreter, rows longer than THREADS * ELEMS).
//
// Thread t holds keys i * THREADS + t (coalesced loads); for chunk i, warp w's 32 lanes hold 32 consecutive
// keys, so one ballot is KeySet word i * WARPS + w. Each bisection step is one block reduction, whose
// latency, not the arithmetic, bounds a step.
//
// The steps cost a compare-select-add per key. After FULL_STEPS of them only the keys inside the
// bracket, exp(lo) <= e < exp(hi), can still change the mass; the keys above it always count. If those
// candidates fit CAND_CAP, they are compacted into shared memory and the remaining steps walk only them,
// two steps per reduction (three thresholds per pass).

constexpr int THREADS = FGATTN_TOPP_THREADS;
constexpr int ELEMS = FGATTN_TOPP_ELEMS;
constexpr int WARPS = THREADS / 32;
constexpr int WORDS_PER_LANE = (ELEMS + 31) / 32;
constexpr int FULL_STEPS = 4;
constexpr int CAND_CAP = 8192;

// Block-wide reductions: shuffles, then one shared-memory exchange. Two buffers alternate, so one barrier per
// reduction suffices; every thread gets the same value, combined in the same order.
struct BlockReduce {
  float (*buf)[3][WARPS];
  int parity = 0;

  __device__ float sum(float v) {
    float r[3] = {v, 0.f, 0.f};
    all<1>(r);
    return r[0];
  }
  __device__ void sum3(float (&v)[3]) { all<3>(v); }

  // Softmax statistics: per thread (max m, sum z of exp(x - m)) -> the block's (max, sum of exp(x - max)).
  __device__ void max_and_sum(float& m, float& z) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) merge(m, z, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, z, o));
    float (*slot)[WARPS] = buf[parity];
    parity ^= 1;
    if ((threadIdx.x & 31) == 0) {
      slot[0][threadIdx.x >> 5] = m;
      slot[1][threadIdx.x >> 5] = z;
    }
    __syncthreads();
    m = slot[0][0];
    z = slot[1][0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) merge(m, z, slot[0][w], slot[1][w]);
  }

 private:
  __device__ static void merge(float& m, float& z, float m2, float z2) {
    const float mm = fmaxf(m, m2);
    z = (m == mm ? z : z * __expf(m - mm)) + (m2 == mm ? z2 : z2 * __expf(m2 - mm));
    m = mm;
  }

  template <int N>
  __device__ void all(float (&v)[3]) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    float (*slot)[WARPS] = buf[parity];
    parity ^= 1;
    if ((threadIdx.x & 31) == 0)
#pragma unroll
      for (int k = 0; k < N; ++k) slot[k][threadIdx.x >> 5] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float r = slot[k][0];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) r += slot[k][w];
      v[k] = r;
    }
  }
};

// One bisection step over the keys held in registers: keep lo where the mass above exp(t) reaches target.
__device__ __forceinline__ void register_step(const float (&e)[ELEMS], float target, float& lo, float& hi,
                                              BlockReduce& reduce) {
  const float t = 0.5f * (lo + hi);
  const float te = __expf(t);
  float mass = 0.f;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) mass += e[i] >= te ? e[i] : 0.f;
  if (reduce.sum(mass) >= target) lo = t; else hi = t;
}

// Exclusive prefix sum of one int per thread over the block, and the total. Uses (and frees) buf.
__device__ int block_exclusive_scan(int v, int* buf, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) buf[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    before += w < warp ? buf[w] : 0;
    total += buf[w];
  }
  __syncthreads();
  return before + incl - v;
}

extern "C" __global__ void __launch_bounds__(THREADS)
fgattn_top_p_words(const float* __restrict__ scores, const bool* __restrict__ keep_all,
                   unsigned* __restrict__ words, int n_rows, int n_keys, int n_words, int rows_per_block,
                   float top_p, int steps) {
  __shared__ float red[2][3][WARPS];
  __shared__ int scan[WARPS];
  __shared__ float cand[CAND_CAP];
  BlockReduce reduce{red};
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const long long n = blockIdx.y;
  unsigned* out = words + (n * gridDim.x + blockIdx.x) * (long long)n_words;
  if (keep_all[n * gridDim.x + blockIdx.x]) {  // every key, no search
    for (int w = threadIdx.x; w < n_words; w += THREADS) {
      const int tail = n_keys - 32 * w;
      out[w] = tail >= 32 ? 0xffffffffu : (1u << tail) - 1u;
    }
    return;
  }
  const int first = blockIdx.x * rows_per_block;
  const int last = min(first + rows_per_block, n_rows);
  const float neg_inf = __int_as_float(0xff800000);
  unsigned acc[WORDS_PER_LANE];
#pragma unroll
  for (int c = 0; c < WORDS_PER_LANE; ++c) acc[c] = 0u;

#pragma unroll 1
  for (int r = first; r < last; ++r) {
    const float* row = scores + (n * n_rows + r) * (long long)n_keys;
    float e[ELEMS];
    float m_own = neg_inf;  // this thread's max (-inf if it holds padding only)
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) {
      const int j = i * THREADS + threadIdx.x;
      e[i] = j < n_keys ? __ldg(row + j) : neg_inf;
      m_own = fmaxf(m_own, e[i]);
    }
    const float base = m_own == neg_inf ? 0.f : m_own;
    float z = 0.f;
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) {
      e[i] = __expf(e[i] - base);  // padding: exp(-inf) = 0, never kept (the threshold stays > 0)
      z += e[i];
    }
    float m = m_own;
    reduce.max_and_sum(m, z);
    const float rescale = m_own == neg_inf ? 0.f : __expf(m_own - m);  // to exp(x - row max)
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) e[i] *= rescale;
    const float target = top_p * z;
    float lo = __logf((1.f - top_p) * z / n_keys) - 1.f;
    float hi = 1.f;
    int s = 0;
#pragma unroll 1
    for (; s < min(steps, FULL_STEPS); ++s) register_step(e, target, lo, hi, reduce);
    if (s < steps) {
      // Keys at or above exp(hi) count at every later step; keys below exp(lo) never do.
      const float lo_e = __expf(lo), hi_e = __expf(hi);
      float above = 0.f;
      int count = 0;
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) {
        above += e[i] >= hi_e ? e[i] : 0.f;
        count += (e[i] >= lo_e) & (e[i] < hi_e);
      }
      int total;
      int at = block_exclusive_scan(count, scan, total);
      above = reduce.sum(above);
      if (total <= CAND_CAP) {  // uniform across the block
#pragma unroll
        for (int i = 0; i < ELEMS; ++i)
          if ((e[i] >= lo_e) & (e[i] < hi_e)) cand[at++] = e[i];
        __syncthreads();
        // Two bisection steps per reduction: the midpoint and both possible second midpoints at once.
#pragma unroll 1
        for (; s + 1 < steps; s += 2) {
          const float t_mid = 0.5f * (lo + hi);
          const float t[3] = {0.5f * (lo + t_mid), t_mid, 0.5f * (t_mid + hi)};
          const float te[3] = {__expf(t[0]), __expf(t[1]), __expf(t[2])};
          float mass[3] = {0.f, 0.f, 0.f};
          for (int c = threadIdx.x; c < total; c += THREADS) {
            const float x = cand[c];
#pragma unroll
            for (int k = 0; k < 3; ++k) mass[k] += x >= te[k] ? x : 0.f;
          }
          reduce.sum3(mass);
          if (above + mass[1] >= target) {
            lo = t_mid;
            if (above + mass[2] >= target) lo = t[2]; else hi = t[2];
          } else {
            hi = t_mid;
            if (above + mass[0] >= target) lo = t[0]; else hi = t[0];
          }
        }
        if (s < steps) {
          const float t = 0.5f * (lo + hi);
          const float te = __expf(t);
          float mass = 0.f;
          for (int c = threadIdx.x; c < total; c += THREADS) mass += cand[c] >= te ? cand[c] : 0.f;
          if (above + reduce.sum(mass) >= target) lo = t; else hi = t;
        }
        __syncthreads();  // cand is rewritten by the next row
      } else {
#pragma unroll 1
        for (; s < steps; ++s) register_step(e, target, lo, hi, reduce);
      }
    }
    const float keep_from = __expf(lo);
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) {
      const unsigned word = __ballot_sync(0xffffffffu, e[i] >= keep_from);
      if (lane == (i & 31)) acc[i >> 5] |= word;
    }
  }
#pragma unroll
  for (int c = 0; c < WORDS_PER_LANE; ++c) {
    const int i = c * 32 + lane;
    const int w = i * WARPS + warp;
    if (i < ELEMS && w < n_words) out[w] = acc[c];
  }
}
