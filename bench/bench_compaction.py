"""Split one fgattn call into its parts: KeySet compaction alone and the attention kernel alone.

    PYTHONPATH=. python bench/bench_compaction.py [--shape 1,24,32760,128] [--densities 1 0.3 0.1]
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.testing

from fgattn_gen import KeySet, compaction
from fgattn_gen.backends.triton.launch import load
from fgattn_gen.synthetic import local_block_mask
from fgattn_gen.variant import Variant


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1,24,32760,128")
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.3, 0.1])
    parser.add_argument("--variant", default="128,128,8,3", help="tile_m,tile_n,warps,stages")
    args = parser.parse_args(argv)
    b, h, s, d = (int(x) for x in args.shape.split(","))
    tm, tn, w, st = (int(x) for x in args.variant.split(","))
    variant = Variant("triton", "bf16", d, 128, 1, tm, tn, w, st)
    module = load(variant)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    for density in args.densities:
        keys = KeySet.from_mask(local_block_mask(b, h, triton.cdiv(s, 128), s, density, device="cuda"), block_m=128)
        ms = triton.testing.do_bench(lambda: compaction.compact(keys, 0, b * h, s), return_mode="median")
        print(f"compact d={density}: {ms * 1e3:.1f} us", flush=True)
        idx, n_keys = compaction.compact(keys, 0, b * h, s)

        def kernel():
            module.kernel[(triton.cdiv(s, tm), b * h)](
                q, k, v, out, out, idx, n_keys, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                h, s, keys.shape[2], idx.shape[-1], 0, 1.4426950408889634 / math.sqrt(d), WRITE_LSE=False,
                num_warps=w, num_stages=st)
        ms = triton.testing.do_bench(kernel, return_mode="median")
        print(f"kernel only d={density} {variant.key}: {ms:.3f} ms, "
              f"{4 * b * h * s * s * d * density / ms * 1e-9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
