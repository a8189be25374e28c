"""Time each stage of the default predictor (``predictors.predict``) on DiT-like data, one GPU, against dense
cuDNN: the clustering (``cluster_order``), the ordered blocks' mean queries, the pooled threshold rule (its two
split-K passes), the captured-mass check with widening, and the whole call; with ``--sweep`` also a few
launch-parameter choices of each kernel (the module constants documented as "to be swept").

    PYTHONPATH=. python bench/predict_stages.py                       # hunyuan-720p wan14b-720p hunyuan-32k
    PYTHONPATH=. python bench/predict_stages.py --sweep --shapes hunyuan-720p hunyuan-32k

Per shape: one line per stage (median of ``triton.testing.do_bench``, ms and share of dense; bar for the whole
call: 5 %), the host time to enqueue one ``predict`` call (when it exceeds the device time the call is
launch-bound), and with ``--sweep`` one line per setting: its time and how far its result is from the current
constants' (fraction of differing KeySet bits or query-order entries: near-ties only, expect ~0; max |diff|
of the mass estimate: rounding, expect < 1e-4).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import triton.testing

from fgattn_gen.baselines import sdpa
from fgattn_gen.ditdata import FAMILIES, SHAPES, dit_qkv
from fgattn_gen.predictors import mass_kernel, predict, query_clusters, threshold_rule
from fgattn_gen.predictors.captured_mass import fused_mass, sample_rows
from fgattn_gen.predictors.query_clusters import cluster_order, ordered_block_means
from fgattn_gen.predictors.threshold_rule import pooled_threshold_words

THRESHOLD_LAUNCH = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (256, 64, 8, 3)]
MASS_LAUNCH = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3)]
CLUSTER_LAUNCH = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3)]
PROGRAMS_PER_SM = [2, 4, 8, 16]
MIN_SPLIT_STEPS = [4, 8, 32]


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def enqueue_ms(fn, calls: int = 20) -> float:
    """Host milliseconds to enqueue one call (no synchronisation inside)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def stages(q, k, text, dense: float) -> None:
    b, h, seq, d = q.shape
    keys = predict(q, k, keep_keys=text, min_mass=None)
    order = keys.query_order
    q_mean = ordered_block_means(q, order, 128)
    rows, weights = sample_rows(seq, 128, 2, q.device)
    threshold = 1.5 / k.shape[2]

    def threshold_words():
        return pooled_threshold_words(q_mean[:h], k[0], k.shape[-1] ** -0.5, threshold, rows_per_block=1,
                                      n_blocks=q_mean.shape[1], impl="kernels", dtype=q.dtype)

    def mass_and_widen():
        return fused_mass(q, k, keys, rows, weights, scale=d ** -0.5, min_mass=0.3)

    timed = {
        "cluster_order": lambda: cluster_order(q),
        "  of which: no Lloyd step": lambda: cluster_order(q, steps=0),
        "ordered_block_means": lambda: ordered_block_means(q, order, 128),
        "threshold words (2 passes)": threshold_words,
        "captured mass + widen": mass_and_widen,
        "predict (whole)": lambda: predict(q, k, keep_keys=text),
    }
    for stage, fn in timed.items():
        t = ms(fn)
        print(f"  {stage:30s} {t:8.3f} ms  {100 * t / dense:6.2f} % of dense", flush=True)
    host = enqueue_ms(lambda: predict(q, k, keep_keys=text))
    print(f"  {'predict: host enqueue':30s} {host:8.3f} ms  {100 * host / dense:6.2f} % of dense", flush=True)


def _differ(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of differing KeySet bits (int32 words) or order entries (int64); max |a - b| of a mass."""
    if a.dtype == torch.int32:
        x = a ^ b
        bits = sum(int(((x >> i) & 1).sum()) for i in range(32))
        return bits / (a.numel() * 32)
    if a.is_floating_point():
        return float((a - b).abs().max())
    return float((a != b).float().mean())


def _sweep_one(label: str, module, name: str, values, fn, dense: float) -> None:
    """Time ``fn`` with ``module.<name>`` set to each of ``values`` (restored after)."""
    saved = getattr(module, name)
    want = fn()
    try:
        for value in values:
            setattr(module, name, value if name != "LAUNCH" or module is not threshold_rule
                    else {**saved, False: value})
            try:
                got = fn()
                t = ms(fn)
                print(f"  {label:9s} {name}={value!s:18s} {t:8.3f} ms  {100 * t / dense:6.2f} % of dense  "
                      f"differ {_differ(got, want):.1e}", flush=True)
            except Exception as exc:  # a setting that does not compile (registers, shared memory) is reported
                print(f"  {label:9s} {name}={value!s:18s} failed: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
    finally:
        setattr(module, name, saved)


def sweep(q, k, text, dense: float) -> None:
    b, h, seq, d = q.shape
    keys = predict(q, k, keep_keys=text, min_mass=None)
    q_mean = ordered_block_means(q, keys.query_order, 128)
    rows, weights = sample_rows(seq, 128, 2, q.device)

    def threshold_words():
        return pooled_threshold_words(q_mean[:h], k[0], d ** -0.5, 1.5 / k.shape[2], rows_per_block=1,
                                      n_blocks=q_mean.shape[1], impl="kernels", dtype=q.dtype)

    def mass():
        return fused_mass(q, k, keys, rows, weights, scale=d ** -0.5)

    def order():
        return cluster_order(q)

    print(f"  current: threshold {threshold_rule.LAUNCH[False]} x{threshold_rule.PROGRAMS_PER_SM}/SM "
          f"min {threshold_rule.MIN_SPLIT_STEPS}; mass {mass_kernel.LAUNCH} x{mass_kernel.PROGRAMS_PER_SM}/SM "
          f"min {mass_kernel.MIN_SPLIT_STEPS}; cluster {query_clusters.LAUNCH}", flush=True)
    _sweep_one("threshold", threshold_rule, "LAUNCH", THRESHOLD_LAUNCH, threshold_words, dense)
    _sweep_one("threshold", threshold_rule, "PROGRAMS_PER_SM", PROGRAMS_PER_SM, threshold_words, dense)
    _sweep_one("threshold", threshold_rule, "MIN_SPLIT_STEPS", MIN_SPLIT_STEPS, threshold_words, dense)
    _sweep_one("mass", mass_kernel, "LAUNCH", MASS_LAUNCH, mass, dense)
    _sweep_one("mass", mass_kernel, "PROGRAMS_PER_SM", PROGRAMS_PER_SM, mass, dense)
    _sweep_one("mass", mass_kernel, "MIN_SPLIT_STEPS", MIN_SPLIT_STEPS, mass, dense)
    _sweep_one("cluster", query_clusters, "LAUNCH", CLUSTER_LAUNCH, order, dense)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["hunyuan-720p", "wan14b-720p", "hunyuan-32k"],
                        choices=sorted(SHAPES))
    parser.add_argument("--family", default="scattered", choices=FAMILIES)
    parser.add_argument("--sweep", action="store_true", help="also time launch-parameter choices of each kernel")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("predict_stages: needs a CUDA GPU", file=sys.stderr)
        return 2
    summary = []
    for name in args.shapes:
        shape = SHAPES[name]
        data = dit_qkv(shape, family=args.family, dtype=torch.bfloat16, device="cuda")
        q, k, v = data.q, data.k, data.v
        del data
        text = [shape.text_range] if shape.text_tokens else None
        dense = ms(lambda: sdpa(q, k, v, "cudnn"))
        print(f"{name} ({args.family}) {tuple(q.shape)}, dense cuDNN {dense:.3f} ms", flush=True)
        stages(q, k, text, dense)
        whole = ms(lambda: predict(q, k, keep_keys=text))
        summary.append((name, dense, whole))
        if args.sweep:
            sweep(q, k, text, dense)
        del q, k, v
        torch.cuda.empty_cache()
    print("\n| shape | dense ms | predict ms | share (bar 5 %) |\n|---|---|---|---|")
    for name, dense, whole in summary:
        print(f"| {name} | {dense:.3f} | {whole:.3f} | {100 * whole / dense:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
