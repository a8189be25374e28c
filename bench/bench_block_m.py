"""Kernel time against the query block size M of an M x 1 KeySet, at equal key density, one run.

    PYTHONPATH=. python bench/bench_block_m.py --name block_m_h200 [--shape 1,24,32760,128] \
        [--densities 0.1 0.2] [--block-m 128 64 32 16]

Finer query blocks predict keys more accurately (bench_predictors: 16 x 1, 32 x 1 curves) but give the
kernel shorter tiles. For each block_m: the default Triton variant and, where block_m is a multiple of 64,
the default CUDA variant, on a spatially clustered mask (``fgattn_gen.synthetic.local_block_mask``) of the
same density; dense sdpa-cudnn in the same run. Medians of ``triton.testing.do_bench``, compaction included.
Writes ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.testing

from benchlib import header_lines, run_info, write_results
from fgattn_gen import KeySet, attention, default_variant
from fgattn_gen.baselines import sdpa
from fgattn_gen.synthetic import local_block_mask


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def markdown(result: dict) -> str:
    lines = [*header_lines(result),
             f"Shape [B,H,S,D] {result['shape']}, bf16; sdpa-cudnn {result['dense_ms']:.3f} ms. Medians of "
             "triton.testing.do_bench, KeySet compaction included.", "",
             "| density | block_m | backend | variant | ms | speedup vs sdpa-cudnn |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['density']} | {r['block_m']} | {r['backend']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{result['dense_ms'] / r['ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--shape", default="1,24,32760,128")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.2])
    parser.add_argument("--block-m", nargs="+", type=int, default=[128, 64, 32, 16])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_block_m: needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    b, h, s, d = (int(x) for x in args.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    dense_ms = median_ms(lambda: sdpa(q, k, v, "cudnn"))
    rows = []
    for density in args.densities:
        for block_m in args.block_m:
            mask = local_block_mask(b, h, triton.cdiv(s, block_m), s, density, seed=1, device="cuda")
            keys = KeySet.from_mask(mask, block_m=block_m, block_n=1)
            for backend in ("triton", "cuda") if block_m % 64 == 0 else ("triton",):
                variant = default_variant(dtype=torch.bfloat16, head_dim=d, block_m=block_m, block_n=1,
                                          backend=backend)
                ms = median_ms(lambda: attention(q, k, v, keys, variant=variant))
                rows.append(dict(density=density, block_m=block_m, backend=backend, variant=variant.key, ms=ms,
                                 key_density=keys.density()))
                print(f"density {density} block_m {block_m:3d} {backend:6s} {ms:8.3f} ms", flush=True)
    result = dict(name=args.name, **run_info(cpu=False), shape=[b, h, s, d], dense_ms=dense_ms, rows=rows)
    write_results(args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
