"""A whole generation (50 denoising steps, CFG: 2 transformer calls per step) of HunyuanVideo 720p x 129 frames and
Wan2.1-14B 720p x 81 frames: attention and transformer time of refresh schedules against dense cuDNN, and their
output error along trajectory data.

    source .whl/env.sh && PYTHONPATH=.:$PYTHONPATH python bench/bench_generation.py            # GPU, ~5 min
    ... bench_generation.py --parts model            # only the transformers' dense timing (~1 min)
    ... bench_generation.py --parts sweep --models hunyuan --families smooth content   # a part of the sweep
    PYTHONPATH=/path/to/diffusers:. python bench/bench_generation.py --cpu-smoke       # interpreter, tiny shapes

Two parts (``--parts``; each run merges its part into ``bench/results/<name>.parts.json`` and rewrites the
tables from what that file holds, so parts may run in separate calls):

- ``model``: the real diffusers transformer (diffusers 0.42.1 ``HunyuanVideoTransformer3DModel`` default config,
  ``WanTransformer3DModel`` with the 14B config: 40 blocks, 40 heads x 128, ffn 13,824), full width, random
  bf16 weights, ``--layers`` blocks built (Hunyuan: 1 dual + 2 single, Wan: 2): one warm-up forward, one timed
  forward (CUDA events) under ``sdpa_kernel(CUDNN_ATTENTION)``; the step time of the released model is the
  measured one x (all blocks / built blocks), an extrapolation. The prompt has no padding (all text tokens
  valid), so HunyuanVideo's all-True key mask is dropped before SDPA (a processor wrapper) and cuDNN runs
  unmasked, as the sparse path does. Dense attention per block: an isolated cuDNN call at the block's shape.
- ``sweep``: ``ditdata.trajectory`` at the model's real sequence length (``--heads`` heads; each family of
  ``--families`` is one layer with its own cached masks), ``--steps`` steps. At every step each schedule runs
  the step's attention; its time is taken with CUDA events around the call (checks, refreshes and host syncs
  included, and the density count of ``return_stats``: one small kernel and a host sync), its error is the
  output rel-L2 against dense cuDNN on the same step. Schedules:
  ``default`` (``attention(predictor=predict)`` per call, text keys kept), ``fixed`` (``CachedMask``, exact
  masks at threshold ``--fixed-c`` / S refreshed every ``--fixed-every`` steps) and ``adaptive w/c/r``
  (``AdaptiveRefresh(refresh_below=r, warmup=w, max_age=--max-age)``, exact masks at threshold c / S), over
  the grid ``--warmups`` x ``--thresholds`` x ``--refresh-below``; ``calibrated e/w/r`` (``--calibrated``):
  adaptive with per-head thresholds that ``predictors.calibrate`` picks for target error e on a held-out
  run of the same family (seed + 1000; calibration time not counted). Kernels are compiled before timing (one
  call per density bucket).

Rows: ``attention_speedup`` = sum of dense times / sum of the schedule's times over steps and layers (the
sweep's heads; attention time is linear in heads); ``e2e_speedup`` = step time / (step time - dense attention
+ dense attention / attention_speedup), the model part's dense numbers; ``mean_step_rel_l2`` /
``max_step_rel_l2``: mean / max over (layer, step) of the output rel-L2. CFG doubles dense and sparse work
alike (ratios unchanged; the masks of two branches take twice the memory). Writes
``bench/results/<name>.json`` (rows) and ``<name>.md`` (card, versions, date, the tables).
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before Triton is imported: @triton.jit decides at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchlib import RESULTS, elapsed_ms, header_lines, random_model, rel_l2, run_info, write_results  # noqa: E402
from fgattn_gen import attention  # noqa: E402
from fgattn_gen.attention_api import density_bucket  # noqa: E402
from fgattn_gen.ditdata import FAMILIES, SHAPES, DitShape, trajectory  # noqa: E402
from fgattn_gen.predictors import AdaptiveRefresh, CachedMask, calibrate, captured_mass, exact_mask, predict  # noqa: E402
from fgattn_gen.predictors import UnreachableTarget  # noqa: E402
from fgattn_gen.predictors.calibration import default_grid  # noqa: E402
from fgattn_gen.predictors.dense import dense_attention_with_lse  # noqa: E402

MODELS = {  # name: (sweep shape, blocks of the released model)
    "hunyuan": (SHAPES["hunyuan-720p"], 60),
    "wan14b": (SHAPES["wan14b-720p"], 40),
}
SMOKE_SHAPE = DitShape("smoke", 2, 8, 16, 8, 2, 64)  # 264 tokens, for --cpu-smoke


# ---------------------------------------------------------------------------------------- model part
class _Unmasked:
    """A HunyuanVideo attention processor that drops the key mask: only for prompts without padding (the
    mask is all True), so that SDPA runs on cuDNN without a mask."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)


def build(model: str, blocks: int, smoke: bool, device: str):
    """(transformer with ``blocks`` blocks and random weights, its forward inputs, blocks of the released
    model, (heads, tokens) of a block's self-attention)."""
    gen = torch.Generator(device=device).manual_seed(1)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    heads = 2 if smoke else None
    if model == "hunyuan":
        from diffusers import HunyuanVideoTransformer3DModel
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
        heads = heads or 24
        dual = blocks // 3
        net = random_model(lambda: HunyuanVideoTransformer3DModel(num_layers=dual, num_single_layers=blocks - dual,
                                                                   num_attention_heads=heads), device, 0)
        for module in net.modules():
            if isinstance(getattr(module, "processor", None), HunyuanVideoAttnProcessor2_0):
                module.processor = _Unmasked(module.processor)
        latent, text = ((2, 8, 8), 16) if smoke else ((33, 90, 160), 256)
        inputs = dict(hidden_states=torch.randn(1, 16, *latent, generator=gen, **bf16),
                      timestep=torch.tensor([1000.0], **bf16),
                      encoder_hidden_states=torch.randn(1, text, 4096, generator=gen, **bf16),
                      encoder_attention_mask=torch.ones(1, text, dtype=torch.long, device=device),
                      pooled_projections=torch.randn(1, 768, generator=gen, **bf16),
                      guidance=torch.tensor([6000.0], **bf16))
        tokens = latent[0] * latent[1] // 2 * latent[2] // 2 + text
        return net, inputs, 60, (heads, tokens)
    from diffusers import WanTransformer3DModel
    heads = heads or 40
    net = random_model(lambda: WanTransformer3DModel(num_attention_heads=heads, num_layers=blocks,
                                                      ffn_dim=512 if smoke else 13824), device, 0)
    latent, text = ((2, 8, 8), 16) if smoke else ((21, 90, 160), 512)
    inputs = dict(hidden_states=torch.randn(1, 16, *latent, generator=gen, **bf16),
                  timestep=torch.tensor([999], device=device),
                  encoder_hidden_states=torch.randn(1, text, 4096, generator=gen, **bf16))
    return net, inputs, 40, (heads, latent[0] * latent[1] // 2 * latent[2] // 2)


def dense(q, k, v):
    """Dense attention: cuDNN on the GPU (the baseline of every number), fp32 math on the CPU."""
    return dense_attention_with_lse(q, k, v, q.shape[-1] ** -0.5, backend="cudnn" if q.is_cuda else "math")[0]


def model_part(model: str, args, log) -> dict:
    cuda = not args.cpu_smoke
    device = "cuda" if cuda else "cpu"
    blocks = args.layers or (3 if model == "hunyuan" else 2)
    net, inputs, full_blocks, (heads, tokens) = build(model, blocks, args.cpu_smoke, device)
    context = functools.partial(torch.nn.attention.sdpa_kernel, torch.nn.attention.SDPBackend.CUDNN_ATTENTION) \
        if cuda else contextlib.nullcontext

    def forward():
        with torch.no_grad(), context():
            net(**inputs)

    forward()
    step_ms = elapsed_ms(forward, cuda)
    del net
    gen = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(1, heads, tokens, 128, generator=gen, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    dense(q, k, v)
    attn_ms = elapsed_ms(lambda: dense(q, k, v), cuda, reps=3)
    full_ms = step_ms * full_blocks / blocks
    log(f"{model}: {blocks} blocks {step_ms:.0f} ms -> {full_blocks} blocks {full_ms:.0f} ms (extrapolated); "
        f"dense attention {attn_ms:.1f} ms / block ({tokens:,} tokens, {heads} heads): "
        f"{full_blocks * attn_ms / full_ms:.0%} of the step")
    return dict(blocks_built=blocks, blocks=full_blocks, step_ms_built=step_ms, step_ms=full_ms,
                attention_ms_per_block=attn_ms, tokens=tokens, heads=heads)


# ---------------------------------------------------------------------------------------- sweep part
def schedules(args, seq: int, text) -> dict:
    """name -> (kind, factory[, target]): ``factory()`` gives a fresh per-generation object (kind
    ``"calibrated"``: ``factory(threshold=per-head list)``, calibrated for ``target`` per layer)."""
    keep = [text] if text else None
    out = {"default": ("call", lambda: functools.partial(predict, keep_keys=keep))}
    fixed = sorted(set(range(0, args.steps, args.fixed_every)))
    out[f"fixed c{args.fixed_c:g} every {args.fixed_every}"] = (
        "cache", lambda: CachedMask(fixed, threshold=min(1.0, args.fixed_c / seq), keep_keys=keep))
    for w in args.warmups:
        for c in args.thresholds:
            for r in args.refresh_below:
                policy = AdaptiveRefresh(refresh_below=r, warmup=w, max_age=args.max_age, samples=args.samples)
                out[f"adaptive w{w} c{c:g} r{r:g}"] = (
                    "cache", functools.partial(CachedMask, policy=policy, threshold=min(1.0, c / seq), keep_keys=keep))
        for target in args.calibrated:
            for r in args.refresh_below:
                policy = AdaptiveRefresh(refresh_below=r, warmup=w, max_age=args.max_age, samples=args.samples)
                out[f"calibrated e{target:g} w{w} r{r:g}"] = (
                    "calibrated", functools.partial(CachedMask, policy=policy, keep_keys=keep), target)
    return out


def calibrated_thresholds(shape, family: str, layer: int, target: float, warmup: int, args, device, log) -> list:
    """Per-head exact-mask thresholds for ``target`` (``predictors.calibrate``, worst error over the samples)
    from a held-out run of the same family (seed + 1000: other draws, as a user's earlier generation would
    be): its steps ``warmup - 1``, the middle and the last. Unreachable: the densest grid value. Calibrated
    without the text keys the timed run keeps, so the thresholds are conservative."""
    held = trajectory(shape, family, steps=args.steps, seed=args.seed + 1000, device=device)
    steps = sorted({max(warmup - 1, 0), args.steps // 2, args.steps - 1})
    samples = [(held[t].q, held[t].k, held[t].v) for t in steps]
    try:
        found = calibrate({layer: samples}, target_error=target, predictor="cached_exact", points=8, refine=2)
        return found.values[layer]
    except UnreachableTarget as miss:
        log(f"calibration of {family} to {target:g}: {miss}; the densest grid value instead")
        return [default_grid("threshold", shape.seq, 8)[0]] * shape.heads


def compile_kernels(q, k, v, text) -> None:
    """One call of every kernel the schedules use, at every density bucket (no compilation while timing)."""
    keep = [text] if text else None
    _, keys = exact_mask(q, k, v, threshold=min(1.0, 4 / q.shape[2]), keep_keys=keep)
    captured_mass(q, k, keys, samples=2)
    buckets = {density_bucket(2 ** (-i / 2)) for i in range(14)}
    for hint in (None, *sorted(buckets)):
        attention(q, k, v, dataclasses.replace(keys, density_hint=hint))
    attention(q, k, v, predictor=functools.partial(predict, keep_keys=keep))


def sweep_part(model: str, args, log) -> dict:
    cuda = not args.cpu_smoke
    device = "cuda" if cuda else "cpu"
    shape = SMOKE_SHAPE if args.cpu_smoke else MODELS[model][0]
    shape = dataclasses.replace(shape, heads=min(args.heads, shape.heads))
    text = shape.text_range if shape.text_tokens else None
    plans = schedules(args, shape.seq, text)
    totals = {name: dict(ms=0.0, errors=[], densities=[], actions={}) for name in ["dense", *plans]}
    for layer, family in enumerate(args.families):
        traj = trajectory(shape, family, steps=args.steps, seed=args.seed, device=device)
        if layer == 0:
            last = traj[-1]
            compile_kernels(last.q, last.k, last.v, text)
        objects, thresholds = {}, {}
        for name, (kind, factory, *target) in plans.items():
            if kind == "calibrated":
                key = (target[0], factory.keywords["policy"].warmup)  # the same for every refresh_below
                if key not in thresholds:
                    thresholds[key] = calibrated_thresholds(shape, family, layer, *key, args, device, log)
                objects[name] = factory(threshold=thresholds[key])
            else:
                objects[name] = factory()
        started = time.time()
        for step in range(args.steps):
            data = traj[step]
            q, k, v = data.q, data.k, data.v
            box = {}
            totals["dense"]["ms"] += elapsed_ms(lambda: box.update(out=dense(q, k, v)), cuda)
            ref = box["out"]
            for name, (kind, *_) in plans.items():
                obj = objects[name]
                predictor = obj.at(step=step, layer=layer) if kind != "call" else obj
                got = {}
                totals[name]["ms"] += elapsed_ms(lambda: got.update(out=attention(q, k, v, predictor=predictor,
                                                                                  return_stats=True)), cuda)
                out, stats = got["out"]
                totals[name]["errors"].append(rel_l2(out, ref))
                totals[name]["densities"].append(stats.density)
            del data, q, k, v, ref
        for name, (kind, *_) in plans.items():
            if kind != "call":
                for _, action in objects[name].history(layer):
                    totals[name]["actions"][action] = totals[name]["actions"].get(action, 0) + 1
        log(f"{model} sweep: layer {layer} ({family}) {args.steps} steps in {time.time() - started:.0f} s")
    dense_ms = totals.pop("dense")["ms"]
    rows = {}
    for name, t in totals.items():
        rows[name] = dict(attention_speedup=dense_ms / t["ms"], mean_step_rel_l2=sum(t["errors"]) / len(t["errors"]),
                          max_step_rel_l2=max(t["errors"]), mean_density=sum(t["densities"]) / len(t["densities"]),
                          actions=t["actions"], ms=t["ms"], dense_ms=dense_ms)
        r = rows[name]
        log(f"{model:8s} {name:28s} attention x{r['attention_speedup']:.2f}  rel_l2 mean {r['mean_step_rel_l2']:.4f} "
            f"max {r['max_step_rel_l2']:.4f}  density {r['mean_density']:.3f}  {t['actions'] or ''}")
    return dict(shape=dataclasses.asdict(shape), families=list(args.families), steps=args.steps, seed=args.seed,
                schedules=rows)


# ---------------------------------------------------------------------------------------- report
def result_rows(parts: dict) -> list[dict]:
    rows = []
    for model, got in parts.get("models", {}).items():
        timing, sweep = got.get("model"), got.get("sweep")
        if sweep is None:
            continue
        for name, s in sweep["schedules"].items():
            row = dict(model=model, schedule=name, attention_speedup=s["attention_speedup"], e2e_speedup=None,
                       mean_step_rel_l2=s["mean_step_rel_l2"], max_step_rel_l2=s["max_step_rel_l2"],
                       mean_density=s["mean_density"], actions=s["actions"])
            if timing is not None:
                attn = timing["blocks"] * timing["attention_ms_per_block"]
                step = timing["step_ms"]
                sparse_step = step - attn + attn / s["attention_speedup"]
                calls = 2 * sweep["steps"]  # CFG: two transformer calls per step
                row.update(e2e_speedup=step / sparse_step, generation_s=calls * sparse_step / 1e3,
                           generation_attention_s=calls * attn / s["attention_speedup"] / 1e3,
                           dense_generation_s=calls * step / 1e3, dense_generation_attention_s=calls * attn / 1e3)
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [*header_lines(result), (__doc__ or "").split("\n\n")[0].replace("\n", " "), "",
             "Timing (model part): the transformer step time is measured on the built blocks and extrapolated to "
             "all blocks; attention time over the generation = 2 (CFG) x steps x blocks x dense attention per "
             "block / attention_speedup. Error and attention_speedup (sweep part): trajectory data at the real "
             "sequence length, a few heads, every family as one layer. See the script's docstring.", ""]
    for model, got in result["parts"].get("models", {}).items():
        if "model" in got:
            m = got["model"]
            lines.append(f"- {model}: {m['blocks_built']} blocks built, step {m['step_ms_built']:.0f} ms -> "
                         f"{m['blocks']} blocks {m['step_ms']:.0f} ms (extrapolated); dense cuDNN attention "
                         f"{m['attention_ms_per_block']:.1f} ms / block ({m['tokens']:,} tokens, {m['heads']} heads).")
        if "sweep" in got:
            s = got["sweep"]
            lines.append(f"- {model} sweep: {s['shape']['heads']} heads x {s['shape']['frames']}x"
                         f"{s['shape']['height']}x{s['shape']['width']} + {s['shape']['text_tokens']} text, "
                         f"{s['steps']} steps, families {', '.join(s['families'])} (seed {s['seed']}).")
    lines += ["", "| model | schedule | attention speedup | e2e speedup | mean step rel-L2 | max step rel-L2 | "
              "mean density | generation s (attention s) | dense generation s (attention s) | calls |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gen = (f"{r['generation_s']:.0f} ({r['generation_attention_s']:.0f})" if r["e2e_speedup"] is not None
               else "n/a")
        dense_gen = (f"{r['dense_generation_s']:.0f} ({r['dense_generation_attention_s']:.0f})"
                     if r["e2e_speedup"] is not None else "n/a")
        e2e = "n/a" if r["e2e_speedup"] is None else f"{r['e2e_speedup']:.2f}x"
        actions = ", ".join(f"{k} {v}" for k, v in sorted(r["actions"].items())) or "per call"
        lines.append(f"| {r['model']} | {r['schedule']} | {r['attention_speedup']:.2f}x | {e2e} | "
                     f"{r['mean_step_rel_l2']:.4f} | {r['max_step_rel_l2']:.4f} | {r['mean_density']:.3f} | {gen} | "
                     f"{dense_gen} | {actions} |")
    best = [r for r in result["rows"] if r["model"] == "hunyuan" and r["mean_step_rel_l2"] <= 0.03]
    if best:
        top = max(best, key=lambda r: r["attention_speedup"])
        lines += ["", f"HunyuanVideo, fastest schedule with mean step rel-L2 <= 0.03: {top['schedule']}, attention "
                      f"x{top['attention_speedup']:.2f} (bar 2.5)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="results name (default generation_<gpu>, generation_cpu with --cpu-smoke)")
    parser.add_argument("--parts", nargs="+", choices=["model", "sweep"], default=["model", "sweep"])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--layers", type=int, help="transformer blocks built (default Hunyuan 3, Wan 2)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--heads", type=int, default=4, help="heads of the sweep's trajectory data")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--warmups", type=int, nargs="+", default=[4], help="adaptive: dense warm-up steps")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[2, 4, 8, 16],
                        help="adaptive: exact-mask threshold c / S, the values of c")
    parser.add_argument("--refresh-below", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--max-age", type=int, default=15)
    parser.add_argument("--calibrated", type=float, nargs="*", default=[],
                        help="adaptive with per-head thresholds calibrated (predictors.calibrate) to these target "
                             "errors on a held-out run; x --warmups x --refresh-below")
    parser.add_argument("--samples", type=int, default=2, help="adaptive: rows per block of the mass check")
    parser.add_argument("--fixed-c", type=float, default=4.0)
    parser.add_argument("--fixed-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CPU, Triton's interpreter, tiny models and shapes: checks the script, times nothing")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.steps, args.families = min(args.steps, 3), args.families[:1]
        args.thresholds, args.refresh_below = args.thresholds[:1], args.refresh_below[:1]
        args.warmups = [min(w, 2) for w in args.warmups[:1]]
    elif not torch.cuda.is_available():
        print("bench_generation: no CUDA GPU; use --cpu-smoke for the interpreter smoke run", file=sys.stderr)
        return 2
    if args.steps < 2 or args.heads < 1 or args.max_age < 1 or args.fixed_every < 1:
        parser.error("--steps >= 2, --heads >= 1, --max-age >= 1, --fixed-every >= 1")
    gpu = "cpu" if args.cpu_smoke else torch.cuda.get_device_name().split()[-1].lower()
    name = args.name or f"generation_{gpu}"
    parts_file = RESULTS / f"{name}.parts.json"
    parts = json.loads(parts_file.read_text()) if parts_file.exists() else {"models": {}}

    def log(msg):
        print(msg, flush=True)

    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    started = time.time()
    for model in args.models:
        got = parts["models"].setdefault(model, {})
        if "model" in args.parts:
            got["model"] = model_part(model, args, log)
        if "sweep" in args.parts:
            got["sweep"] = sweep_part(model, args, log)
        RESULTS.mkdir(parents=True, exist_ok=True)
        parts_file.write_text(json.dumps(parts, indent=1) + "\n")
        if not args.cpu_smoke:
            torch.cuda.empty_cache()
    result = dict(name=name, **run_info(args.cpu_smoke, diffusers=diffusers.__version__),
                  wall_s=round(time.time() - started, 1), parts=parts, rows=result_rows(parts))
    write_results(name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
