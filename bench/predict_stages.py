"""Time each stage of the default predictor (``predictors.predict``) on DiT-like data, one GPU: clustering,
gathering the ordered queries, the pooled threshold rule, the captured-mass check, against dense cuDNN.

    PYTHONPATH=. python bench/predict_stages.py [--shapes hunyuan-720p hunyuan-32k] [--family scattered]

Prints one line per stage (median of ``triton.testing.do_bench``, ms and share of dense).
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton.testing

from fgattn_gen.baselines import sdpa
from fgattn_gen.ditdata import FAMILIES, SHAPES, dit_qkv
from fgattn_gen.predictors import captured_mass, cluster_order, pooled_top_p, predict
from fgattn_gen.query_order import gather_queries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["hunyuan-720p", "hunyuan-32k"])
    parser.add_argument("--family", default="scattered", choices=FAMILIES)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("predict_stages: needs a CUDA GPU", file=sys.stderr)
        return 2
    for name in args.shapes:
        shape = SHAPES[name]
        data = dit_qkv(shape, family=args.family, dtype=torch.bfloat16, device="cuda")
        q, k, v = data.q, data.k, data.v
        text = [shape.text_range] if shape.text_tokens else None

        def ms(fn):
            return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

        dense = ms(lambda: sdpa(q, k, v, "cudnn"))
        order = cluster_order(q)
        ordered = gather_queries(q, order)
        keys = predict(q, k, keep_keys=text, min_mass=None)
        stages = {
            "cluster_order": lambda: cluster_order(q),
            "gather_queries": lambda: gather_queries(q, order),
            "pooled threshold (pool 128)": lambda: pooled_top_p(ordered, k, threshold=1.5 / k.shape[2],
                                                                sim_threshold=-1.0, pool=128, keep_keys=text),
            "captured_mass (2 rows)": lambda: captured_mass(q, k, keys, samples=2),
            "predict (whole)": lambda: predict(q, k, keep_keys=text),
        }
        print(f"{name} ({args.family}), dense cuDNN {dense:.3f} ms", flush=True)
        for stage, fn in stages.items():
            t = ms(fn)
            print(f"  {stage:30s} {t:8.3f} ms  {100 * t / dense:6.2f} % of dense", flush=True)
        del data, q, k, v, order, ordered, keys
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
