"""Helpers the benchmark scripts share: a timer, the run header (card, date, versions), the results writer
(bench/results/<name>.json + .md), relative L2, and full-size models with random weights."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.testing

import fgattn_gen

RESULTS = Path(__file__).resolve().parent / "results"


def timer(cpu: bool, *, warmup_ms: float = 25, rep_ms: float = 150) -> Callable[[Callable[[], object]], float]:
    """fn -> milliseconds: do_bench median on the GPU; one wall-clock call on the CPU (interpreter smoke runs)."""
    if cpu:
        def measure(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    else:
        def measure(fn):
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return measure


def elapsed_ms(fn, cuda: bool, reps: int = 1) -> float:
    """Milliseconds per call of ``fn`` (CUDA events; wall clock on the CPU)."""
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def run_info(cpu: bool, **versions: str) -> dict:
    """``device``, ``date`` and ``versions`` (fgattn, torch, triton, CUDA, cuDNN, plus ``versions``) of a run."""
    device = "cpu (Triton interpreter; timings are not performance numbers)" if cpu else torch.cuda.get_device_name()
    return dict(device=device, date=datetime.date.today().isoformat(),
                versions=dict(fgattn=fgattn_gen.__version__, torch=torch.__version__, triton=triton.__version__,
                              cuda=torch.version.cuda, cudnn=str(torch.backends.cudnn.version()), **versions))


def header_lines(result: dict) -> list[str]:
    """The Markdown title and run line (card, date, versions) of a ``run_info`` result, then a blank line."""
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    return [f"# {result['name']}", "", f"Card: {result['device']}. Date: {result['date']}. Versions: {versions}.", ""]


def write_results(name: str, result: dict, table: str) -> Path:
    """Write ``result`` as JSON and ``table`` as Markdown under bench/results/; print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    return RESULTS / f"{name}.md"


def rel_l2(out: torch.Tensor, ref: torch.Tensor, heads_per_chunk: int = 4) -> float:
    """|out - ref| / |ref| over ``[B, H, S, D]`` tensors, in fp32 a few heads at a time."""
    num = den = 0.0
    for h0 in range(0, ref.shape[1], heads_per_chunk):
        o, r = out[:, h0:h0 + heads_per_chunk].float(), ref[:, h0:h0 + heads_per_chunk].float()
        num += float((o - r).square().sum())
        den += float(r.square().sum())
    return (num / den) ** 0.5


@torch.no_grad()
def random_model(make: Callable[[], torch.nn.Module], device: str, seed: int) -> torch.nn.Module:
    """``make()`` built on the meta device in bf16, allocated on ``device`` (``to_empty``) and filled there:
    matrices N(0, 1/fan_in), norm weights 1, biases 0; in eval mode."""
    import warnings
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().to(dtype=torch.bfloat16)
    model = model.to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    return model
