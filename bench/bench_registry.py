"""Warm registry lookup cost (CPU; no GPU needed): median over many calls of ``registry.lookup`` (the public call,
arguments checked) and ``registry.served`` (what the attention op calls; ``attention()`` checked them).

    PYTHONPATH=. python bench/bench_registry.py [--name registry_lookup]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from benchlib import write_results
from fgattn_gen import registry



def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="registry_lookup")
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args(argv)
    kwargs = dict(device="NVIDIA H200", dtype=torch.bfloat16, head_dim=128, seq_q=119056, seq_k=119056, density=0.3)
    first = time.perf_counter()
    registry.lookup(**kwargs)  # cold: loads and validates the shipped tuned files
    cold_ms = (time.perf_counter() - first) * 1e3
    served = (kwargs["device"], kwargs["dtype"], 128, 119056, 119056, 0.3, 128, 1, None)
    warm = {}
    for name, call in (("lookup", lambda: registry.lookup(**kwargs)), ("served", lambda: registry.served(*served))):
        samples = []
        for _ in range(args.calls // 100):
            start = time.perf_counter()
            for _ in range(100):
                call()
            samples.append((time.perf_counter() - start) / 100 * 1e6)
        warm[f"{name}_warm_us_median"] = statistics.median(samples)
        warm[f"{name}_warm_us_p90"] = sorted(samples)[int(0.9 * len(samples))]
    result = dict(name=args.name, cpu=platform.processor() or platform.machine(), python=platform.python_version(),
                  date=datetime.date.today().isoformat(), cold_ms=cold_ms, **warm, calls=args.calls)
    write_results(args.name, result, "\n".join(f"- {k}: {v}" for k, v in result.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
