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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import triton
import triton.testing

from fgattn_gen import KeySet, Variant, attention, reference_attention
from fgattn_gen.backends.cuda.launch import MMA_PATHS
from fgattn_gen.baselines import flex_block, flex_block_mask, sdpa
from benchlib import header_lines, run_info, write_results
from fgattn_gen.synthetic import local_block_mask

BLOCK_M, BLOCK_N = 128, 1


def parse_variant(spec: str, *, dtype: str, head_dim: int) -> Variant:
    """``"bm128_bn64_w8_s3"`` (Triton) or ``"cuda_bm128_bn128_w8_s3"`` -> Variant for the benchmark's layout."""
    backend, tiles = ("triton", spec) if spec.startswith("bm") else spec.split("_", 1)
    fields = {part.rstrip("0123456789"): int(part[len(part.rstrip("0123456789")):]) for part in tiles.split("_")}
    return Variant(backend=backend, dtype=dtype, head_dim=head_dim, block_m=BLOCK_M, block_n=BLOCK_N,
                   tile_m=fields["bm"], tile_n=fields["bn"], num_warps=fields["w"], num_stages=fields["s"])


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


@contextlib.contextmanager
def cuda_mma(path: str):
    """FGATTN_CUDA_MMA=path while the block runs (the CUDA variant's matrix path; kernels load per path)."""
    old = os.environ.get("FGATTN_CUDA_MMA")
    os.environ["FGATTN_CUDA_MMA"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["FGATTN_CUDA_MMA"]
        else:
            os.environ["FGATTN_CUDA_MMA"] = old


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def check(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"{what}: relative L2 error {err:.3g} vs reference")
    return err


def bench_shape(shape, densities, variants, dtype, peers, rows, log, mma_paths=("auto",)):
    b, h, s, d = shape
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=tdtype, generator=gen) for _ in range(3))
    full = 4.0 * b * h * s * s * d
    entry = dict(shape=[b, h, s, s, d], dtype=dtype)

    def record(impl, density, ms, **extra):
        row = dict(impl=impl, **entry, density=density, ms=ms, tflops=full * density / ms * 1e-9, **extra)
        rows.append(row)
        log(f"{impl:14s} {str(shape):22s} d={density:<4} {ms:8.3f} ms {row['tflops']:6.0f} TFLOP/s {extra}")

    dense = {}
    for backend in ("cudnn", "flash"):
        dense[backend] = sdpa(q, k, v, backend)
        record(f"sdpa-{backend}", 1.0, median_ms(lambda: sdpa(q, k, v, backend)))
    nq, nk128 = triton.cdiv(s, 128), triton.cdiv(s, 128)
    for density in densities:
        m128 = local_block_mask(b, h, nq, nk128, density, seed=1, device="cuda")
        bm = flex_block_mask(m128, s, s)
        record("flex-block128", density, median_ms(lambda: flex_block(q, k, v, bm)))

        mask = local_block_mask(b, h, triton.cdiv(s, BLOCK_M), triton.cdiv(s, BLOCK_N), density, seed=1, device="cuda")
        keys = KeySet.from_mask(mask, block_m=BLOCK_M, block_n=BLOCK_N)
        real_density = keys.density()
        def rel_err(out, bits, what):
            if density == 1.0:
                return check(out, dense["cudnn"], what)
            rows_q = 1024  # reference on a slice: 2 heads x 1024 queries x all keys
            sub = KeySet(bits[:, :2, : rows_q // BLOCK_M].contiguous(), keys.n_kblocks, BLOCK_M, BLOCK_N)
            ref = reference_attention(q[:, :2, :rows_q], k[:, :2], v[:, :2], sub)
            return check(out[:, :2, :rows_q], ref, what)

        for spec in variants:
            variant = parse_variant(spec, dtype=dtype, head_dim=d)
            for path in mma_paths if variant.backend == "cuda" else ("auto",):
                impl = f"fgattn-{variant.backend}" + ("" if path == "auto" else f"-{path}")
                try:
                    with cuda_mma(path):
                        err = rel_err(attention(q, k, v, keys, variant=variant), keys.bits, variant.key)
                        ms = median_ms(lambda: attention(q, k, v, keys, variant=variant))
                except Exception as exc:  # noqa: BLE001 - a failing variant is reported, the run goes on
                    log(f"{impl} {variant.key}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                record(impl, density, ms, variant=variant.key, rel_l2=err, key_density=real_density)
        if "flashinfer" in peers:
            try:
                run, out = flashinfer_c1(q, k, v, mask[0, 0])
                shared = keys.bits[:, :1].expand(-1, h, -1, -1)  # its one key set, on every head
                err = rel_err(out, shared, "flashinfer-c1")
                ms = median_ms(run)
            except Exception as exc:  # noqa: BLE001 - the peer's failure is reported, the run goes on
                log(f"flashinfer-c1: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            record("flashinfer-c1", density, ms, rel_l2=err, key_density=mask[0, 0].float().mean().item())


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
            key = (r["impl"], r["density"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
        for r in sorted(best.values(), key=lambda r: (-r["density"], r["impl"])):
            lines.append(f"| {shape} | {r['density']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                         f"{cudnn / r['ms']:.2f}x | {r.get('variant', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--shapes", nargs="+", default=["1,24,32760,128", "1,48,17550,64"])
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.3, 0.1])
    parser.add_argument("--variants", nargs="+", default=["bm128_bn64_w8_s3"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--peers", nargs="*", default=[], choices=["flashinfer"],
                        help="peer kernels besides SDPA and FlexAttention (flashinfer: flashinfer-c1 rows)")
    parser.add_argument("--cuda-mma", nargs="+", default=["auto"], choices=MMA_PATHS,
                        help="matrix paths of the cuda_ variants (FGATTN_CUDA_MMA): " + ", ".join(MMA_PATHS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for spec in args.shapes:
        bench_shape(tuple(int(x) for x in spec.split(",")), args.densities, args.variants, args.dtype, args.peers, rows,
                    lambda msg: print(msg, flush=True), args.cuda_mma)
    result = dict(
        name=args.name, **run_info(cpu=False), rows=rows,
    )
    write_results(args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
