"""Wall-clock timing for interpreter runs, where ``fgattn_gen.timing`` (CUDA events) cannot work."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

INTERPRET_REPS = 3


def wall_time_ms(fn: Callable[..., object], arg_sets: Sequence[tuple], *, reps: int = INTERPRET_REPS) -> dict:
    """Median, 20th and 80th percentile in ms of ``reps`` calls ``fn(*arg_sets[i % len(arg_sets)])``,
    in the same form as ``fgattn_gen.timing.time_ms``."""
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(*arg_sets[i % len(arg_sets)])
        times.append((time.perf_counter() - start) * 1e3)
    p50, p20, p80 = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
