"""Whole attention call (predictor + registry lookup + kernel) at the predictors' default settings against
dense SDPA (cuDNN), on DiT-like data at HunyuanVideo and Wan-14B 720p shapes, one GPU.

    PYTHONPATH=. python bench/bench_attention_call.py --name attention_call_h100          # GPU, ~3 min
    PYTHONPATH=. python bench/bench_attention_call.py --name attention_call_cpu --cpu     # interpreter smoke run

What the diffusers processors run per layer (``fgattn_gen.integrations``), q/k/v ``[B, H, S, D]`` bf16 passed
as transposed views of ``[B, S, H, D]`` tensors as the processors pass them (``--layout bhsd``: contiguous):

- ``sdpa-cudnn``: ``fgattn_gen.baselines.sdpa(q, k, v, "cudnn")``, the reference output;
- ``pooled_top_p``: ``pooled_top_p(q, k, keep_keys=text)`` then ``attention(q, k, v, keys)``;
- ``cached_exact refresh``: ``exact_mask(q, k, v, keep_keys=text)`` (dense output + exact mask: a refresh step);
- ``cached_exact reuse``: ``attention(q, k, v, keys)`` with the refresh's KeySet (the steps in between).

Data: ``fgattn_gen.ditdata.dit_qkv`` (HunyuanVideo 720p: 24 heads, 33x45x80 video + 256 text tokens =
119,056; Wan-14B 720p: 40 heads, 21x45x80 = 75,600 video tokens, no text in self-attention). Times: medians
of ``triton.testing.do_bench`` (with --cpu: one wall-clock call, not a performance number). Density: of the
whole KeySet. Error: relative L2 of the output against the SDPA output, over all heads.
Writes ``bench/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # before Triton is imported: @triton.jit decides at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from fgattn_gen import attention  # noqa: E402
from benchlib import header_lines, run_info, timer, write_results  # noqa: E402
from fgattn_gen.ditdata import SHAPES, DitShape, dit_qkv  # noqa: E402
from fgattn_gen.predictors import exact_mask, pooled_top_p  # noqa: E402

GPU_SHAPES = {
    "hunyuan-720p": SHAPES["hunyuan-720p"],
    "wan14b-720p": DitShape("wan14b-720p", 21, 45, 80, 0, 40, 128),
}
CPU_SHAPES = {
    "hunyuan-cpu": SHAPES["hunyuan-cpu"],
    "wan-cpu": DitShape("wan-cpu", 3, 8, 12, 0, 4, 128),
}


def rel_l2(out: torch.Tensor, ref: torch.Tensor, heads_per_chunk: int = 4) -> float:
    """|out - ref| / |ref| over ``[B, H, S, D]`` tensors, in fp32 a few heads at a time."""
    num = den = 0.0
    for h0 in range(0, ref.shape[1], heads_per_chunk):
        o, r = out[:, h0:h0 + heads_per_chunk].float(), ref[:, h0:h0 + heads_per_chunk].float()
        num += float((o - r).square().sum())
        den += float(r.square().sum())
    return (num / den) ** 0.5


def dense_sdpa(cpu: bool):
    if cpu:
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    from fgattn_gen.baselines import sdpa

    return lambda q, k, v: sdpa(q, k, v, "cudnn")


def bench_shape(shape: DitShape, *, layout: str, cpu: bool, log) -> list[dict]:
    device = "cpu" if cpu else "cuda"
    data = dit_qkv(shape, dtype=torch.bfloat16, device=device, seed=1)
    if layout == "bshd":  # as the processors pass them: [B, S, H, D] storage, [B, H, S, D] views
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (data.q, data.k, data.v))
    else:
        q, k, v = data.q, data.k, data.v
    del data
    text = shape.text_range if shape.text_tokens else None
    b, h, seq, d = q.shape
    base = dict(shape=shape.name, dims=[b, h, seq, d], layout=layout)
    measure = timer(cpu, warmup_ms=100, rep_ms=1000)
    sdpa = dense_sdpa(cpu)
    ref = sdpa(q, k, v)
    sdpa_ms = measure(lambda: sdpa(q, k, v))
    rows = [dict(impl="sdpa-cudnn" if not cpu else "sdpa (cpu)", **base, ms=sdpa_ms, speedup=1.0, density=1.0,
                 rel_l2=0.0)]
    log(f"{shape.name:14s} {rows[-1]['impl']:22s} {sdpa_ms:10.3f} ms")

    def record(impl: str, call, keys, out):
        ms = measure(call)
        rows.append(dict(impl=impl, **base, ms=ms, speedup=sdpa_ms / ms, density=keys.density(),
                         rel_l2=rel_l2(out, ref)))
        r = rows[-1]
        log(f"{shape.name:14s} {impl:22s} {ms:10.3f} ms  {r['speedup']:5.2f}x  density {r['density']:.3f}  "
            f"rel_l2 {r['rel_l2']:.4f}")

    def pooled_call():
        keys = pooled_top_p(q, k, keep_keys=text)
        return attention(q, k, v, keys), keys

    out, keys = pooled_call()
    record("pooled_top_p", pooled_call, keys, out)
    del out, keys

    out, keys = exact_mask(q, k, v, keep_keys=text)
    record("cached_exact refresh", lambda: exact_mask(q, k, v, keep_keys=text), keys, out)
    out = attention(q, k, v, keys)
    record("cached_exact reuse", lambda: attention(q, k, v, keys), keys, out)
    return rows


def markdown(result: dict) -> str:
    lines = [*header_lines(result),
             "One whole attention call per row (predictor + registry lookup + kernel, KeySet compaction "
             "included) on DiT-like bf16 q/k/v (`fgattn_gen.ditdata`), the predictors at their default "
             "settings, text keys kept. Times: medians of `triton.testing.do_bench`; speedup = SDPA time / "
             "time; density of the whole KeySet; rel_l2 = relative L2 error of the output vs the SDPA output "
             "(all heads). `cached_exact refresh` is a refresh step (dense output + exact mask), `reuse` a step "
             "in between (sparse attention with that mask).", "",
             "| shape | [B,H,S,D] | layout | impl | ms | speedup | density | rel_l2 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['dims']} | {r['layout']} | {r['impl']} | {r['ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['density']:.3f} | {r['rel_l2']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="attention_call")
    parser.add_argument("--cpu", action="store_true", help="CPU with Triton's interpreter, tiny shapes")
    parser.add_argument("--shapes", nargs="+", help=f"default {list(GPU_SHAPES)} (GPU), {list(CPU_SHAPES)} (--cpu)")
    parser.add_argument("--layout", choices=["bshd", "bhsd"], default="bshd",
                        help="storage of q/k/v: bshd = transposed views as from the diffusers processors")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench_attention_call: no CUDA GPU; use --cpu for the interpreter smoke run", file=sys.stderr)
        return 2
    known = CPU_SHAPES if args.cpu else GPU_SHAPES
    names = args.shapes or list(known)
    for name in names:
        if name not in known:
            parser.error(f"unknown shape {name!r}; known: {sorted(known)}")

    def log(msg):
        print(msg, flush=True)

    started = time.time()
    rows = []
    for name in names:
        rows += bench_shape(known[name], layout=args.layout, cpu=args.cpu, log=log)
        if not args.cpu:
            torch.cuda.empty_cache()
    result = dict(
        name=args.name, **run_info(args.cpu),
        wall_s=round(time.time() - started, 1), rows=rows,
    )
    write_results(args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
