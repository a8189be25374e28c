"""Whole attention calls with a predictor, on every DiT-like data family, against dense SDPA (cuDNN): what a user
gets from ``attention(q, k, v, predictor=...)``, and what choosing the keys costs.

    PYTHONPATH=. python bench/bench_attention_call.py --name attention_call_h200           # GPU, seeds 0 1 2
    PYTHONPATH=. python bench/bench_attention_call.py --name attention_call_cpu --cpu      # interpreter smoke run
    PYTHONPATH=. python bench/bench_attention_call.py --name accuracy_cpu --cpu --accuracy  # errors only, CPU shapes
    PYTHONPATH=. python bench/bench_attention_call.py --name attention_call_h200 --plot    # the plot of a result

Per shape (HunyuanVideo 720p: 24 heads, 33x45x80 video + 256 text = 119,056 tokens; Wan-14B 720p: 40 heads,
21x45x80 = 75,600; S = 32,760, 24 heads) and data family (``fgattn_gen.ditdata.FAMILIES``), bf16 q/k/v
``[B, H, S, D]``, text keys kept by every predictor:

- ``sdpa-cudnn``: the dense output (the reference of every error) and ``dense_ms``;
- ``default``: ``predictors.predict`` (clustered query blocks, pooled threshold rule, captured-mass check) at its
  defaults: ``predictor_ms`` (the predictor alone), ``kernel_ms`` (``attention`` with its KeySet), ``ms`` (the
  whole ``attention(q, k, v, predictor="default")`` call);
- ``pooled_top_p``: the previous default (top-p 0.9, pool 128, similarity gate 0.6), timed the same way;
- curves for the error-vs-density plot, error only: ``exact_mask`` at thresholds c / S (the exact mask of the
  same data, 128 x 1), ``block128``: the 128 x 128 block predictor (pooled q and k per block, threshold rule
  over blocks, as SpargeAttn-style block sparsity does), and ``default`` over its ``threshold_scale``.

``exact_rel_l2``: the exact mask's error at the row's density (log-log interpolation of its curve);
``ratio`` = rel_l2 / exact_rel_l2 (bar: default <= 3). Times: medians of ``triton.testing.do_bench``; rel_l2:
relative L2 of the output against the SDPA output over all heads. Writes ``bench/results/<name>.json`` and
``.md`` (the JSON also after every case: ``--resume`` continues a run that was cut short); ``--plot`` draws
``<name>.png`` from the JSON (matplotlib, on any machine). ``--accuracy`` measures the errors only (no times):
with ``--cpu`` on the CPU shapes (727 and 2,317 tokens) through the predictors' torch paths and the fp32
reference, in minutes, where the interpreter smoke run takes an hour.
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv and "--accuracy" not in sys.argv:  # before Triton is imported: @triton.jit decides then
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from benchlib import RESULTS, header_lines, rel_l2, run_info, timer, write_results  # noqa: E402
from fgattn_gen import attention  # noqa: E402
from fgattn_gen.ditdata import FAMILIES, SHAPES, DitShape, dit_qkv  # noqa: E402
from fgattn_gen.predictors import exact_mask, pooled_top_p, predict  # noqa: E402
from fgattn_gen.stats import computed_fraction  # noqa: E402

GPU_SHAPES = {
    "hunyuan-720p": SHAPES["hunyuan-720p"],
    "wan14b-720p": SHAPES["wan14b-720p"],
    "hunyuan-32k": SHAPES["hunyuan-32k"],
}
CPU_SHAPES = {"narrow-cpu": SHAPES["narrow-cpu"]}
CPU_ACCURACY_SHAPES = {name: SHAPES[name] for name in ("narrow-cpu", "study-cpu")}
EXACT_SCALES = (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # exact mask thresholds c / S: down to ~0.02 density
BLOCK_SCALES = (0.25, 0.5, 1, 2, 4)  # 128 x 128 threshold rule, c / n_kblocks
DEFAULT_SCALES = (0.5, 1, 2, 4, 8)  # predict(threshold_scale=...)


def interpolate(curve: list[tuple[float, float]], density: float) -> float | None:
    """Error of a (density, error) curve at ``density``, log-log between its neighbours (None outside it)."""
    points = sorted(p for p in curve if p[0] > 0 and p[1] > 0)
    for (d0, e0), (d1, e1) in zip(points, points[1:]):
        if d0 <= density <= d1:
            if d1 == d0:
                return e0
            t = math.log(density / d0) / math.log(d1 / d0)
            return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))
    return None


def bench_family(shape: DitShape, family: str, seed: int, *, cpu: bool, timed: bool, log) -> list[dict]:
    """The rows of one (shape, family, seed); without ``timed`` every time is None."""
    device = "cpu" if cpu else "cuda"
    data = dit_qkv(shape, family=family, dtype=torch.bfloat16, device=device, seed=seed)
    q, k, v = data.q, data.k, data.v
    del data
    seq = q.shape[2]
    text = [shape.text_range] if shape.text_tokens else None
    timing = timer(cpu, warmup_ms=25, rep_ms=100)

    def measure(fn) -> float | None:
        return timing(fn) if timed else None

    if cpu:
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        dense_ms = measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    else:
        from fgattn_gen.baselines import sdpa
        ref = sdpa(q, k, v, "cudnn")
        dense_ms = measure(lambda: sdpa(q, k, v, "cudnn"))
    base = dict(shape=shape.name, dims=list(q.shape), family=family, seed=seed, dense_ms=dense_ms)
    curves: dict[str, list[tuple[float, float]]] = {"exact_mask": [], "block128": [], "default": []}

    def point(keys, out) -> tuple[float, float]:
        return computed_fraction(keys, seq, k.shape[2]), rel_l2(out, ref)

    for c in EXACT_SCALES:
        out, keys = exact_mask(q, k, v, threshold=min(1.0, c / seq), keep_keys=text)
        curves["exact_mask"].append(point(keys, attention(q, k, v, keys)))
        del out
    n_kblocks = -(-seq // 128)
    for c in BLOCK_SCALES:
        keys = pooled_top_p(q, k, block_m=128, block_n=128, threshold=min(1.0, c / n_kblocks), sim_threshold=-1.0,
                            keep_keys=text)
        curves["block128"].append(point(keys, attention(q, k, v, keys)))
    for c in DEFAULT_SCALES:
        keys = predict(q, k, threshold_scale=c, keep_keys=text)
        curves["default"].append(point(keys, attention(q, k, v, keys)))

    rows = []
    predictors = {"default": lambda: predict(q, k, keep_keys=text),
                  "pooled_top_p": lambda: pooled_top_p(q, k, keep_keys=text)}
    for impl, make_keys in predictors.items():
        keys = make_keys()
        density, err = point(keys, attention(q, k, v, keys))
        exact_err = interpolate(curves["exact_mask"], density)
        predictor_ms = measure(make_keys)
        kernel_ms = measure(lambda: attention(q, k, v, keys))
        ms = measure(lambda: attention(q, k, v, make_keys()))
        share = None if predictor_ms is None else predictor_ms / dense_ms
        rows.append(dict(impl=impl, **base, density=density, rel_l2=err, exact_rel_l2=exact_err,
                         ratio=None if exact_err is None else err / exact_err, predictor_ms=predictor_ms,
                         kernel_ms=kernel_ms, ms=ms, predictor_share=share))
        times = "" if share is None else (f" predictor {predictor_ms:.3f} ms = {100 * share:.2f} % of dense "
                                          f"{dense_ms:.3f} ms; kernel {kernel_ms:.3f}, call {ms:.3f}")
        log(f"{shape.name:13s} {family:16s} {impl:13s} seed {seed} density {density:.3f} rel_l2 {err:.4f} "
            f"(exact {exact_err if exact_err is None else round(exact_err, 4)}){times}")
    for impl, curve in curves.items():
        for density, err in curve:
            rows.append(dict(impl=f"{impl} (curve)", **base, density=density, rel_l2=err))
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def markdown(result: dict) -> str:
    lines = [*header_lines(result),
             "Whole `attention(q, k, v, predictor=...)` calls on DiT-like bf16 data of every family "
             "(`fgattn_gen.ditdata.FAMILIES`), text keys kept. predictor / kernel / call: medians of "
             "`triton.testing.do_bench`; share = predictor time / dense cuDNN time; rel_l2 vs the dense output; "
             "exact = the exact mask's error at the same density (interpolated on its curve); ratio = rel_l2 / "
             "exact (bar: default <= 3, share <= 0.05).", "",
             "| shape | family | seed | impl | density | rel_l2 | exact | ratio | predictor ms | share | kernel ms "
             "| call ms | dense ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    for r in result["rows"]:
        if "(curve)" in r["impl"]:
            continue
        lines.append(f"| {r['shape']} | {r['family']} | {r['seed']} | {r['impl']} | {r['density']:.3f} | "
                     f"{r['rel_l2']:.4f} | {fmt(r['exact_rel_l2'], '.4f')} | {fmt(r['ratio'], '.2f')} | "
                     f"{fmt(r['predictor_ms'], '.3f')} | {fmt(r['predictor_share'], '.3f')} | "
                     f"{fmt(r['kernel_ms'], '.3f')} | {fmt(r['ms'], '.3f')} | {fmt(r['dense_ms'], '.3f')} |")
    defaults = [r for r in result["rows"] if r["impl"] == "default"]
    if defaults:
        lines += ["", "Default predictor per shape and family, over the seeds (mean and worst): every family listed.",
                  "",
                  "| shape | family | seeds | density | rel_l2 | ratio mean | ratio worst | share worst |",
                  "|---|---|---|---|---|---|---|---|"]
        for shape, family in dict.fromkeys((r["shape"], r["family"]) for r in defaults):
            group = [r for r in defaults if (r["shape"], r["family"]) == (shape, family)]
            ratios = [r["ratio"] for r in group if r["ratio"] is not None]
            missing = len(group) - len(ratios)
            shares = [r["predictor_share"] for r in group if r["predictor_share"] is not None]
            lines.append(f"| {shape} | {family} | {len(group)} | {_mean([r['density'] for r in group]):.3f} | "
                         f"{_mean([r['rel_l2'] for r in group]):.4f} | {fmt(_mean(ratios) if ratios else None, '.2f')} | "
                         f"{fmt(max(ratios, default=None), '.2f')}{f' ({missing} n/a)' if missing and ratios else ''} | "
                         f"{fmt(max(shares, default=None), '.3f')} |")
        worst_ratio = max((r["ratio"] for r in defaults if r["ratio"] is not None), default=None)
        worst_share = max((r["predictor_share"] for r in defaults if r["predictor_share"] is not None), default=None)
        lines += ["", f"Default, worst over every row: ratio {fmt(worst_ratio, '.2f')} (bar 3), predictor share "
                      f"{fmt(worst_share, '.3f')} (bar 0.05; n/a: not timed)."]
    return "\n".join(lines) + "\n"


def plot(name: str) -> None:
    """``<name>.png``: error vs density per (shape, family), with the exact mask and the 128 x 128 predictor."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads((RESULTS / f"{name}.json").read_text())
    panels = sorted({(r["shape"], r["family"]) for r in result["rows"]})
    shapes = sorted({s for s, _ in panels})
    families = [f for f in FAMILIES if any(f == g for _, g in panels)]
    fig, axes = plt.subplots(len(shapes), len(families), figsize=(3.2 * len(families), 2.8 * len(shapes)),
                             squeeze=False)
    styles = {"exact_mask (curve)": "k-", "block128 (curve)": "C1--", "default (curve)": "C0-"}
    for i, shape in enumerate(shapes):
        for j, family in enumerate(families):
            ax = axes[i][j]
            rows = [r for r in result["rows"] if (r["shape"], r["family"]) == (shape, family)]
            for impl, style in styles.items():
                pts = sorted((r["density"], r["rel_l2"]) for r in rows if r["impl"] == impl)
                if pts:
                    ax.plot(*zip(*pts), style, marker=".", label=impl.replace(" (curve)", ""))
            for impl, marker in (("default", "o"), ("pooled_top_p", "x")):
                pts = [(r["density"], r["rel_l2"]) for r in rows if r["impl"] == impl]
                if pts:
                    ax.plot(*zip(*pts), marker, color="C3" if impl == "default" else "C2", label=f"{impl} (defaults)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{shape} / {family}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(shapes) - 1:
                ax.set_xlabel("density", fontsize=8)
            if j == 0:
                ax.set_ylabel("output rel-L2 vs dense", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{name}: {result['device']}, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="attention_call")
    parser.add_argument("--cpu", action="store_true", help="CPU with Triton's interpreter, a small shape")
    parser.add_argument("--accuracy", action="store_true",
                        help="errors only, no times (with --cpu: the torch paths and the fp32 reference, shapes "
                             f"{list(CPU_ACCURACY_SHAPES)})")
    parser.add_argument("--plot", action="store_true", help="only draw <name>.png from <name>.json")
    parser.add_argument("--shapes", nargs="+", help=f"default {list(GPU_SHAPES)} (GPU), {list(CPU_SHAPES)} (--cpu)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="data seeds of every (shape, family); default 0 1 2")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an earlier (cut-short) run of --name and run only the missing "
                             "(shape, family, seed) cases; the JSON is rewritten after every case")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.name)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("bench_attention_call: no CUDA GPU; use --cpu for the interpreter smoke run", file=sys.stderr)
        return 2
    known = (CPU_ACCURACY_SHAPES if args.accuracy else CPU_SHAPES) if args.cpu else GPU_SHAPES
    names = args.shapes or list(known)
    for name in names:
        if name not in known:
            parser.error(f"unknown shape {name!r}; known: {sorted(known)}")
    started = time.time()
    info = run_info(args.cpu)
    if args.accuracy:
        info["device"] = ("cpu (the predictors' torch paths, fp32 reference attention): errors only, no times"
                          if args.cpu else f"{info['device']}: errors only, no times")
    partial = RESULTS / f"{args.name}.json"
    rows = json.loads(partial.read_text())["rows"] if args.resume and partial.exists() else []
    done = {(r["shape"], r["family"], r["seed"]) for r in rows}
    for name in names:
        for family in args.families:
            for seed in args.seeds:
                if (name, family, seed) in done:
                    continue
                with warnings.catch_warnings():  # the CPU fallback to the fp32 reference is what --accuracy wants
                    warnings.filterwarnings("ignore", message="fgattn: CPU tensors and no TRITON_INTERPRET")
                    rows += bench_family(known[name], family, seed, cpu=args.cpu, timed=not args.accuracy,
                                         log=lambda m: print(m, flush=True))
                if not args.cpu:
                    torch.cuda.empty_cache()
                RESULTS.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(dict(name=args.name, **info, rows=rows), indent=1) + "\n")
    result = dict(name=args.name, **info, wall_s=round(time.time() - started, 1), rows=rows)
    write_results(args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
