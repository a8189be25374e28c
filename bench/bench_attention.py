"""Kernel benchmark: fgattn against dense SDPA (cuDNN, flash) and FlexAttention block-sparse, one run.

    PYTHONPATH=. python bench/bench_attention.py --name h100_part1 \
        [--shapes 1,24,32760,128 1,48,17550,64] [--densities 1 0.5 0.3 0.1] \
        [--variants bm128_bn64_w4_s4 cuda_bm128_bn128_w8_s3 ...] [--peers flashinfer] [--cuda-mma auto wgmma]

Variants are Triton unless prefixed ``cuda_`` (rows fgattn-triton, fgattn-cuda). ``--cuda-mma`` runs each
CUDA variant on these matrix paths (``FGATTN_CUDA_MMA``): rows fgattn-cuda (auto: warp-specialized on
sm_90a), fgattn-cuda-wgmma, fgattn-cuda-sync, fgattn-cuda-ws. Every fgattn timing
includes the GPU compaction of the KeySet into index lists (it runs on every call). Masks are M x 1
(block_m=128, block_n=1) with spatial locality (``fgattn_gen.synthetic``); flex-block128 gets a 128 x 128
block mask of the same density from the same generator; flashinfer-c1 (``--peers flashinfer``) gets head
0's M x 1 mask on every head (its API shares one mask across heads). Each implementation is checked (SDPA
output at density 1, the fp32 reference on a slice otherwise) before it is timed.
Writes ``bench/results/<name>.json`` and ``<name>.md``.

Issue 15 (long sequences, very sparse and uneven masks, the CUDA kernel's work schedules side by side):

    PYTHONPATH=. python bench/bench_attention.py --name issue15_h200 --preset issue15 [--quick]

``--masks`` picks the M x 1 masks: ``local`` (the default above), ``uniform`` (every key of every query
block drawn with probability = density) and ``uneven`` (``uneven_keyset``: per query block a density drawn
log-uniformly over two decades, plus a few dense blocks as predictors' fallbacks make them, scaled so that the
whole mask has the target density). A CUDA variant may name a schedule (``_o1``, ``_o2``, ``_p1``; see
``fgattn_gen.variant``) and ``@ws<MB>`` (run with FGATTN_INDEX_WORKSPACE_MB=<MB>: fewer head chunks). Rows carry
``mask`` and ``rate_vs_cudnn`` = (computed scores / time) / (all scores / sdpa-cudnn time); the last table
printed lists that rate per variant side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import torch
import triton
import triton.testing

from fgattn_gen import KeySet, Variant, attention, reference_attention
from fgattn_gen.backends.cuda import launch as cuda_launch
from fgattn_gen.backends.cuda.launch import MMA_PATHS
from fgattn_gen.baselines import flex_block, flex_block_mask, sdpa
from benchlib import header_lines, run_info, write_results
from fgattn_gen.synthetic import local_block_mask

BLOCK_N = 1
MASKS = ("local", "uniform", "uneven")
ISSUE15 = dict(
    shapes=["1,24,119056,128", "1,24,75600,128", "1,48,17550,64", "1,40,119056,128", "1,40,75600,128"],
    densities=[1.0, 0.3, 0.1, 0.03, 0.01], masks=["uniform", "uneven"],
    variants=["cuda_bm128_bn128_w8_s2", "cuda_bm128_bn128_w8_s2_o1", "cuda_bm128_bn128_w8_s2_o2",
              "cuda_bm128_bn128_w8_s2_p1", "cuda_bm128_bn128_w8_s2_o2_p1", "cuda_bm128_bn128_w8_s2@ws20480"])
ISSUE15_QUICK = dict(
    shapes=["1,24,119056,128", "1,48,17550,64"], densities=[1.0, 0.3, 0.03], masks=["uniform", "uneven"],
    variants=["cuda_bm128_bn128_w8_s2", "cuda_bm128_bn128_w8_s2_o2", "cuda_bm128_bn128_w8_s2_p1",
              "cuda_bm128_bn128_w8_s2@ws20480"])


def parse_variant(spec: str, *, dtype: str, head_dim: int, block_m: int = 128) -> tuple[Variant, int | None]:
    """``"bm128_bn64_w8_s3"`` (Triton) or ``"cuda_bm128_bn128_w8_s3[_o<order>][_p<persist>][@ws<MB>]"`` ->
    (Variant for the benchmark's layout, index workspace in MB or None)."""
    spec, _, workspace = spec.partition("@ws")
    backend, tiles = ("triton", spec) if spec.startswith("bm") else spec.split("_", 1)
    fields = {part.rstrip("0123456789"): int(part[len(part.rstrip("0123456789")):]) for part in tiles.split("_")}
    variant = Variant(backend=backend, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=BLOCK_N,
                      tile_m=fields["bm"], tile_n=fields["bn"], num_warps=fields["w"], num_stages=fields["s"],
                      order=fields.get("o", 0), persist=fields.get("p", 0))
    return variant, int(workspace) if workspace else None


def _bernoulli_keyset(b: int, h: int, nq: int, s: int, p: torch.Tensor, block_m: int, gen: torch.Generator) -> KeySet:
    """M x 1 KeySet: key j of query block i of head hh selected with probability ``p[hh, i]``; built and
    packed one head at a time on the GPU (a whole bool mask at S = 119,056 would take 4 GB per 40 heads)."""
    bits = []
    for hh in range(b * h):
        head = torch.rand(nq, s, device=gen.device, generator=gen) < p[hh][:, None]
        bits.append(KeySet.from_mask(head[None, None], block_m=block_m).bits)
    packed = torch.cat(bits, dim=1).view(b, h, nq, -1)
    return KeySet(packed.contiguous(), s, block_m, BLOCK_N)


def uniform_keyset(b, h, nq, s, density, block_m, gen) -> KeySet:
    """Every key of every query block selected with probability ``density`` (the same expected count per block)."""
    return _bernoulli_keyset(b, h, nq, s, torch.full((b * h, nq), density, device=gen.device), block_m, gen)


def uneven_block_densities(n_blocks: tuple[int, int], density: float, gen: torch.Generator) -> torch.Tensor:
    """fp32 ``[rows, n_qblocks]`` per-block densities with mean ``density``: a fraction min(0.02, density / 4) of
    the blocks dense (the fallback blocks gates and a min-mass rule make), the others log-uniform over
    [x / 10, 10 x], x chosen (bisection) so that the mean over all blocks is ``density`` (each clipped to 1)."""
    rows, nq = n_blocks
    dense = torch.rand(rows, nq, device=gen.device, generator=gen) < min(0.02, density / 4)
    raw = torch.exp(math.log(10.0) * (2 * torch.rand(rows, nq, device=gen.device, generator=gen) - 1))
    lo, hi = 0.0, 1.0 / raw.min().item()
    for _ in range(50):
        x = 0.5 * (lo + hi)
        mean = torch.where(dense, 1.0, (x * raw).clamp(max=1.0)).mean().item()
        lo, hi = (x, hi) if mean < density else (lo, x)
    return torch.where(dense, 1.0, (0.5 * (lo + hi) * raw).clamp(max=1.0))


def uneven_keyset(b, h, nq, s, density, block_m, gen) -> KeySet:
    """M x 1 KeySet of overall density ``density`` with uneven blocks (``uneven_block_densities``)."""
    return _bernoulli_keyset(b, h, nq, s, uneven_block_densities((b * h, nq), density, gen), block_m, gen)


def make_keyset(kind: str, b: int, h: int, s: int, density: float, block_m: int) -> KeySet:
    """The benchmark's KeySet of mask family ``kind`` (MASKS) at ``density``, on the GPU."""
    nq = triton.cdiv(s, block_m)
    if density == 1.0:
        return KeySet.full(b, h, s, s, block_m=block_m, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    if kind == "uniform":
        return uniform_keyset(b, h, nq, s, density, block_m, gen)
    if kind == "uneven":
        return uneven_keyset(b, h, nq, s, density, block_m, gen)
    mask = local_block_mask(b, h, nq, triton.cdiv(s, BLOCK_N), density, seed=1, device="cuda")
    return KeySet.from_mask(mask, block_m=block_m, block_n=BLOCK_N)


def index_workspace(mb: int | None):
    """FGATTN_INDEX_WORKSPACE_MB=mb while the block runs (None: unchanged)."""
    return mock.patch.dict(os.environ, {} if mb is None else {"FGATTN_INDEX_WORKSPACE_MB": str(mb)})


def precompile(variants: list[Variant], mma_paths) -> dict[tuple[str, str], str]:
    """Build the CUDA variants on every matrix path in parallel (NVRTC, disk-cached) before timing;
    (key, path) -> error text of those that fail (reported in their rows' place, never fatal)."""
    jobs = [(v, p) for v in variants if v.backend == "cuda" for p in mma_paths]
    device = torch.cuda.current_device()

    def build(job):
        variant, path = job
        try:
            cuda_launch.load(variant, device, path)
            return None
        except Exception as exc:  # noqa: BLE001 - a variant that fails to build is reported, the run goes on
            return f"{type(exc).__name__}: {str(exc)[:300]}"

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(jobs)))) as pool:
        errors = list(pool.map(build, jobs))
    return {(v.key, p): e for (v, p), e in zip(jobs, errors) if e is not None}


def flashinfer_c1(q, k, v, head_mask: torch.Tensor):
    """FlashInfer's BlockSparseAttentionWrapper (FA3 backend, R=128, C=1) with one key set for every head
    (its API shares the BSR mask across heads): ``head_mask`` bool ``[ceil(S / 128), S]``. Planned here (host
    side, outside the timing); returns the ``run`` closure and its output ``[1, H, S, D]``. The query rows are
    padded to a multiple of 128 (R must divide them)."""
    import flashinfer

    _, h, s, d = q.shape
    rows = head_mask.shape[0] * 128
    q_nhd = torch.nn.functional.pad(q[0].transpose(0, 1), (0, 0, 0, 0, 0, rows - s)).contiguous()
    k_nhd, v_nhd = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
    indptr = torch.nn.functional.pad(head_mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    indices = head_mask.nonzero()[:, 1].to(torch.int32).contiguous()
    wrapper = flashinfer.BlockSparseAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=q.device),
                                                     backend="fa3")
    wrapper.plan(indptr, indices, rows, s, 128, 1, h, h, d, q_data_type=q.dtype, kv_data_type=k.dtype,
                 o_data_type=q.dtype)

    def run():
        return wrapper.run(q_nhd, k_nhd, v_nhd)
    return run, run()[:s].transpose(0, 1)[None]


def cuda_mma(path: str):
    """FGATTN_CUDA_MMA=path while the block runs (the CUDA variant's matrix path; kernels load per path)."""
    return mock.patch.dict(os.environ, {"FGATTN_CUDA_MMA": path})


def median_ms(fn, rep_ms: float = 300) -> float:
    return triton.testing.do_bench(fn, warmup=min(50, rep_ms), rep=rep_ms, return_mode="median")


def check(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"{what}: relative L2 error {err:.3g} vs reference")
    return err


def bench_shape(shape, densities, variants, dtype, peers, rows, log, mma_paths=("auto",), *, masks=("local",),
                flex=True, flash=True, block_m=128, rep_ms=300.0, failed_builds=None, deadline=None):
    b, h, s, d = shape
    if deadline is not None and time.monotonic() > deadline:
        log(f"{shape}: SKIPPED (time budget spent)")
        return
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=tdtype, generator=gen) for _ in range(3))
    full = 4.0 * b * h * s * s * d
    entry = dict(shape=[b, h, s, s, d], dtype=dtype)
    failed_builds = failed_builds or {}

    def record(impl, density, ms, **extra):
        row = dict(impl=impl, **entry, density=density, ms=ms, tflops=full * density / ms * 1e-9, **extra)
        rows.append(row)
        log(f"{impl:14s} {str(shape):22s} d={density:<4} {ms:8.3f} ms {row['tflops']:6.0f} TFLOP/s {extra}")
        return row

    dense, dense_ms = {}, {}
    for backend in ("cudnn", "flash") if flash else ("cudnn",):
        dense[backend] = sdpa(q, k, v, backend)
        dense_ms[backend] = record(f"sdpa-{backend}", 1.0, median_ms(lambda: sdpa(q, k, v, backend), rep_ms))["ms"]
    cudnn_ms = dense_ms["cudnn"]
    nq, nk128 = triton.cdiv(s, 128), triton.cdiv(s, 128)
    for density in densities:
        if deadline is not None and time.monotonic() > deadline:
            log(f"{shape} d={density}: SKIPPED (time budget spent)")
            continue
        if flex:
            m128 = local_block_mask(b, h, nq, nk128, density, seed=1, device="cuda")
            bm = flex_block_mask(m128, s, s)
            record("flex-block128", density, median_ms(lambda: flex_block(q, k, v, bm), rep_ms))

        for kind in masks if density < 1.0 else masks[:1]:  # density 1: one full KeySet whatever the family
            keys = make_keyset(kind, b, h, s, density, block_m)
            real_density = keys.density()

            def rel_err(out, bits, what):
                if density == 1.0:
                    return check(out, dense["cudnn"], what)
                rows_q = 1024  # reference on a slice: 2 heads x 1024 queries x all keys
                sub = KeySet(bits[:, :2, : rows_q // block_m].contiguous(), keys.n_kblocks, block_m, BLOCK_N)
                ref = reference_attention(q[:, :2, :rows_q], k[:, :2], v[:, :2], sub)
                return check(out[:, :2, :rows_q], ref, what)

            for spec in variants:
                try:
                    variant, workspace = parse_variant(spec, dtype=dtype, head_dim=d, block_m=block_m)
                except ValueError as exc:
                    log(f"{spec}: INVALID for head dim {d}: {exc}")
                    continue
                for path in mma_paths if variant.backend == "cuda" else ("auto",):
                    impl = f"fgattn-{variant.backend}" + ("" if path == "auto" else f"-{path}")
                    if (variant.key, path) in failed_builds:
                        log(f"{impl} {variant.key}: BUILD FAILED {failed_builds[(variant.key, path)]}")
                        continue
                    try:
                        with cuda_mma(path), index_workspace(workspace):
                            err = rel_err(attention(q, k, v, keys, variant=variant), keys.bits, variant.key)
                            ms = median_ms(lambda: attention(q, k, v, keys, variant=variant), rep_ms)
                    except Exception as exc:  # noqa: BLE001 - a failing variant is reported, the run goes on
                        log(f"{impl} {variant.key}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                        continue
                    extra = dict(variant=variant.key, rel_l2=err, key_density=real_density, mask=kind,
                                 rate_vs_cudnn=real_density * cudnn_ms / ms)
                    if workspace is not None:
                        extra["workspace_mb"] = workspace
                    record(impl, density, ms, **extra)
            if "flashinfer" in peers and kind == "local":
                try:
                    run, out = flashinfer_c1(q, k, v, keys.to_mask()[0, 0])
                    shared = keys.bits[:, :1].expand(-1, h, -1, -1)  # its one key set, on every head
                    err = rel_err(out, shared, "flashinfer-c1")
                    ms = median_ms(run, rep_ms)
                except Exception as exc:  # noqa: BLE001 - the peer's failure is reported, the run goes on
                    log(f"flashinfer-c1: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                record("flashinfer-c1", density, ms, rel_l2=err, key_density=keys.to_mask()[0, 0].float().mean().item())
            del keys
    del q, k, v, dense
    torch.cuda.empty_cache()


def schedule_table(rows: list[dict]) -> str:
    """Rate vs sdpa-cudnn per computed score, one column per CUDA variant (schedule), one row per
    (shape, mask, density)."""
    cuda_rows = [r for r in rows if "rate_vs_cudnn" in r]
    if not cuda_rows:
        return ""
    labels = list(dict.fromkeys(_label(r) for r in cuda_rows))
    lines = ["| shape [B,H,Sq,Sk,D] | mask | density | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    cells: dict[tuple, dict[str, float]] = {}
    for r in cuda_rows:
        cells.setdefault((tuple(r["shape"]), r["mask"], r["density"]), {})[_label(r)] = r["rate_vs_cudnn"]
    for (shape, mask, density), rates in cells.items():
        lines.append(f"| {list(shape)} | {mask} | {density} | "
                     + " | ".join(f"{rates[l]:.2f}" if l in rates else "-" for l in labels) + " |")
    return "\n".join(lines) + "\n"


def _label(row: dict) -> str:
    """A CUDA row's column: impl, the variant's schedule (raster when none) and its index workspace."""
    variant = Variant.from_key(row["variant"])
    label = "_".join(f"{name[0]}{getattr(variant, name)}" for name in ("order", "persist")
                     if getattr(variant, name)) or "raster"
    if "workspace_mb" in row:
        label += f"@ws{row['workspace_mb']}"
    return f"{row['impl'].removeprefix('fgattn-')} {label}"


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [*header_lines(result),
             "Times are medians (triton.testing.do_bench). fgattn-* include KeySet compaction; "
             "best measured variant per row. Speedup = sdpa-cudnn time / time; TFLOP/s on computed elements.", "",
             "| shape [B,H,Sq,Sk,D] | density | impl | ms | TFLOP/s | speedup vs sdpa-cudnn | variant |",
             "|---|---|---|---|---|---|---|"]
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    for shape in shapes:
        srows = [r for r in rows if r["shape"] == shape]
        cudnn = next(r["ms"] for r in srows if r["impl"] == "sdpa-cudnn")
        best = {}
        for r in srows:
            key = (r["impl"], r["density"], r.get("mask", "local"))
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
        for r in sorted(best.values(), key=lambda r: (-r["density"], r.get("mask", "local"), r["impl"])):
            impl = r["impl"] + ("" if r.get("mask", "local") == "local" else f" ({r['mask']})")
            lines.append(f"| {shape} | {r['density']} | {impl} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                         f"{cudnn / r['ms']:.2f}x | {r.get('variant', '')} |")
    schedules = schedule_table(rows)
    if schedules:
        lines += ["", "Rate vs sdpa-cudnn per computed score ((key density / ms) / (1 / sdpa-cudnn ms)), per CUDA "
                  "variant (schedule suffix, raster when none; @ws: index workspace MB):", "", schedules]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--preset", choices=["issue15"], default=None,
                        help="issue15: the shapes, densities, masks and CUDA schedules of issue 15, sdpa-cudnn the "
                             "only peer (sets --shapes --densities --masks --variants --no-flex --no-flash, "
                             "--rep-ms 100); --quick: a subset")
    parser.add_argument("--quick", action="store_true", help="with --preset: 2 shapes, 3 densities, 4 variants")
    parser.add_argument("--shapes", nargs="+", default=["1,24,32760,128", "1,48,17550,64"])
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.3, 0.1])
    parser.add_argument("--variants", nargs="+", default=["bm128_bn64_w8_s3"])
    parser.add_argument("--masks", nargs="+", default=["local"], choices=MASKS,
                        help="M x 1 mask families: local (spatial, every block the same count), uniform, uneven")
    parser.add_argument("--block-m", type=int, default=128, help="KeySet query block (64 needs bm64 variants)")
    parser.add_argument("--no-flex", action="store_true", help="no flex-block128 rows")
    parser.add_argument("--no-flash", action="store_true", help="no sdpa-flash rows")
    parser.add_argument("--rep-ms", type=float, default=300.0, help="do_bench repetition time per measurement")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new (shape, density) after this many seconds (--preset issue15: 480)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--peers", nargs="*", default=[], choices=["flashinfer"],
                        help="peer kernels besides SDPA and FlexAttention (flashinfer: flashinfer-c1 rows)")
    parser.add_argument("--cuda-mma", nargs="+", default=["auto"], choices=MMA_PATHS,
                        help="matrix paths of the cuda_ variants (FGATTN_CUDA_MMA): " + ", ".join(MMA_PATHS))
    args = parser.parse_args(argv)
    if args.preset == "issue15":
        preset = ISSUE15_QUICK if args.quick else ISSUE15
        args.shapes, args.densities, args.masks, args.variants = (preset["shapes"], preset["densities"],
                                                                  preset["masks"], preset["variants"])
        args.no_flex = args.no_flash = True
        args.rep_ms = min(args.rep_ms, 100.0)
        args.budget_s = 480.0 if args.budget_s is None else args.budget_s
    elif args.quick:
        parser.error("--quick needs --preset")
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    head_dims = sorted({int(spec.split(",")[3]) for spec in args.shapes})
    variants = []
    for spec in args.variants:
        for d in head_dims:
            try:
                variants.append(parse_variant(spec, dtype=args.dtype, head_dim=d, block_m=args.block_m)[0])
            except ValueError as exc:  # reported again in each shape's place
                log(f"{spec}: INVALID for head dim {d}: {exc}")
    failed = precompile(variants, args.cuda_mma)
    for (key, path), error in failed.items():
        log(f"build of {key} ({path}) FAILED: {error}")
    rows: list[dict] = []
    for spec in args.shapes:
        bench_shape(tuple(int(x) for x in spec.split(",")), args.densities, args.variants, args.dtype, args.peers,
                    rows, log, args.cuda_mma, masks=args.masks, flex=not args.no_flex, flash=not args.no_flash,
                    block_m=args.block_m, rep_ms=args.rep_ms, failed_builds=failed, deadline=deadline)
    result = dict(
        name=args.name, **run_info(cpu=False), rows=rows,
    )
    write_results(args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
