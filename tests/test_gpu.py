"""GPU tests at a few thousand tokens (compiled Triton kernels): attention() against the fp32
reference and against torch's flex_attention given the same element mask, plus CUDA-graph capture.

All tests are marked ``gpu`` and skipped without CUDA (see conftest.py). Nothing here touches CUDA at
import time, so the module imports on any machine.
"""

import pytest
import torch

from conftest import (LSE_TOL, TOL, assert_compaction_matches, ceil_div, empty_query_rows, make_block_mask,
                      make_qkv)
from fgattn_gen import KeySet, Variant, attention, compaction, reference_attention

pytestmark = pytest.mark.gpu

BF16, FP16 = torch.bfloat16, torch.float16
B, H, SQ, SK = 1, 4, 3001, 2777
# fgattn against flex_attention: flex returns the input dtype (eager flex upcasts to fp32 inside,
# compiled flex computes in the input dtype), so both sides carry bf16/fp16-level error; use the bf16
# tolerance for either dtype. Flex runs eagerly here (no torch.compile: a compile per shape is too slow).
FLEX_TOL = TOL[BF16]


def flex_reference(q, k, v, mask: torch.Tensor, block_m: int, block_n: int, scale: float) -> torch.Tensor:
    """flex_attention with the element mask ``mask[b, h, q // block_m, kv // block_n]``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    nq, nk = mask.shape[-2:]

    def mask_mod(b, h, q_idx, kv_idx):
        # clamp: flex may evaluate mask_mod on padded indices past Sq / Sk; those are masked by flex anyway
        return mask[b, h, torch.clamp(q_idx // block_m, max=nq - 1), torch.clamp(kv_idx // block_n, max=nk - 1)]

    b, h, sq, _ = q.shape
    block_mask = create_block_mask(mask_mod, b, h, sq, k.shape[2], device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def compare_all(q, k, v, keys, mask, out, lse, *, scale=None, with_flex=True):
    b, h, sq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "NaN in the output"
    assert not lse.isnan().any(), "NaN in the LSE"
    ref, ref_lse = reference_attention(q, k, v, keys, scale=scale, return_lse=True)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol, msg=lambda m: f"fgattn vs reference: {m}")
    torch.testing.assert_close(lse, ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1],
                               msg=lambda m: f"fgattn LSE vs reference: {m}")
    empty = empty_query_rows(mask, keys.block_m, sq)
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    if not with_flex:
        return
    has_keys = ~empty  # flex gives its own values for fully masked rows: compare the rest only
    flex = flex_reference(q, k, v, mask, keys.block_m, keys.block_n, scale)
    torch.testing.assert_close(flex.float()[has_keys], ref[has_keys], atol=FLEX_TOL[0], rtol=FLEX_TOL[1],
                               msg=lambda m: f"flex vs reference (the test's mask_mod is wrong?): {m}")
    torch.testing.assert_close(out[has_keys].float(), flex[has_keys].float(), atol=FLEX_TOL[0], rtol=FLEX_TOL[1],
                               msg=lambda m: f"fgattn vs flex_attention: {m}")


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("block_m, block_n", [(128, 1), (64, 16), (128, 16), (64, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_against_reference_and_flex(gen, poisoned, dtype, head_dim, block_m, block_n, density):
    q, k, v = make_qkv(gen, B, H, SQ, SK, head_dim, dtype, "cuda")
    mask = make_block_mask(gen, B, H, ceil_div(SQ, block_m), ceil_div(SK, block_n), "some_empty",
                           density=density, device="cuda")
    keys = KeySet.from_mask(mask, block_m=block_m, block_n=block_n)
    out, lse = attention(q, k, v, keys, return_lse=True)
    compare_all(q, k, v, keys, mask, out, lse)


@pytest.mark.parametrize("kind", ["band", "first_last", "full", "empty"])
@pytest.mark.parametrize("layout", ["bshd", "sliced"])
def test_structured_masks_and_layouts(gen, poisoned, kind, layout):
    q, k, v = make_qkv(gen, 2, 2, SQ, SK, 128, BF16, "cuda", layout=layout)
    mask = make_block_mask(gen, 2, 2, ceil_div(SQ, 128), ceil_div(SK, 3), kind, device="cuda")
    keys = KeySet.from_mask(mask, block_m=128, block_n=3)
    out, lse = attention(q, k, v, keys, return_lse=True, scale=0.2)
    compare_all(q, k, v, keys, mask, out, lse, scale=0.2, with_flex=kind != "empty")
    out_c = attention(q.contiguous(), k.contiguous(), v.contiguous(), keys, scale=0.2)
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


@pytest.mark.parametrize("tile_m, tile_n, num_warps, num_stages", [(16, 32, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2),
                                                                   (32, 16, 4, 1), (128, 32, 8, 4)])
@pytest.mark.parametrize("dtype, head_dim, block_n", [(BF16, 128, 1), (FP16, 64, 16)])
def test_explicit_variants(gen, poisoned, dtype, head_dim, block_n, tile_m, tile_n, num_warps, num_stages):
    variant = Variant(backend="triton", dtype="bf16" if dtype is BF16 else "fp16", head_dim=head_dim,
                      block_m=128, block_n=block_n, tile_m=tile_m, tile_n=tile_n, num_warps=num_warps,
                      num_stages=num_stages)
    q, k, v = make_qkv(gen, 1, 2, 1500, 1999, head_dim, dtype, "cuda", layout="bshd")
    mask = make_block_mask(gen, 1, 2, ceil_div(1500, 128), ceil_div(1999, block_n), "some_empty", density=0.3,
                           device="cuda")
    keys = KeySet.from_mask(mask, block_m=128, block_n=block_n)
    out, lse = attention(q, k, v, keys, variant=variant, return_lse=True)
    compare_all(q, k, v, keys, mask, out, lse, with_flex=False)


def test_head_chunks(gen, poisoned, monkeypatch):
    """A 1 MB index workspace runs the 4 heads in chunks of 2; the result must not change."""
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "1")
    q, k, v = make_qkv(gen, B, H, SQ, SK, 64, FP16, "cuda")
    mask = make_block_mask(gen, B, H, ceil_div(SQ, 64), SK, "some_empty", density=0.3, device="cuda")
    keys = KeySet.from_mask(mask, block_m=64, block_n=1)  # 47 x 2777 x 4 B = 522 kB per head
    assert compaction.heads_per_chunk(keys) == 2
    out, lse = attention(q, k, v, keys, return_lse=True)
    compare_all(q, k, v, keys, mask, out, lse, with_flex=False)


@pytest.mark.parametrize("seq_k, block_n", [(100000, 1), (20000, 3), (2777, 1), (2777, 16), (33, 1), (1, 1)])
@pytest.mark.parametrize("kind", ["random", "some_empty", "full", "first_last"])
def test_compaction_on_gpu(gen, kind, seq_k, block_n):
    """The GPU compaction (CUDA kernel, one warp per row) against a torch version."""
    nk = ceil_div(seq_k, block_n)
    mask = make_block_mask(gen, 2, 2, 6, nk, kind, density=0.3, device="cuda")
    keys = KeySet.from_mask(mask, block_m=128, block_n=block_n)
    for bh_start, n_bh in [(0, 4), (1, 3), (3, 1)]:
        idx, n_keys = compaction.compact(keys, bh_start, n_bh, seq_k)
        assert idx.device.type == "cuda" and idx.shape == (n_bh, 6, nk)
        assert_compaction_matches(idx, n_keys, mask, block_n, seq_k, bh_start)


def test_keyset_on_gpu_matches_cpu(gen):
    mask = make_block_mask(gen, 2, 3, 24, 2777, "random", density=0.3)
    keys_gpu = KeySet.from_mask(mask.cuda(), block_m=128)
    keys_cpu = KeySet.from_mask(mask, block_m=128)
    assert torch.equal(keys_gpu.bits.cpu(), keys_cpu.bits)
    assert torch.equal(keys_gpu.to_mask().cpu(), mask)
    assert torch.equal(keys_gpu.counts().cpu(), mask.sum(-1, dtype=torch.int32))
    assert keys_gpu.density() == keys_cpu.density()


def test_device_mismatch_gpu(gen):
    q, k, v = make_qkv(gen, 1, 2, 100, 90, 64, BF16, "cuda")
    keys = KeySet.full(1, 2, 100, 90, block_m=16)
    with pytest.raises(ValueError, match=r"^keys: KeySet is on cpu but q is on cuda"):
        attention(q, k, v, keys)
    with pytest.raises(ValueError, match=r"^k: on cpu, but q is on cuda"):
        attention(q, k.cpu(), v, keys.to("cuda"))


@pytest.mark.parametrize("return_lse", [False, True])
def test_cuda_graph_capture(gen, return_lse):
    dtype, head_dim, block_m, block_n = BF16, 128, 128, 1
    q, k, v = make_qkv(gen, B, H, SQ, SK, head_dim, dtype, "cuda")
    mask = make_block_mask(gen, B, H, ceil_div(SQ, block_m), ceil_div(SK, block_n), "some_empty", density=0.3,
                           device="cuda")
    keys = KeySet.from_mask(mask, block_m=block_m, block_n=block_n)
    static_q = q.clone()

    def step():
        return attention(static_q, k, v, keys, return_lse=return_lse)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_result = step()
    static_out, static_lse = static_result if return_lse else (static_result, None)

    for _ in range(2):  # new queries each replay
        new_q = torch.randn(q.shape, generator=gen).to(dtype=dtype, device="cuda")
        static_q.copy_(new_q)
        static_out.fill_(float("nan"))  # poison: the replay must rewrite every element
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_lse = reference_attention(new_q, k, v, keys, return_lse=True)
        assert not static_out.isnan().any()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(static_out.float(), ref, atol=atol, rtol=rtol)
        if return_lse:
            torch.testing.assert_close(static_lse, ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])

    # the layout is read on the device at replay time too: a new mask copied into keys.bits is honoured
    new_mask = make_block_mask(gen, B, H, ceil_div(SQ, block_m), ceil_div(SK, block_n), "band", device="cuda")
    keys.bits.copy_(KeySet.from_mask(new_mask, block_m=block_m, block_n=block_n).bits)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_attention(static_q, k, v, KeySet.from_mask(new_mask, block_m=block_m, block_n=block_n))
    torch.testing.assert_close(static_out.float(), ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
