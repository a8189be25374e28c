"""The CUDA variant (templates/cuda/gather_attention.cu.j2 + include/fgattn/*.cuh).

CPU: every tile point of the default CUDA search space renders (StrictUndefined) and compiles with nvcc for
sm_90a (nothing runs), with the raster schedule, and every schedule (order x persist) of the default
variants; their ptxas reports show no spills, on the warp-specialized (the default on sm_90a), wgmma and
mma.sync paths. GPU (``gpu`` marker, each test on every matrix path of
``FGATTN_CUDA_MMA``: ``-k mma_ws`` selects the warp-specialized one): ``attention(..., backend="cuda")`` against the fp32
reference and FlexAttention at odd sizes, both head dims and dtypes, empty blocks, key granularity 1 and 4,
strided / misaligned layouts, several variants, head chunks and CUDA-graph capture; outputs are poisoned
(NaN) before each run.
"""

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import LSE_TOL, TOL, ceil_div, make_block_mask, make_qkv
from nvcc_tools import find_nvcc, parse_ptxas
from fgattn_gen import KeySet, Variant, attention, compaction, reference_attention
from fgattn_gen.backends.cuda import launch as cuda_backend
from fgattn_gen import render
from fgattn_gen.environment import templates_dir
from fgattn_gen.tune.space import build_space
from fgattn_gen.variant import ORDERS, PERSIST, default_variant

BF16, FP16 = torch.bfloat16, torch.float16


# (dtype, head_dim, block_n): the whole search space for the first two layouts, the default variant for the rest.
SPACE_LAYOUTS = [("bf16", 128, 1), ("bf16", 64, 1)]
DEFAULT_LAYOUTS = [("fp16", 128, 4), ("fp16", 64, 16), ("bf16", 128, 3)]


def _compile_variants() -> list[Variant]:
    """The space's tile points with the raster schedule (the schedule fields only choose which tiles a CTA
    computes: every schedule of the default variants is built by ``_schedule_variants``)."""
    variants = []
    for dtype, head_dim, block_n in SPACE_LAYOUTS:
        variants += [v for v in build_space("cuda", dtype=dtype, head_dim=head_dim, block_m=128, block_n=block_n,
                                            smem_limit=None).candidates if v.order == v.persist == 0]
    for dtype, head_dim, block_n in DEFAULT_LAYOUTS:
        variants.append(default_variant(dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]),
                                        head_dim=head_dim, block_m=128, block_n=block_n, backend="cuda"))
    return variants


# What nvcc builds: the sm_90a cubin (wgmma path), the same with -DFGATTN_MMA_SYNC (mma.sync path) or
# -DFGATTN_WARP_SPECIALIZED (warp-specialized path), or PTX of the wgmma / warp-specialized path.
BUILDS = {"wgmma": ["-cubin"], "sync": ["-cubin", "-DFGATTN_MMA_SYNC"], "ws": ["-cubin", "-DFGATTN_WARP_SPECIALIZED"],
          "ptx": ["-ptx"], "ws_ptx": ["-ptx", "-DFGATTN_WARP_SPECIALIZED"]}


def _nvcc_build(nvcc: str, variant: Variant, build: str, workdir: Path) -> tuple[int, str]:
    """(return code, ptxas report or PTX text / compiler log) of one build of ``variant``."""
    src = workdir / f"{variant.key}.{build}.cu"
    src.write_text(render.render(variant))
    ptx = build.endswith("ptx")
    out = src.with_suffix(".ptx" if ptx else ".cubin")
    arch = "-gencode=arch=compute_90a,code=compute_90a" if ptx else "-gencode=arch=compute_90a,code=sm_90a"
    cmd = [nvcc, *BUILDS[build], arch, "-std=c++17", f"-I{templates_dir() / 'cuda' / 'include'}",
           *(["-Xptxas", "-v"] if not ptx else []), "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if ptx and proc.returncode == 0:
        return 0, out.read_text()
    return proc.returncode, proc.stdout + proc.stderr


def _default_variants() -> list[Variant]:
    return [default_variant(dtype=BF16, head_dim=d, block_m=128, block_n=1, backend="cuda") for d in (64, 128)]


def _schedule_variants() -> list[Variant]:
    """Every schedule but the raster one of the default variants and of a 64-row variant with 3 stages."""
    bases = [*_default_variants(), Variant(backend="cuda", dtype="fp16", head_dim=128, block_m=64, block_n=1, tile_m=64,
                                           tile_n=64, num_warps=4, num_stages=3)]
    return [replace(v, order=order, persist=persist) for v in bases for order in ORDERS for persist in PERSIST
            if order or persist]


@pytest.fixture(scope="module")
def nvcc_reports(tmp_path_factory) -> dict[tuple[str, str], tuple[int, str]]:
    """(variant key, build) -> (nvcc return code, output): every variant of ``_compile_variants`` as an sm_90a
    cubin on the wgmma and warp-specialized paths, the default variants also on the mma.sync path and as PTX
    (wgmma and warp-specialized), ``_schedule_variants`` on all three paths; built in parallel."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, /usr/local/cuda/bin): cannot compile the CUDA variants")
    workdir = tmp_path_factory.mktemp("cuda_variants")
    jobs = [(v, build) for v in _compile_variants() for build in ("wgmma", "ws")]
    jobs += [(v, build) for v in _default_variants() for build in ("sync", "ptx", "ws_ptx")]
    jobs += [(v, build) for v in _schedule_variants() for build in ("ws", "wgmma", "sync")]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        reports = list(pool.map(lambda job: _nvcc_build(nvcc, *job, workdir), jobs))
    return {(v.key, build): r for (v, build), r in zip(jobs, reports)}


def test_search_space_compiles_for_sm90a(nvcc_reports):
    failed = {key: log for key, (rc, log) in nvcc_reports.items() if rc != 0}
    assert not failed, "nvcc failed:\n" + "\n\n".join(f"{k}:\n{log}" for k, log in failed.items())
    assert sum(build == "wgmma" for _, build in nvcc_reports) == len(_compile_variants()) + len(_schedule_variants())
    assert len(_compile_variants()) >= 30
    assert sum(build == "ws" for _, build in nvcc_reports) == len(_compile_variants()) + len(_schedule_variants())


def test_every_schedule_builds_without_spills(nvcc_reports):
    """Persistent CTAs hold their tile loop's state besides the key loop's (the producer has 40 registers)."""
    assert len(_schedule_variants()) == 3 * 5
    for variant in _schedule_variants():
        for build in ("ws", "wgmma", "sync"):
            rc, log = nvcc_reports[(variant.key, build)]
            assert rc == 0, log
            report = parse_ptxas(log)
            assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, (variant.key, build, report)
            assert "C7514" not in log, (variant.key, build)


@pytest.mark.parametrize("build", ["wgmma", "sync", "ws"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_variant_has_no_spills(nvcc_reports, head_dim, build):
    variant = default_variant(dtype=BF16, head_dim=head_dim, block_m=128, block_n=1, backend="cuda")
    rc, log = nvcc_reports[(variant.key, build)]
    assert rc == 0, log
    report = parse_ptxas(log)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0 and report["stack"] == 0, (variant.key, report)
    assert report["registers"] <= 255
    # ptxas C7514: it serialises every wgmma when an accumulator may be read before its wait.
    assert "C7514" not in log, log


def test_ws_search_space_has_no_spills(nvcc_reports):
    """Every warp-specialized build fits its registers (producer 40, consumers 232 with two consumers)."""
    for (key, build), (rc, log) in nvcc_reports.items():
        if build == "ws":
            report = parse_ptxas(log)
            assert report["spill_stores"] == 0 and report["stack"] == 0 and "C7514" not in log, (key, report)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90a_build_multiplies_with_wgmma(nvcc_reports, head_dim):
    """The sm_90a build of the body without warp specialization takes the wgmma path (Q K^T: D/16 k-steps;
    P V: tile_n/16, in the loop, and for the last tile too when >= 3 stages overlap P V with the softmax),
    not mma.sync."""
    variant = default_variant(dtype=BF16, head_dim=head_dim, block_m=128, block_n=1, backend="cuda")
    rc, ptx = nvcc_reports[(variant.key, "ptx")]
    assert rc == 0, ptx
    pv_copies = 2 if variant.num_stages >= 3 else 1
    assert ptx.count("wgmma.mma_async") == head_dim // 16 + pv_copies * (variant.tile_n // 16)
    assert "mma.sync" not in ptx


@pytest.mark.parametrize("head_dim", [64, 128])
def test_ws_build_is_warp_specialized(nvcc_reports, head_dim):
    """The warp-specialized build: wgmma (Q K^T in the first tile's step and the later ones', P V in the
    later ones' and for the last tile), cp.async completing on mbarriers, setmaxnreg moving registers from
    the producer (40) to the two consumers (232), named barriers ordering the consumers."""
    variant = default_variant(dtype=BF16, head_dim=head_dim, block_m=128, block_n=1, backend="cuda")
    rc, ptx = nvcc_reports[(variant.key, "ws_ptx")]
    assert rc == 0, ptx
    assert ptx.count("wgmma.mma_async") == 2 * (head_dim // 16) + 2 * (variant.tile_n // 16)
    assert "mma.sync" not in ptx
    for instr in ("cp.async.cg.shared.global", "cp.async.mbarrier.arrive.noinc.shared::cta.b64",
                  "mbarrier.try_wait.parity.shared::cta.b64", "mbarrier.arrive.shared::cta.b64",
                  "mbarrier.init.shared::cta.b64", "fence.proxy.async.shared::cta", "bar.arrive"):
        assert instr in ptx, instr
    assert "setmaxnreg.dec.sync.aligned.u32 40;" in ptx and "setmaxnreg.inc.sync.aligned.u32 232;" in ptx


def test_ws_launch_shape_matches_kernel():
    """The launcher's threads and shared memory for the warp-specialized kernel are the kernel's."""
    header = (templates_dir() / "cuda" / "include" / "fgattn" / "gather_attention_ws.cuh").read_text()
    extra = int(re.search(r"constexpr int kWsExtraBytes = (\d+);", header).group(1))
    assert extra == cuda_backend.WS_EXTRA_SMEM_BYTES
    variant = default_variant(dtype=BF16, head_dim=128, block_m=128, block_n=1, backend="cuda")
    assert cuda_backend.launch_shape(variant, ()) == (256, variant.smem_bytes())
    assert cuda_backend.launch_shape(variant, ("-DFGATTN_WARP_SPECIALIZED",)) == (384, variant.smem_bytes() + extra)


def test_mma_path_choice(monkeypatch):
    ws, sync = ("-DFGATTN_WARP_SPECIALIZED",), ("-DFGATTN_MMA_SYNC",)
    for path, arch, options in [("auto", "sm_90a", ws), ("auto", "sm_80", sync), ("auto", "sm_89", sync),
                                ("ws", "sm_90a", ws), ("wgmma", "sm_90a", ()), ("sync", "sm_90a", sync)]:
        monkeypatch.setenv("FGATTN_CUDA_MMA", path)
        assert cuda_backend.mma_options(arch) == options
    for path in ("ws", "wgmma"):
        monkeypatch.setenv("FGATTN_CUDA_MMA", path)
        with pytest.raises(ValueError, match=rf"^FGATTN_CUDA_MMA: '{path}' needs sm_90a"):
            cuda_backend.mma_options("sm_80")
    monkeypatch.setenv("FGATTN_CUDA_MMA", "tma")
    with pytest.raises(ValueError, match=r"^FGATTN_CUDA_MMA: expected one of"):
        cuda_backend.mma_options("sm_90a")


def test_nvrtc_builds_default_variants(tmp_path, monkeypatch):
    """The runtime build path (NVRTC, named headers, disk cache), where libnvrtc is loadable."""
    from fgattn_gen import nvrtc

    try:
        nvrtc.nvrtc_version()
    except Exception as e:  # noqa: BLE001 - any loader failure means no NVRTC on this machine
        pytest.skip(f"NVRTC is not loadable here ({type(e).__name__})")
    monkeypatch.setenv("FGATTN_CACHE_DIR", str(tmp_path))
    for options in ((), ("-DFGATTN_WARP_SPECIALIZED",)):
        for variant in _default_variants():
            cubin = nvrtc.compile_cubin(render.render(variant), variant.key, "sm_90a", options=options,
                                        headers=render.cuda_headers())
            assert cubin[:4] == b"\x7fELF"
            again = nvrtc.compile_cubin(render.render(variant), variant.key, "sm_90a", options=options,
                                        headers=render.cuda_headers())
            assert again == cubin
    for variant in _default_variants():  # one cache entry per matrix path
        assert len(list((tmp_path / "cuda").glob(f"{variant.key}-*.cubin"))) == 2


def test_render_pins_every_parameter():
    variant = default_variant(dtype=FP16, head_dim=64, block_m=256, block_n=4, backend="cuda")
    source = render.render(variant)
    assert f"// variant: {variant.key}" in source
    for line in ("using T = fgattn::fp16;", "kHeadDim = 64;", "kQueryBlock = 256;", "kKeyGran = 4;",
                 f"kTileM = {variant.tile_m};", "kTileN = 128;", f"kWarps = {variant.num_warps};", "kStages = 2;",
                 f"== {variant.smem_bytes()},"):
        assert line in source
    assert "{{" not in source and "{%" not in source
    names = [name for name, _ in render.cuda_headers()]
    assert {"fgattn/entry.cuh", "fgattn/gather_attention.cuh", "fgattn/gather_attention_ws.cuh",
            "fgattn/mma_sm80.cuh", "fgattn/sync_sm90.cuh"} <= set(names)


def test_cuda_variant_rules():
    assert Variant.from_key("cuda_bf16_d128_qb128_kg1_bm128_bn64_w8_s3").backend == "cuda"
    for key, why in [("cuda_bf16_d128_qb128_kg1_bm128_bn64_w4_s3", "16 \\* num_warps"),
                     ("cuda_bf16_d128_qb128_kg1_bm128_bn256_w8_s3", "tile_n"),
                     ("cuda_bf16_d128_qb128_kg1_bm128_bn64_w8_s1", "num_stages"),
                     ("cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s4", "shared memory")]:
        with pytest.raises(ValueError, match=why):
            Variant.from_key(key)
    assert default_variant(dtype=BF16, head_dim=128, block_m=64, block_n=1, backend="cuda").tile_m == 64
    with pytest.raises(ValueError, match=r"^keys: block_m must be a multiple of 64 for the cuda backend"):
        default_variant(dtype=BF16, head_dim=128, block_m=32, block_n=1, backend="cuda")


def test_cuda_backend_needs_cuda_tensors(gen):
    q, k, v = make_qkv(gen, 1, 1, 50, 40, 64, BF16)
    keys = KeySet.full(1, 1, 50, 40, block_m=64)
    with pytest.raises(ValueError, match=r"^backend: 'cuda' needs CUDA tensors"):
        attention(q, k, v, keys, backend="cuda")
    variant = default_variant(dtype=BF16, head_dim=64, block_m=64, block_n=1, backend="cuda")
    with pytest.raises(ValueError, match=r"^backend: 'cuda' needs CUDA tensors"):
        attention(q, k, v, keys, variant=variant)
    with pytest.raises(ValueError, match=r"^variant: .* does not fit"):
        attention(q, k, v, keys, variant=variant, backend="triton")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.fixture(params=cuda_backend.MMA_PATHS, ids=[f"mma_{p}" for p in cuda_backend.MMA_PATHS])
def mma_path(request, monkeypatch):
    """Runs a GPU test on one matrix path (FGATTN_CUDA_MMA); ws and wgmma need sm_90a."""
    if request.param in ("ws", "wgmma") and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"FGATTN_CUDA_MMA={request.param} needs sm_90a")
    monkeypatch.setenv("FGATTN_CUDA_MMA", request.param)
    return request.param


def _check(q, k, v, keys, mask, out, lse, *, scale=None, flex=True):
    from test_gpu import compare_all

    compare_all(q, k, v, keys, mask, out, lse, scale=scale, with_flex=flex and bool(mask.any()))


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("block_n", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_cuda_against_reference_and_flex(gen, poisoned, dtype, head_dim, block_n, density):
    sq, sk = 1000, 777
    kind = {0.0: "empty", 0.3: "some_empty", 1.0: "full"}[density]
    q, k, v = make_qkv(gen, 1, 3, sq, sk, head_dim, dtype, "cuda")
    mask = make_block_mask(gen, 1, 3, ceil_div(sq, 128), ceil_div(sk, block_n), kind, density=density, device="cuda")
    keys = KeySet.from_mask(mask, block_m=128, block_n=block_n)
    out, lse = attention(q, k, v, keys, backend="cuda", return_lse=True)
    _check(q, k, v, keys, mask, out, lse, flex=density == 0.3 or head_dim == 128)


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("sq, sk, block_m", [(333, 1999, 128), (1999, 333, 64), (1, 1, 128), (70, 5, 64),
                                              (3001, 2777, 256)])
def test_cuda_odd_sizes(gen, poisoned, sq, sk, block_m):
    q, k, v = make_qkv(gen, 2, 2, sq, sk, 128, BF16, "cuda")
    mask = make_block_mask(gen, 2, 2, ceil_div(sq, block_m), ceil_div(sk, 3), "some_empty", density=0.4,
                           device="cuda")
    mask[0, 0, 0, -1] = True  # the ragged last key block
    keys = KeySet.from_mask(mask, block_m=block_m, block_n=3)
    out, lse = attention(q, k, v, keys, backend="cuda", return_lse=True, scale=0.11)
    _check(q, k, v, keys, mask, out, lse, scale=0.11)


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("layout", ["bshd", "sliced", "misaligned"])
def test_cuda_layouts(gen, poisoned, layout):
    sq, sk = 1000, 777
    if layout == "misaligned":  # rows 2-byte aligned only: the launcher copies them (cp.async needs 16 bytes)
        base = torch.randn(1, 2, sq + sk + sk, 129, generator=gen).to(device="cuda", dtype=BF16)
        q, k, v = base[:, :, :sq, 1:], base[:, :, sq:sq + sk, 1:], base[:, :, sq + sk:, 1:]
    else:
        q, k, v = make_qkv(gen, 1, 2, sq, sk, 128, BF16, "cuda", layout=layout)
    mask = make_block_mask(gen, 1, 2, ceil_div(sq, 128), sk, "band", device="cuda")
    keys = KeySet.from_mask(mask, block_m=128, block_n=1)
    out, lse = attention(q, k, v, keys, backend="cuda", return_lse=True)
    _check(q, k, v, keys, mask, out, lse)
    out_c = attention(q.contiguous(), k.contiguous(), v.contiguous(), keys, backend="cuda")
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("tile_m, tile_n, num_stages", [(64, 32, 2), (64, 128, 3), (128, 32, 4), (128, 128, 2),
                                                        (128, 64, 4), (64, 64, 4)])
@pytest.mark.parametrize("dtype, head_dim, block_n", [(BF16, 128, 1), (FP16, 64, 4)])
def test_cuda_explicit_variants(gen, poisoned, dtype, head_dim, block_n, tile_m, tile_n, num_stages):
    variant = Variant(backend="cuda", dtype="bf16" if dtype is BF16 else "fp16", head_dim=head_dim, block_m=128,
                      block_n=block_n, tile_m=tile_m, tile_n=tile_n, num_warps=tile_m // 16, num_stages=num_stages)
    q, k, v = make_qkv(gen, 1, 2, 1500, 1999, head_dim, dtype, "cuda", layout="bshd")
    mask = make_block_mask(gen, 1, 2, ceil_div(1500, 128), ceil_div(1999, block_n), "some_empty", density=0.3,
                           device="cuda")
    keys = KeySet.from_mask(mask, block_m=128, block_n=block_n)
    out, lse = attention(q, k, v, keys, variant=variant, return_lse=True)
    _check(q, k, v, keys, mask, out, lse, flex=False)


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
def test_cuda_head_chunks_and_triton_agree(gen, poisoned, monkeypatch):
    """A 1 MB index workspace runs the 4 heads in chunks of 2; the CUDA and Triton variants agree."""
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "1")
    q, k, v = make_qkv(gen, 1, 4, 3001, 2777, 64, FP16, "cuda")
    mask = make_block_mask(gen, 1, 4, ceil_div(3001, 64), 2777, "some_empty", density=0.3, device="cuda")
    keys = KeySet.from_mask(mask, block_m=64, block_n=1)
    assert compaction.heads_per_chunk(keys) == 2
    out, lse = attention(q, k, v, keys, backend="cuda", return_lse=True)
    _check(q, k, v, keys, mask, out, lse, flex=False)
    out_t, lse_t = attention(q, k, v, keys, backend="triton", return_lse=True)
    torch.testing.assert_close(out, out_t, atol=TOL[FP16][0], rtol=TOL[FP16][1])
    torch.testing.assert_close(lse, lse_t, atol=LSE_TOL[0], rtol=LSE_TOL[1])


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
def test_cuda_graph_capture(gen):
    q, k, v = make_qkv(gen, 1, 2, 1000, 777, 128, BF16, "cuda")
    mask = make_block_mask(gen, 1, 2, ceil_div(1000, 128), 777, "some_empty", density=0.3, device="cuda")
    keys = KeySet.from_mask(mask, block_m=128, block_n=1)
    static_q = q.clone()

    def step():
        return attention(static_q, k, v, keys, backend="cuda", return_lse=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and loads the kernels outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = step()
    for _ in range(2):
        new_q = torch.randn(q.shape, generator=gen).to(dtype=BF16, device="cuda")
        static_q.copy_(new_q)
        static_out.fill_(float("nan"))
        static_lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_lse = reference_attention(new_q, k, v, keys, return_lse=True)
        torch.testing.assert_close(static_out.float(), ref, atol=TOL[BF16][0], rtol=TOL[BF16][1])
        torch.testing.assert_close(static_lse, ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
