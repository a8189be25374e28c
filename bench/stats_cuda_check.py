"""Device check of the CUDA (sm_90a) fp8 statistics kernel (``templates/cuda/block_stat_fp8.cu``) for issue 4's
refresh bar (exact_mask refresh <= 1.3x a dense sdpa-cudnn pass): medians of ``triton.testing.do_bench`` at
B = 1, H = 24, S = 32,760, D = 128 on ``dit_qkv("hunyuan-32k")``, all in one process on one card:

- dense sdpa-cudnn; the statistics pass (fp8, words) with the Triton kernel and with the CUDA kernel, the
  CUDA kernel alone on prepared operands (and per shared-memory stage count), the operand conversion alone;
- the whole ``exact_mask`` refresh (default threshold 0.5 / Sk) with each kernel, and its ratio to dense;
- bits differing between the two kernels' words at this size.

Run on a Hopper GPU: ``PYTHONPATH=. python3 bench/stats_cuda_check.py`` (bench/stats_cuda_check.sh runs the GPU
tests first).
"""

from __future__ import annotations

import argparse
import math
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgattn_gen.baselines import sdpa  # noqa: E402
from fgattn_gen.ditdata import dit_qkv  # noqa: E402
from fgattn_gen.predictors import block_stats, exact_mask  # noqa: E402
from fgattn_gen.predictors.dense import dense_attention_with_lse  # noqa: E402


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="hunyuan-32k")
    parser.add_argument("--stages", type=int, nargs="*", default=[4, 8, 12, 16])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 2, 3, 4])
    args = parser.parse_args(argv)
    card = torch.cuda.get_device_name()
    print(f"card: {card}; torch {torch.__version__}, triton {triton.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}", flush=True)
    data = dit_qkv(args.shape, dtype=torch.bfloat16, device="cuda", seed=1)
    q, k, v = data.q, data.k, data.v
    b, h, seq, d = q.shape
    scale = d ** -0.5
    threshold = 0.5 / seq
    flop = 2 * b * h * seq * seq * d
    rows = {}

    def record(name, fn):
        ms = bench(fn)
        rows[name] = ms
        print(f"{name:58s} {ms:8.3f} ms  {ms / rows.get('sdpa-cudnn', ms):6.3f}x dense  "
              f"{flop / ms * 1e-9:7.1f} TFLOP/s (q k^T)", flush=True)
        return ms

    record("sdpa-cudnn", lambda: sdpa(q, k, v, "cudnn"))
    _, lse = dense_attention_with_lse(q, k, v, scale)
    stat = dict(block_m=128, scale=scale, mode="words", precision="fp8", threshold=threshold, impl="kernels")
    record("stats fp8 words, Triton", lambda: block_stats.block_stat(q[0], k[0], lse[0], kernel="triton", **stat))
    record("stats fp8 words, CUDA (with conversion)",
           lambda: block_stats.block_stat(q[0], k[0], lse[0], kernel="cuda", **stat))
    record("  fp8 conversion alone (wgmma layout)",
           lambda: block_stats._fp8_operands(q[0], k[0], lse[0], scale, layout="wgmma"))
    record("  fp8 conversion alone (plain layout)", lambda: block_stats._fp8_operands(q[0], k[0], lse[0], scale))
    q8, k8, lse_s, qscale = block_stats._fp8_operands(q[0], k[0], lse[0], scale, layout="wgmma")
    n_qblocks, n_words = triton.cdiv(seq, 128), triton.cdiv(seq, 32)
    out = torch.empty(h, n_qblocks, n_words, dtype=torch.int32, device="cuda")
    pairs, n_tiles = triton.cdiv(n_qblocks, 2), triton.cdiv(seq, block_stats.CUDA_TILE_KEYS)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"default key splits: {block_stats.cuda_key_splits(pairs * h, n_tiles, sms)} (tiles per CTA, splits)")
    for stages in args.stages:
        smem = block_stats.cuda_stat_smem_bytes(d, stages)
        try:
            kernel = block_stats._cuda_stat_kernel(torch.cuda.current_device(), d, stages)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"  CUDA kernel, {stages} stages: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            continue
        for splits in args.splits:
            per_cta, z = block_stats.cuda_key_splits(pairs * h, n_tiles, sms, splits)
            launch = lambda: kernel((pairs, h, z), (block_stats.CUDA_THREADS, 1, 1), q8, k8, lse_s, qscale, out, seq,
                                    seq, n_qblocks, n_words, math.log2(threshold), per_cta, shared_mem=smem)
            record(f"  CUDA kernel alone, {stages} stages ({smem // 1024} KB smem), {z} key splits", launch)

    cuda_words = block_stats.block_stat(q[0], k[0], lse[0], kernel="cuda", **stat)
    triton_words = block_stats.block_stat(q[0], k[0], lse[0], kernel="triton", **stat)
    shifts = torch.arange(32, device="cuda", dtype=torch.int32)
    bits = lambda w: ((w[..., None] >> shifts) & 1).bool()
    differ = (bits(cuda_words) != bits(triton_words)).float().mean().item()
    density = bits(cuda_words).float().mean().item()
    print(f"bits differing CUDA vs Triton: {differ:.2e} (density {density:.4f})", flush=True)

    record("exact_mask refresh, fp8, CUDA statistics", lambda: exact_mask(q, k, v, score_precision="fp8"))
    applies = block_stats.cuda_kernel_applies
    block_stats.cuda_kernel_applies = lambda *a, **kw: False
    try:
        record("exact_mask refresh, fp8, Triton statistics", lambda: exact_mask(q, k, v, score_precision="fp8"))
    finally:
        block_stats.cuda_kernel_applies = applies
    ratio = rows["exact_mask refresh, fp8, CUDA statistics"] / rows["sdpa-cudnn"]
    print(f"refresh / sdpa-cudnn = {ratio:.3f} (bar 1.3) on {card}", flush=True)
    print(json.dumps(dict(card=card, shape=[b, h, seq, seq, d], ms=rows, bits_differing=differ,
                          refresh_vs_dense=ratio)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
