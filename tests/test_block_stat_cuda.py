"""The hand-written sm_90a kernel of the fp8 statistics pass (``templates/cuda/block_stat_fp8.cu``, mode
"words"): it builds for sm_90a with nvcc (D 64 / 128, no spills, e4m3 wgmma, the launcher's shared-memory
size), its pre-swizzled operands hold the same bytes as the plain ones, and it is selected only where it
applies (CPU). On a Hopper GPU: its words against the Triton fp8 kernel and the slow fp32 rule at odd sizes,
through ``exact_mask``, and with no host sync inside a CUDA graph."""

import math
import shutil
import subprocess

import pytest
import torch

from conftest import HAS_CUDA
from fgattn_gen.predictors import block_stats, exact_mask
from fgattn_gen.predictors.block_stats import block_stat, cuda_stat_smem_bytes
from fgattn_gen.predictors.dense import dense_attention_with_lse
from fgattn_gen.environment import templates_dir
from nvcc_tools import find_nvcc, parse_ptxas

SOURCE = templates_dir() / "cuda" / "block_stat_fp8.cu"


def _hopper() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


# ---------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_kernel_builds_without_spills(tmp_path, d):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, /usr/local/cuda/bin)")
    stages = block_stats.CUDA_STAGES
    defines = [f"-DFGATTN_STAT_HEAD_DIM={d}", f"-DFGATTN_STAT_STAGES={stages}",
               f"-DFGATTN_STAT_EXPECT_SMEM={cuda_stat_smem_bytes(d, stages)}"]
    base = [nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", "-I", str(templates_dir() / "cuda" / "include"),
            *defines]
    done = subprocess.run([*base, "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(SOURCE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = parse_ptxas(done.stderr)
    assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, report
    assert "C7508" not in done.stderr and "C7510" not in done.stderr, done.stderr  # setmaxnreg / wgmma kept
    ptx = subprocess.run([*base, "-ptx", "-o", "-", str(SOURCE)], capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    assert "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3" in ptx.stdout
    assert "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes" in ptx.stdout
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:  # SASS: fp8 tensor-core instructions, no local memory
        sass = subprocess.run([cuobjdump, "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True).stdout
        assert "QGMMA" in sass and "LDL" not in sass and "STL" not in sass


@pytest.mark.parametrize("d", [64, 128])
def test_wgmma_operands_are_the_plain_ones_swizzled(gen, d):
    """Layout "wgmma": padded rows, each row's chunks permuted; un-permuted they are the plain operands. Both
    the torch form and the Triton conversion kernel (interpreter on the CPU, compiled on a GPU)."""
    device = "cuda" if HAS_CUDA else "cpu"
    q = torch.randn(2, 300, d, generator=gen).to(device, torch.bfloat16)
    k = (torch.randn(2, 200, d, generator=gen) + 1).to(device, torch.bfloat16)
    lse = torch.randn(2, 300).to(device)
    mode = block_stats._swizzle_mode("wgmma", d)
    plain = block_stats._fp8_operands(q, k, lse, 0.1)
    sw = block_stats._fp8_operands(q, k, lse, 0.1, layout="wgmma")
    assert sw[0].shape == (2, 512, d) and sw[1].shape == (2, 256, d)
    for got, want in ((sw[0], plain[0]), (sw[1], plain[1])):
        back = block_stats._swizzle_chunks(got, mode)[:, :want.shape[1]]
        assert torch.equal(back.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(sw[2], plain[2]) and torch.equal(sw[3], plain[3])
    mean_k, k_scale = block_stats._key_fp8_scale(k)
    k_plain = block_stats._to_fp8_triton(k, mean_k, k_scale)
    k_sw = block_stats._to_fp8_triton(k, mean_k, k_scale, out_rows=256, swizzle=mode)
    assert torch.equal(block_stats._swizzle_chunks(k_sw, mode)[:, :200].view(torch.uint8), k_plain.view(torch.uint8))
    assert torch.isfinite(block_stats._swizzle_chunks(k_sw, mode)[:, 200:].float()).all()
    q_plain, q_scale, q_dot = block_stats._to_fp8_triton(q, mean_k)
    q_sw, q_scale_sw, q_dot_sw = block_stats._to_fp8_triton(q, mean_k, out_rows=512, swizzle=mode)
    assert torch.equal(block_stats._swizzle_chunks(q_sw, mode)[:, :300].view(torch.uint8), q_plain.view(torch.uint8))
    assert torch.equal(q_scale_sw, q_scale) and torch.equal(q_dot_sw, q_dot)
    assert not q_sw[:, 300:].view(torch.uint8).any()  # padded query rows are zeros


def test_swizzle_is_the_hardware_pattern():
    """Chunk c of row r sits at byte 16 (c ^ (r % 8)) (128-byte swizzle: address bits 4-6 ^= bits 7-9 of
    r * 128 + 16 c) or 16 (c ^ ((r // 2) % 4)) (64-byte swizzle: bits 4-5 ^= bits 7-8 of r * 64 + 16 c)."""
    for d, mode, bits in ((128, 1, 7), (64, 2, 3)):
        rows = 16
        x = torch.arange(rows * d // 16, dtype=torch.uint8).repeat_interleave(16).view(1, rows, d)
        got = block_stats._swizzle_chunks(x.view(torch.float8_e4m3fn), mode).view(torch.uint8)
        for r in range(rows):
            for c in range(d // 16):
                addr = r * d + 16 * c
                phys = addr ^ (((addr >> 7) & bits) << 4)
                assert got[0, phys // d, (phys % d) // 16 * 16] == x[0, r, 16 * c]


def test_kernel_choice(gen):
    device = "cuda" if HAS_CUDA else "cpu"
    q, k = (torch.randn(1, 64, 64, generator=gen).to(device) for _ in range(2))
    lse = torch.zeros(1, 64, device=device)
    args = dict(block_m=128, scale=0.125, mode="words", precision="fp8", threshold=0.01, impl="kernels")
    with pytest.raises(ValueError, match="kernel"):
        block_stat(q, k, lse, kernel="fast", **args)
    if not _hopper():
        with pytest.raises(ValueError, match="Hopper"):
            block_stat(q, k, lse, kernel="cuda", **args)
    applies = block_stats.cuda_kernel_applies(q, block_m=128, mode="words", precision="fp8")
    assert applies == _hopper()
    if not applies:  # "auto" is the Triton kernel (on Hopper the GPU tests below compare the two kernels)
        torch.testing.assert_close(block_stat(q, k, lse, kernel="triton", **args), block_stat(q, k, lse, **args))


# ---------------------------------------------------------------------------------------- GPU (Hopper)
def _bits(words: torch.Tensor) -> torch.Tensor:
    """int32 words [..., W] -> bool [..., 32 W] (bit j of word w = key 32 w + j), padding bits included."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    return ((words[..., None] >> shifts) & 1).bool().flatten(-2)


def _inputs(n, seq_q, seq_k, d, seed, offset=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(n, seq_q, d, device="cuda", generator=g) * 2).bfloat16()  # peaked attention: sparse mask
    k = (torch.randn(n, seq_k, d, device="cuda", generator=g) + offset).bfloat16()
    scale = d ** -0.5
    lse = torch.logsumexp(q.float() @ k.float().transpose(1, 2) * scale, -1)
    return q, k, lse, scale


needs_hopper = pytest.mark.skipif(not _hopper(), reason="the CUDA statistics kernel needs a Hopper GPU (sm_90)")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seq_q, seq_k, t_x_sk", [(1000, 777, 16), (4000, 4000, 16), (129, 33, 4), (256, 64, 16),
                                                  (300, 1, 0.5), (1, 100, 0.5)])
def test_gpu_cuda_words_match_triton_and_slow(d, seq_q, seq_k, t_x_sk):
    """Against the Triton fp8 kernel (same operands: differences only from fp32 summation order at the
    threshold) and the slow fp32 rule: fp8 rounding moves scores by up to ~0.1 here, so every key whose fp32
    statistic is more than 0.5 (natural log) from the threshold must agree, and at most 8 % of all bits may
    differ (2-3 % measured on the larger shapes); padding bits past Sk are zero. Thresholds t_x_sk / Sk keep 5-65 % of the keys of these inputs
    (0.5 / Sk keeps nearly all of them: 128 peaked rows per block)."""
    q, k, lse, scale = _inputs(3, seq_q, seq_k, d, seed=seq_q + seq_k + d, offset=1.0)
    args = dict(block_m=128, scale=scale, mode="words", precision="fp8", threshold=min(1.0, t_x_sk / seq_k),
                impl="kernels")
    cuda = block_stat(q, k, lse, kernel="cuda", **args)
    tri = block_stat(q, k, lse, kernel="triton", **args)
    slow = block_stat(q.float(), k.float(), lse, **{**args, "precision": "exact", "impl": "torch"})
    assert cuda.shape == tri.shape == (3, math.ceil(seq_q / 128), math.ceil(seq_k / 32))
    cb, tb, sb = _bits(cuda), _bits(tri), _bits(slow)
    assert not cb[..., seq_k:].any()
    # fractions, with a few bits of slack on the smallest shapes (a few hundred bits in all)
    assert (cb != tb).sum().item() <= max(1e-3 * cb.numel(), 2)
    log_max = block_stat(q.float(), k.float(), lse, **{**args, "mode": "max", "precision": "exact", "impl": "torch"})
    far = (log_max - math.log(args["threshold"])).abs() > 0.5
    assert torch.equal(cb[..., :seq_k][far], sb[..., :seq_k][far])
    assert (cb[..., :seq_k] != sb[..., :seq_k]).float().mean().item() <= 0.08
    assert 0.0 < cb[..., :seq_k].float().mean() < 1.0 or seq_k == 1
    old = block_stats.CUDA_KEY_SPLITS  # the default splits small heads' keys over CTAs; one CTA per pair:
    block_stats.CUDA_KEY_SPLITS = 1
    try:
        assert torch.equal(block_stat(q, k, lse, kernel="cuda", **args), cuda)
    finally:
        block_stats.CUDA_KEY_SPLITS = old


@pytest.mark.gpu
@needs_hopper
def test_gpu_cuda_words_strided_heads_and_exact_mask():
    """Heads sliced from [B, H, S, D] (strided), and exact_mask's default choice (the CUDA kernel) against
    the Triton kernel through the same call."""
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 1000, 3, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for _ in range(3))  # [B, H, S, D] with the heads interleaved: strided rows
    q = (q.float() * 2).to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    _, keys = exact_mask(q, k, v, score_precision="fp8")
    _, lse = dense_attention_with_lse(q, k, v, 128 ** -0.5)
    for b in range(2):
        want = block_stat(q[b], k[b], lse[b], block_m=128, scale=128 ** -0.5,
                          mode="words", precision="fp8", threshold=0.5 / 1000, impl="kernels", kernel="triton")
        assert (_bits(keys.bits[b]) != _bits(want)).float().mean() <= 2e-3


@pytest.mark.gpu
@needs_hopper
def test_gpu_cuda_words_no_sync_and_graph_capture():
    q, k, lse, scale = _inputs(2, 1000, 777, 128, seed=5)
    args = dict(block_m=128, scale=scale, mode="words", precision="fp8", threshold=0.5 / 777, impl="kernels",
                kernel="cuda")
    want = block_stat(q, k, lse, **args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block_stat(q, k, lse, **args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = block_stat(q, k, lse, **args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
