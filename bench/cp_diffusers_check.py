"""The fgattn diffusers processors under diffusers' Ulysses context parallelism on N GPUs, against one GPU:
HunyuanVideo and Wan transformers with real head shapes (24 heads x 128) and a few blocks, random bf16 weights.

    torchrun --nproc-per-node 2 bench/cp_diffusers_check.py --name cp_diffusers_h200x2     # ~3 min, 2 GPUs
    torchrun --nproc-per-node 2 bench/cp_diffusers_check.py --name cp_cpu --cpu            # gloo + interpreter smoke

Each rank first runs the whole model itself (one GPU, no parallelism: the reference), then the same model under
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (HunyuanVideo with
``hunyuan_video.context_parallel_plan``), fgattn installed with each predictor, through two timesteps
(``cached_exact``: the refresh, a dense pass and exact mask, then the mask's reuse). Each row: the relative L2
difference of the output from the one-GPU output (max over ranks; the same predictor on the same rows gives
the same masks, so it should be ~0), and the forward time on one GPU and on N GPUs (CUDA events, the second of
two runs of the timestep sequence). HunyuanVideo's prompt is padded (``--valid-text`` of ``--text`` tokens).
Writes ``bench/results/<name>.json`` and ``.md`` (and under ``$OUT`` when set).
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # before Triton is imported: @triton.jit decides at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TIMESTEPS = (900.0, 800.0)
PREDICTORS = [("pooled_top_p", dict(top_p=0.9)), ("cached_exact", dict(refresh_steps=(0,), top_p=0.9))]


def build(name: str, args, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random model with the same weights on every rank (rank 0's, broadcast)."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    heads, head_dim = (4, 64) if args.cpu else (24, 128)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "hunyuan":
            model = HunyuanVideoTransformer3DModel(
                in_channels=16, out_channels=16, num_attention_heads=heads, attention_head_dim=head_dim,
                num_layers=args.layers // 3, num_single_layers=args.layers - args.layers // 3, num_refiner_layers=1,
                text_embed_dim=args.text_dim, pooled_projection_dim=args.text_dim,
                rope_axes_dim=(16, 24, 24) if args.cpu else (16, 56, 56))
        else:
            model = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                                          out_channels=16, text_dim=args.text_dim, ffn_dim=4 * heads * head_dim,
                                          num_layers=args.layers)
        model = model.to(dtype).eval()
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    return model


def make_inputs(name: str, args, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(1)
    frames = (args.frames - 1) // 4 + 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    inputs = dict(hidden_states=randn(1, 16, frames, args.height // 8, args.width // 8),
                  encoder_hidden_states=randn(1, args.text, args.text_dim), return_dict=False)
    if name == "hunyuan":
        inputs.update(encoder_attention_mask=(torch.arange(args.text) < args.valid_text)[None].to(device),
                      pooled_projections=randn(1, args.text_dim), guidance=torch.full((1,), 6000.0, device=device,
                                                                                      dtype=dtype))
    return inputs


def run(model, inputs: dict, predictor: str, knobs: dict, cpu: bool) -> tuple[list[torch.Tensor], float]:
    """fgattn installed; the timestep sequence twice; (outputs, ms) of the second run."""
    from fgattn_gen.integrations import install

    dtype = inputs["hidden_states"].dtype
    device = inputs["hidden_states"].device
    with install(model, predictor=predictor, block_m=16 if cpu else 128, **knobs), torch.no_grad():
        for attempt in range(2):
            if not cpu:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            outs = [model(**inputs, timestep=torch.full((1,), t, device=device, dtype=dtype))[0] for t in TIMESTEPS]
            if not cpu:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
    return outs, ms


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="cp_diffusers")
    parser.add_argument("--cpu", action="store_true", help="gloo + Triton interpreter, tiny model (smoke run)")
    parser.add_argument("--models", nargs="+", default=["hunyuan", "wan"], choices=["hunyuan", "wan"])
    parser.add_argument("--layers", type=int, default=6, help="blocks (HunyuanVideo: a third dual-stream)")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--text", type=int, default=256, help="prompt tokens (divisible by N)")
    parser.add_argument("--valid-text", type=int, default=200, help="HunyuanVideo: the unpadded prompt tokens")
    parser.add_argument("--text-dim", type=int, default=4096)
    args = parser.parse_args()
    if args.cpu:
        args.layers, args.frames, args.height, args.width = 3, 5, 96, 80
        args.text, args.valid_text, args.text_dim = 12, 5, 32

    from diffusers import ContextParallelConfig

    from fgattn_gen.integrations.hunyuan_video import context_parallel_plan

    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cpu:  # diffusers 0.42.1 on a CPU-only torch (see tests/test_parallel_diffusers.py)
        torch.accelerator.device_count = lambda: 1
        if not hasattr(logging.Logger, "warning_once"):
            logging.Logger.warning_once = logging.Logger.warning
        device, dtype = "cpu", torch.float16
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device, dtype = "cuda", torch.bfloat16
    rows = []
    for name in args.models:
        model, inputs = build(name, args, device, dtype), make_inputs(name, args, device, dtype)
        one_gpu = {p: run(model, inputs, p, knobs, args.cpu) for p, knobs in PREDICTORS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world),
                                     cp_plan=context_parallel_plan(model) if name == "hunyuan" else None)
        for predictor, knobs in PREDICTORS:
            outs, ms = run(model, inputs, predictor, knobs, args.cpu)
            ref_outs, ref_ms = one_gpu[predictor]
            err = torch.tensor([max(rel_l2(o, r) for o, r in zip(outs, ref_outs))], dtype=torch.float64,
                               device=device)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            rows.append(dict(model=name, predictor=predictor,
                             rel_l2=err.item(), ms_one=ref_ms, ms_parallel=ms))
        del model
    if rank == 0:
        from benchlib import header_lines, run_info, write_results

        result = dict(name=args.name, **run_info(args.cpu), world=world, args=vars(args), rows=rows)
        lines = header_lines(result)
        lines += [f"N = {world} ranks, ulysses_degree = N; times: the {len(TIMESTEPS)}-timestep sequence "
                  f"(the second of two runs).", "",
                  "| model | predictor | rel L2 vs one GPU (max over ranks) | ms, 1 GPU | ms, N GPUs | speed-up |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['predictor']} | {r['rel_l2']:.2e} | {r['ms_one']:.1f} | "
                  f"{r['ms_parallel']:.1f} | {r['ms_one'] / r['ms_parallel']:.2f}x |" for r in rows]
        table = "\n".join(lines) + "\n"
        write_results(args.name, result, table)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
            Path(os.environ["OUT"], f"{args.name}.md").write_text(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
