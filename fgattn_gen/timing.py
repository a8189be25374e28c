"""GPU timing: median and spread over repeated calls, with rotated inputs so L2 does not flatter small shapes."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import triton.testing


def rotation_count(bytes_per_set: int, l2_bytes: int = 64 << 20) -> int:
    """How many input sets to rotate through so that each set is evicted from L2 before it is reused."""
    return max(1, min(8, -(-3 * l2_bytes // max(1, bytes_per_set))))


def time_ms(fn: Callable[..., object], arg_sets: Sequence[tuple], *, warmup_ms: float = 25,
            rep_ms: float = 200) -> dict:
    """Median, 20th and 80th percentile in ms of ``fn(*arg_sets[i % len(arg_sets)])``.

    ``fn`` runs on the current CUDA stream; timing uses CUDA events (``triton.testing.do_bench``)."""
    state = {"i": 0}

    def call():
        fn(*arg_sets[state["i"] % len(arg_sets)])
        state["i"] += 1

    p50, p20, p80 = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80}


def gpu_l2_bytes(device: torch.device | None = None) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size
