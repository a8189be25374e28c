// fp8 statistics pass of the exact-mask refresh, mode "words" (sm_90a): for query blocks of 128 rows and
// every key j, bit j of the block's KeySet words is set where max_i p_ij > threshold for some row i of the
// block. Built with NVRTC by fgattn_gen/predictors/block_stats.py (``_block_stat_cuda``), which also holds the
// rule, the operands' preparation and the Triton form of the same pass.
//
// Inputs (block_stats._fp8_operands(..., layout="wgmma")): q8 [n, Sq_pad, D] and k8 [n, Sk_pad, D] e4m3,
// q per row and (mean-centred) k per head scaled, rows padded (Sq_pad: multiple of 256, Sk_pad: of 64) and
// each row's 16-byte chunks already permuted as the wgmma shared-memory swizzle wants them (D = 128: chunk
// c of row r at c ^ (r % 8), the 128-byte swizzle; D = 64: at c ^ ((r / 2) % 4), the 64-byte swizzle), so
// a tile is one contiguous bulk copy (cp.async.bulk, no tensor map) that lands in smem ready for wgmma.
// lse [n, Sq] (natural log, shifted by the centring) and qscale [n, Sq] (log2 units per unit of q8.k8).
// The score of (i, j) in log2 units is s_ij * qscale_i - lse_i * log2(e); the rule
//   s_ij * qscale_i - lse2_i > log2(threshold)   <=>   s_ij > c_i = (log2(threshold) + lse2_i) / qscale_i
// (qscale_i > 0) needs one compare per score: the epilogue ORs (s_ij > c_i) over the block's rows, with
// c_i = +inf for rows past Sq and for the second block of a pair past the last block.
//
// CTA = (pair of query blocks qb, qb + 1; head; range of tiles_per_cta key tiles): 384 threads,
// warp-specialized. Key ranges split a head's keys over several CTAs (grid z) when that fills the last wave
// of CTAs better; their words are disjoint (a tile is two whole words).
//   warpgroup 0: producer; one thread loads the 256 query rows once and streams the head's keys, 64 keys
//     (one stage) per bulk copy, through a STAGES-deep ring of shared-memory stages (full / empty mbarriers).
//   warpgroups 1, 2: consumers; the CTA's i-th tile (keys 64 t .. 64 t + 63, t = t0 + i, stage i % STAGES)
//     belongs to consumer i % 2.
//     S^T = K_t Q^T with wgmma m64n256k32 e4m3 (keys = M: the OR over query rows is along a row of the
//     accumulator, i.e. within a thread and then a quad), both operands K-major from shared memory. The two
//     consumers take turns issuing (named barriers 1, 2: ping-pong), so one's epilogue runs while the
//     tensor cores work on the other's tile.
// Pairing two query blocks halves the key traffic from L2 per query row and makes N = 256, the widest wgmma:
// per instruction 2 KB (A) + 8 KB (B) of shared memory are read for 64 x 256 x 32 products (80 B/clock at
// the tensor cores' rate, inside the 128 B/clock of shared memory; N = 128 would need 96 + 32 (copies)).
//
// Epilogue per tile and thread: the accumulator holds keys (lane / 4) and (lane / 4 + 8) of its warp's 16
// keys, columns 8 j + 2 (lane % 4) + {0, 1}, j < 32 (j < 16: block qb; j >= 16: block qb + 1). 128 compares
// against c (64 values per thread, held in registers) give four predicates (2 keys x 2 blocks); a ballot of
// each ORs the quad and packs the warp's 16 keys as nibbles, compressed to 16 bits; lanes 0 / 1 store the
// warp's half word of block qb / qb + 1 (16-bit stores; two warps make one 32-bit KeySet word).

#include "fgattn/sync_sm90.cuh"
#include "fgattn/wgmma_ops.cuh"

constexpr int HEAD_DIM = FGATTN_STAT_HEAD_DIM;
constexpr int STAGES = FGATTN_STAT_STAGES;
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head dim 64 or 128");
static_assert(STAGES % 2 == 0 && STAGES >= 2, "even stage count: stage s always serves consumer s % 2");

using namespace fgattn;  // u32, smem_u32, dynamic_smem_bytes, mbarriers, named barriers, wgmma_fence / commit / wait
typedef unsigned long long u64;

constexpr int ROW_BYTES = HEAD_DIM;  // e4m3: one byte per element
constexpr int TILE_KEYS = 64;        // wgmma M, keys per stage
constexpr int Q_ROWS = 256;          // wgmma N: two query blocks
constexpr int BLOCK_M = 128;
constexpr int K_STEPS = HEAD_DIM / 32;
constexpr int Q_BYTES = Q_ROWS * ROW_BYTES;
constexpr int STAGE_BYTES = TILE_KEYS * ROW_BYTES;
constexpr int SMEM_Q = 0;
constexpr int SMEM_K = SMEM_Q + Q_BYTES;
constexpr int SMEM_C = SMEM_K + STAGES * STAGE_BYTES;
constexpr int SMEM_BAR = SMEM_C + Q_ROWS * 4;
constexpr int SMEM_BYTES = SMEM_BAR + (2 * STAGES + 1) * 8 + 1024;  // + slack to align the base to 1024
#ifdef FGATTN_STAT_EXPECT_SMEM  // the launcher's size (block_stats.cuda_stat_smem_bytes), checked by the build test
static_assert(SMEM_BYTES == FGATTN_STAT_EXPECT_SMEM, "launcher and kernel disagree on the shared-memory size");
#endif
constexpr u64 SWIZZLE_MODE = HEAD_DIM == 128 ? 1 : 2;  // descriptor bits 62-63: 128-byte / 64-byte swizzle
constexpr u32 SBO = 8 * ROW_BYTES;                     // bytes between 8-row groups
constexpr int THREADS = 384;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// bytes (multiple of 16, both addresses 16-byte aligned) global -> shared, completing on mbarrier bar
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// K-major operand descriptor: start address, LBO unused under swizzle (1), SBO between 8-row groups.
__device__ __forceinline__ u64 desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((u64)(SBO >> 4) << 32) | (SWIZZLE_MODE << 62);
}

// d (+)= A(keys x 32, smem) * B(256 query rows x 32, smem)^T, e4m3 inputs, fp32 accumulators; scale_d = 0
// overwrites d. d[4 j + e]: row (lane / 4) + 8 (e / 2) of the warp's 16, column 8 j + 2 (lane % 4) + e % 2.
__device__ __forceinline__ void wgmma_m64n256k32_e4m3(float (&d)[128], u64 desc_a, u64 desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// Keeps the compiler from moving accumulator reads / writes across this point (wgmma writes them async).
__device__ __forceinline__ void fence_regs(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Ballot of a predicate per lane -> 8 bits: bit g = OR of lanes 4 g .. 4 g + 3 (one quad per key).
__device__ __forceinline__ u32 quad_bits(u32 v) {
  v = (v | (v >> 1) | (v >> 2) | (v >> 3)) & 0x11111111u;
  v = (v | (v >> 3)) & 0x03030303u;
  v = (v | (v >> 6)) & 0x000F000Fu;
  return (v | (v >> 12)) & 0xFFu;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
fgattn_block_stat_fp8(const unsigned char* __restrict__ q8, const unsigned char* __restrict__ k8,
                      const float* __restrict__ lse, const float* __restrict__ qscale, int* __restrict__ out,
                      int seq_q, int seq_k, int n_qblocks, int n_words, float log2_threshold, int tiles_per_cta) {
  extern __shared__ unsigned char smem_raw[];
  const u32 base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int head = blockIdx.y;
  const int qb = 2 * blockIdx.x;
  const long long q_rows_pad = (seq_q + Q_ROWS - 1) / Q_ROWS * Q_ROWS;
  const long long k_rows_pad = (seq_k + TILE_KEYS - 1) / TILE_KEYS * TILE_KEYS;
  const int t0 = blockIdx.z * tiles_per_cta;  // this CTA's key tiles: t0 .. t0 + n_local - 1 (n_local >= 1)
  const int n_local = min((int)(k_rows_pad / TILE_KEYS) - t0, tiles_per_cta);
  const u32 full = base + SMEM_BAR;          // full[s]: stage s loaded (1 arrival + bytes)
  const u32 empty = full + 8 * STAGES;       // empty[s]: stage s read by its consumer's 4 warps
  const u32 q_full = empty + 8 * STAGES;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  if (tid == 0) {
    if (dynamic_smem_bytes() < (u32)SMEM_BYTES) __trap();  // launcher and kernel disagree on the layout
#pragma unroll 1
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 4);
    }
    mbar_init(q_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {  // ---------------------------------------------------------------- producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (tid == 0) {
      mbar_arrive_expect_tx(q_full, Q_BYTES);
      bulk_copy(base + SMEM_Q, q8 + ((long long)head * q_rows_pad + (long long)qb * BLOCK_M) * ROW_BYTES, Q_BYTES,
                q_full);
      const unsigned char* k_head = k8 + (long long)head * k_rows_pad * ROW_BYTES;
#pragma unroll 1
      for (int i = 0; i < n_local; ++i) {
        const int s = i % STAGES;
        mbar_wait(empty + 8 * s, ((i / STAGES) & 1) ^ 1);  // the first round passes at once
        mbar_arrive_expect_tx(full + 8 * s, STAGE_BYTES);
        bulk_copy(base + SMEM_K + s * STAGE_BYTES, k_head + (long long)(t0 + i) * STAGE_BYTES, STAGE_BYTES,
                  full + 8 * s);
      }
    }
    return;
  }

  // ------------------------------------------------------------------------------------ consumer warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  const int wg = warp / 4 - 1;  // consumer 0 or 1
  const int warp_in_wg = warp % 4;
  {  // c_i of the 256 rows: one row per consumer thread
    const int r = tid - 128;
    const int row = qb * BLOCK_M + r;
    float c = __int_as_float(0x7f800000);  // +inf: the row never passes
    if (qb + r / BLOCK_M < n_qblocks && row < seq_q) {
      const long long at = (long long)head * seq_q + row;
      const float a = qscale[at];
      const float t = log2_threshold + lse[at] * LOG2E;
      c = a > 0.f ? t / a : __int_as_float(t < 0.f ? 0xff800000 : 0x7f800000);
    }
    asm volatile("st.shared.f32 [%0], %1;" ::"r"(base + SMEM_C + 4 * r), "f"(c) : "memory");
  }
  named_sync(3, 256);
  float cth[32][2];  // c of this thread's accumulator columns 8 j + 2 (lane % 4) + {0, 1}
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                 : "=f"(cth[j][0]), "=f"(cth[j][1]) : "r"(base + SMEM_C + 4 * (8 * j + 2 * (lane % 4))));
  }
  if (wg == 1) named_arrive(1, 256);  // consumer 0 issues first
  mbar_wait(q_full, 0);

  const u64 desc_q = desc(base + SMEM_Q);
  float acc[128];
#pragma unroll 1
  for (int i = wg; i < n_local; i += 2) {
    const int t = t0 + i;
    const int s = i % STAGES;
    mbar_wait(full + 8 * s, (i / STAGES) & 1);
    named_sync(1 + wg, 256);  // my turn on the tensor cores
    const u64 desc_k = desc(base + SMEM_K + s * STAGE_BYTES);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ++ks) {
      // k32 step ks: 32 bytes further along the (swizzled) rows; the descriptor address is in 16-byte units
      wgmma_m64n256k32_e4m3(acc, desc_k + 2 * ks, desc_q + 2 * ks, ks > 0 ? 1 : 0);
    }
    wgmma_commit();
    if (i + 1 < n_local) named_arrive(2 - wg, 256);  // the other consumer's next tile may issue
    wgmma_wait<0>();
    fence_regs(acc);
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + 8 * s);  // this warp is done with the stage

    // epilogue: OR over the 128 rows of each block of (s_ij > c_i), for the thread's two keys
    const int key = t * TILE_KEYS + 16 * warp_in_wg + lane / 4;
    u32 half0 = 0, half1 = 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool key_ok = key + 8 * r < seq_k;
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        bool p0 = false, p1 = false;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          const int j = 16 * b + jj;
          p0 |= acc[4 * j + 2 * r] > cth[j][0];
          p1 |= acc[4 * j + 2 * r + 1] > cth[j][1];
        }
        const u32 bits = quad_bits(__ballot_sync(0xffffffffu, (p0 || p1) && key_ok)) << (8 * r);
        if (b == 0) half0 |= bits; else half1 |= bits;
      }
    }
    const int word = 2 * t + warp_in_wg / 2;  // keys 64 t + 16 warp_in_wg .. + 15: half (warp_in_wg % 2)
    if (lane < 2 && word < n_words && qb + lane < n_qblocks) {
      int* word_ptr = out + ((long long)head * n_qblocks + qb + lane) * n_words + word;
      unsigned short* dst = reinterpret_cast<unsigned short*>(word_ptr);
      dst[warp_in_wg % 2] = (unsigned short)(lane == 0 ? half0 : half1);
    }
  }
}
