"""End to end: one denoising step (one transformer forward) of a full-size HunyuanVideo transformer with the
fgattn processors at fixed key densities, against the same model with diffusers' SDPA processors, one GPU.

    PYTHONPATH=. python bench/bench_e2e_hunyuan.py --name e2e_hunyuan_h100                  # 720p x 129 frames, ~4 min
    PYTHONPATH=. python bench/bench_e2e_hunyuan.py --name e2e_smoke --frames 33 --height 320 --width 512 --layers 3
    PYTHONPATH=. python bench/bench_e2e_hunyuan.py --name e2e_cpu --cpu --frames 5 --height 64 --width 64 \\
        --layers 3 --heads 2 --text 16                                                     # interpreter smoke run

Model: ``HunyuanVideoTransformer3DModel`` with diffusers' default config (20 dual + 40 single-stream blocks,
24 heads x 128, 12.8 B parameters), random bf16 weights: built on the meta device, allocated on the GPU
(``to_empty``) and filled there (matrices N(0, 1/fan_in), norm weights 1, biases 0). Input: latents
1 x 16 x T x H/8 x W/8 (T = (frames - 1) / 4 + 1; 720p x 129 frames: 33 x 90 x 160 -> 118,800 video tokens with
patch 1x2x2) and ``--text`` prompt tokens (256, all valid unless ``--valid-text``): joint attention over
119,056 tokens in each of the 60 blocks.

Runs: ``sdpa``: diffusers' processors (``dispatch_attention_fn`` -> torch SDPA with HunyuanVideo's bool key
mask, kernel chosen by torch unless ``--sdpa-backend``); ``fgattn d``: ``fgattn_gen.integrations.install(model,
predictor="fixed_density", density=d)`` (synthetic local masks, set not predicted, text keys kept). Each run:
a warmup forward (kernel compilation, mask construction), then one forward timed with CUDA events (a step
takes tens of seconds at 720p), with the peak memory of the timed forward. Attention share: an isolated
attention call of one layer at the same shape and settings (mean of ``--attn-reps`` calls) x 60 layers / step
time, an estimate. ``--layers N`` builds N blocks (N // 3 dual, the rest single) and also reports the step
time extrapolated to 60 blocks (x 60 / N), labelled as such. rel_l2: relative L2 difference of each output
from the SDPA output (synthetic masks: a sanity check, not a quality measure).
Writes ``bench/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # before Triton is imported: @triton.jit decides at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import time  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchlib import elapsed_ms, header_lines, random_model, run_info, write_results  # noqa: E402
from fgattn_gen.integrations import SparseSelfAttention, install  # noqa: E402

FULL_LAYERS = (20, 40)  # dual-stream, single-stream blocks of the released model
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


# ---------------------------------------------------------------------------------------- model and inputs
def block_counts(layers: int | None) -> tuple[int, int]:
    """(dual, single) blocks: the released 20 + 40, or ``layers`` split 1 : 2."""
    if layers is None:
        return FULL_LAYERS
    return layers // 3, layers - layers // 3


def build_model(dual: int, single: int, heads: int, device: str, seed: int) -> HunyuanVideoTransformer3DModel:
    """Default-config HunyuanVideo transformer with random bf16 weights, allocated directly on ``device``."""
    return random_model(lambda: HunyuanVideoTransformer3DModel(num_layers=dual, num_single_layers=single,
                                                               num_attention_heads=heads), device, seed)


def make_inputs(args, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    latent = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    valid = torch.arange(args.text, device=device)[None, :] < (args.valid_text or args.text)
    return dict(
        hidden_states=torch.randn(1, 16, *latent, generator=gen, **bf16),
        timestep=torch.tensor([1000.0], **bf16),
        encoder_hidden_states=torch.randn(1, args.text, 4096, generator=gen, **bf16),
        encoder_attention_mask=valid.long(),
        pooled_projections=torch.randn(1, 768, generator=gen, **bf16),
        guidance=torch.tensor([6000.0], **bf16),
    )


# ---------------------------------------------------------------------------------------- timing
class Clock:
    """Milliseconds per call of a callable and the peak memory it allocates (CUDA events on the GPU)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, reps: int = 1) -> tuple[float, float | None]:
        if not self.cuda:
            return elapsed_ms(fn, False, reps), None
        torch.cuda.reset_peak_memory_stats()
        return elapsed_ms(fn, True, reps), torch.cuda.max_memory_allocated() / 2 ** 30


def sdpa_context(backend: str):
    return sdpa_kernel(SDPA_BACKENDS[backend]) if backend in SDPA_BACKENDS else contextlib.nullcontext()


def token_counts(inputs: dict) -> tuple[int, int]:
    """(video tokens, video + text tokens) of a forward's joint attention (patch 1 x 2 x 2)."""
    frames, height, width = inputs["hidden_states"].shape[2:]
    video = frames * (height // 2) * (width // 2)
    return video, video + inputs["encoder_hidden_states"].shape[1]


def layer_attention(model, inputs: dict):
    """Random q/k/v ``[1, S, H, D]`` bf16, the bool key mask ``[1, 1, 1, S]`` and the text range of one block's
    joint attention (as its processor sees them)."""
    device = inputs["hidden_states"].device
    video, tokens = token_counts(inputs)
    heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
    gen = torch.Generator(device=device).manual_seed(7)
    q, k, v = (torch.randn(1, tokens, heads, dim, generator=gen, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    valid = torch.cat([torch.ones(1, video, dtype=torch.bool, device=device),
                       inputs["encoder_attention_mask"].bool()], 1)
    return q, k, v, valid[:, None, None], (video, tokens)


def sdpa_layer_call(model, inputs):
    """One layer's attention through diffusers' dispatch (torch SDPA with the key mask)."""
    q, k, v, mask, _ = layer_attention(model, inputs)
    return lambda: dispatch_attention_fn(q, k, v, attn_mask=mask)


def fgattn_layer_call(model, inputs, density: float):
    """One layer's attention as the fgattn processor runs it (fixed-density KeySet, text keys kept)."""
    q, k, v, mask, text = layer_attention(model, inputs)
    sparse = SparseSelfAttention("fixed_density", density=density)
    return lambda: sparse(q, k, v, layer=0, text=text, attention_mask=mask,
                          sdpa=lambda: dispatch_attention_fn(q, k, v, attn_mask=mask))


# ---------------------------------------------------------------------------------------- runs
def run(label: str, model, inputs: dict, clock: Clock, *, context, layer_call, attn_reps: int, reference, log):
    """Warmup forward, timed forward, then the isolated layer attention (built after the timed forward so
    that its tensors stay out of the peak). Returns (row, output sample)."""
    def forward():
        with torch.no_grad(), context():
            return model(**inputs).sample

    started = time.time()
    forward()
    out = {}
    step_ms, peak = clock(lambda: out.update(sample=forward()))
    call = layer_call()
    with torch.no_grad(), context():
        call()
        attn_ms, _ = clock(call, reps=attn_reps)
    del call
    row = dict(run=label, step_ms=step_ms, peak_gib=peak, attention_ms_per_layer=attn_ms,
               wall_s=round(time.time() - started, 1))
    if reference is not None:
        ref = reference.float()
        row["rel_l2_vs_sdpa"] = float((out["sample"].float() - ref).norm() / ref.norm())
    log(f"{label:16s} step {step_ms:10.1f} ms  attention/layer {attn_ms:8.2f} ms  peak "
        f"{'-' if peak is None else f'{peak:.2f}'} GiB  ({row['wall_s']} s)")
    return row, out["sample"]


def markdown(result: dict) -> str:
    s = result["settings"]
    extrapolated = s["layers"] != sum(FULL_LAYERS)
    lines = [*header_lines(result),
             f"HunyuanVideoTransformer3DModel, diffusers default config with {s['dual_blocks']} dual + "
             f"{s['single_blocks']} single-stream blocks, {s['heads']} heads x 128, random bf16 weights "
             f"({s['params_b']:.2f} B parameters). Latents {s['latents']} -> {s['video_tokens']:,} video + "
             f"{s['text_tokens']} text tokens ({s['valid_text']} valid): joint attention over "
             f"{s['tokens']:,} tokens. One forward = one denoising step; warmup forward, then one timed forward "
             f"(CUDA events). SDPA runs diffusers' processors (torch SDPA with the bool key mask, backend: "
             f"{s['sdpa_backend']}); fgattn runs `install(model, predictor=\"fixed_density\", density=d)` "
             f"(synthetic local masks, text keys kept, block_m=128, block_n=1).", "",
             "Attention share (estimate) = isolated attention call of one layer at the same shape x "
             f"{s['layers']} layers / step time. rel_l2 = relative L2 difference of the output from SDPA's "
             "(synthetic masks: a sanity check, not quality).", ""]
    if extrapolated:
        lines += [f"**Subset of layers:** {s['layers']} blocks measured; 'step, 60 blocks' is extrapolated "
                  f"(measured x {sum(FULL_LAYERS)} / {s['layers']}), not measured.", ""]
    lines += ["| run | step ms (measured) | step ms, 60 blocks" + (" (extrapolated)" if extrapolated else "")
              + " | speedup | attention ms / layer | attention share (est.) | peak GiB | rel_l2 vs SDPA |",
              "|---|---|---|---|---|---|---|---|"]
    base = result["rows"][0]["step_ms"]
    for r in result["rows"]:
        full = r["step_ms"] * sum(FULL_LAYERS) / s["layers"]
        share = r["attention_ms_per_layer"] * s["layers"] / r["step_ms"]
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['run']} | {r['step_ms']:.0f} | {full:.0f} | {base / r['step_ms']:.2f}x | "
                     f"{r['attention_ms_per_layer']:.1f} | {share:.0%} | {peak} | "
                     f"{r.get('rel_l2_vs_sdpa', 0.0):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="e2e_hunyuan")
    parser.add_argument("--frames", type=int, default=129, help="video frames (latent frames: (frames-1)/4+1)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--text", type=int, default=256, help="prompt tokens")
    parser.add_argument("--valid-text", type=int, help="unpadded prompt tokens (default: all)")
    parser.add_argument("--layers", type=int, help="build this many blocks (1:2 dual:single) and extrapolate")
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 (smoke runs)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.15])
    parser.add_argument("--sdpa-backend", choices=["default", *SDPA_BACKENDS], default="default",
                        help="SDPA kernel of the baseline (default: torch's choice, as in diffusers)")
    parser.add_argument("--attn-reps", type=int, default=3, help="isolated attention calls averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="CPU with Triton's interpreter (tiny shapes only)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench_e2e_hunyuan: no CUDA GPU; use --cpu for the interpreter smoke run", file=sys.stderr)
        return 2
    if args.layers is not None and args.layers < 1:
        parser.error("--layers: expected a positive number of blocks")
    if args.height % 16 or args.width % 16 or (args.frames - 1) % 4:
        parser.error("--height/--width must be multiples of 16 and --frames of the form 4 k + 1")
    device = "cpu" if args.cpu else "cuda"
    diffusers.utils.logging.set_verbosity_error()  # its dtype-cast notice on the meta model

    def log(msg):
        print(msg, flush=True)

    started = time.time()
    dual, single = block_counts(args.layers)
    model = build_model(dual, single, args.heads, device, args.seed)
    inputs = make_inputs(args, device)
    video, tokens = token_counts(inputs)
    clock = Clock(cuda=not args.cpu)
    log(f"model: {dual} + {single} blocks, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
        f"{tokens:,} tokens ({time.time() - started:.0f} s)")

    row, reference = run("sdpa", model, inputs, clock, context=lambda: sdpa_context(args.sdpa_backend),
                         layer_call=lambda: sdpa_layer_call(model, inputs), attn_reps=args.attn_reps,
                         reference=None, log=log)
    rows = [row]
    for density in args.densities:
        with install(model, predictor="fixed_density", density=density):
            row, _ = run(f"fgattn {density}", model, inputs, clock, context=contextlib.nullcontext,
                         layer_call=lambda: fgattn_layer_call(model, inputs, density), attn_reps=args.attn_reps,
                         reference=reference, log=log)
        rows.append(row)
    result = dict(
        name=args.name, **run_info(args.cpu, diffusers=diffusers.__version__),
        settings=dict(frames=args.frames, height=args.height, width=args.width,
                      latents=list(inputs["hidden_states"].shape), video_tokens=video,
                      text_tokens=args.text, valid_text=args.valid_text or args.text, tokens=tokens,
                      dual_blocks=dual, single_blocks=single, layers=dual + single, heads=args.heads,
                      params_b=sum(p.numel() for p in model.parameters()) / 1e9, sdpa_backend=args.sdpa_backend,
                      densities=args.densities, attn_reps=args.attn_reps, seed=args.seed),
        wall_s=round(time.time() - started, 1), rows=rows,
    )
    write_results(args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
