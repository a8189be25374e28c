"""The CUDA kernel's work schedule (variant fields ``order`` and ``persist``; templates/cuda/include/fgattn/
schedule.cuh, ``compaction.work_order``).

CPU: the keys, the validity rules, the work order against an independent sort on uneven counts (odd
sequence lengths, several query tiles per block), the launch grid. The nvcc builds of every schedule are in
tests/test_cuda_variant.py. GPU (``gpu`` marker, every matrix path of ``FGATTN_CUDA_MMA``): each schedule
against the fp32 reference on odd sizes, empty blocks, uneven masks (dense blocks beside very sparse ones),
more tiles than SMs (a persistent CTA loops), head chunks, the query permutation path and CUDA graphs, with
poisoned outputs; each schedule's output equals the raster schedule's bit for bit (a tile is computed the
same wherever it runs).
"""

import math

import pytest
import torch

from conftest import ceil_div, make_block_mask, make_qkv
from test_cuda_variant import _check, mma_path  # noqa: F401 - mma_path is a fixture used by name
from fgattn_gen import KeySet, Variant, attention, compaction, render
from fgattn_gen.backends.cuda import launch as cuda_backend
from fgattn_gen.variant import ORDERS, PERSIST

BF16, FP16 = torch.bfloat16, torch.float16
SCHEDULES = [(order, persist) for persist in PERSIST for order in ORDERS]
SCHEDULE_IDS = [f"o{o}p{p}" for o, p in SCHEDULES]


def _variant(order: int, persist: int, *, head_dim=128, block_m=128, tile_m=128, tile_n=128, stages=2,
             dtype="bf16", block_n=1) -> Variant:
    return Variant(backend="cuda", dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n, tile_m=tile_m,
                   tile_n=tile_n, num_warps=tile_m // 16, num_stages=stages, order=order, persist=persist)


def test_keys_name_the_schedule_only_when_not_default():
    assert _variant(0, 0).key == "cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s2"
    for order, persist in SCHEDULES:
        variant = _variant(order, persist)
        assert Variant.from_key(variant.key) == variant
        assert ("_o" in variant.key) == bool(order) and ("_p" in variant.key) == bool(persist)
    assert _variant(2, 1).key.endswith("_s2_o2_p1")


@pytest.mark.parametrize("key, why", [
    ("triton_bf16_d128_qb128_kg1_bm128_bn64_w8_s3_o1", r"order must be one of \(0,\) for the triton backend"),
    ("triton_bf16_d128_qb128_kg1_bm128_bn64_w8_s3_p1", r"persist must be one of \(0,\) for the triton backend"),
    ("cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s2_o3", r"order must be one of \(0, 1, 2\)"),
    ("cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s2_p2", r"persist must be one of \(0, 1\)"),
])
def test_schedule_rules(key, why):
    with pytest.raises(ValueError, match=why):
        Variant.from_key(key)
    with pytest.raises(ValueError, match="does not look like"):
        Variant.from_key("cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s2_o0")  # the default is never spelled


def test_render_pins_the_schedule():
    source = render.render(_variant(2, 1))
    assert "kOrder = 2;" in source and "kPersist = 1;" in source
    source = render.render(_variant(0, 0))
    assert "kOrder = 0;" in source and "kPersist = 0;" in source


def _uneven_counts(gen, n_bh, n_qblocks, seq_k):
    """Key counts per query block: log-uniform over three decades, a few dense and a few empty blocks."""
    counts = torch.exp(torch.rand(n_bh, n_qblocks, generator=gen) * math.log(1000.0)) * seq_k / 1000
    counts = counts.round().to(torch.int32)
    counts[torch.rand(n_bh, n_qblocks, generator=gen) < 0.1] = seq_k
    counts[torch.rand(n_bh, n_qblocks, generator=gen) < 0.1] = 0
    return counts


def _expected_order(counts, seq_q, block_m, tile_m, order):
    """The work order by a plain Python sort: (bucket of the tile's key count descending, tile index)."""
    n_bh = counts.shape[0]
    n_mtiles = ceil_div(seq_q, tile_m)
    weight = {}
    for bh in range(n_bh):
        for m in range(n_mtiles):
            keys = int(counts[bh, m * tile_m // block_m])
            weight[bh * n_mtiles + m] = math.floor(math.log2(keys + 1) * compaction.WORK_ORDER_BUCKETS_PER_OCTAVE)
    if order == 1:
        return [g for bh in range(n_bh)
                for g in sorted(range(bh * n_mtiles, (bh + 1) * n_mtiles), key=lambda g: (-weight[g], g))]
    return sorted(weight, key=lambda g: (-weight[g], g))


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("seq_q, block_m, tile_m", [(1000, 128, 128), (1999, 64, 64), (3001, 256, 128),
                                                    (300, 256, 128), (1, 128, 64)])
def test_work_order_is_heavy_first(gen, order, seq_q, block_m, tile_m):
    n_bh, n_qblocks = 5, ceil_div(seq_q, block_m)
    counts = _uneven_counts(gen, n_bh, n_qblocks, 4001)
    perm = compaction.work_order(counts, seq_q=seq_q, block_m=block_m, tile_m=tile_m, order=order)
    n_mtiles = ceil_div(seq_q, tile_m)
    assert perm.dtype == torch.int32 and perm.shape == (n_bh * n_mtiles,)
    assert sorted(perm.tolist()) == list(range(n_bh * n_mtiles))  # a permutation of the launch's tiles
    assert perm.tolist() == _expected_order(counts, seq_q, block_m, tile_m, order)
    tile_keys = counts.repeat_interleave(block_m // tile_m, dim=1)[:, :n_mtiles].flatten()[perm.long()]
    if order == 1:  # heads stay in raster order, each contiguous
        assert (perm.long() // n_mtiles).tolist() == sorted((perm.long() // n_mtiles).tolist())
    if n_mtiles * n_bh > 20:
        assert tile_keys[:5].float().mean() > tile_keys[-5:].float().mean()


def test_work_order_keeps_raster_order_for_even_counts():
    """Counts within one quarter octave (a uniform mask) keep the raster order: heads stay together."""
    counts = torch.full((3, 40), 1000, dtype=torch.int32) + torch.arange(40, dtype=torch.int32) % 7
    for order in (1, 2):
        perm = compaction.work_order(counts, seq_q=40 * 128, block_m=128, tile_m=128, order=order)
        assert perm.tolist() == list(range(120))


def test_work_order_bad_input():
    counts = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^order: expected 1"):
        compaction.work_order(counts, seq_q=1024, block_m=128, tile_m=128, order=0)
    with pytest.raises(ValueError, match=r"^tile_m: must divide block_m"):
        compaction.work_order(counts, seq_q=1024, block_m=128, tile_m=96, order=1)
    with pytest.raises(ValueError, match=r"^n_keys: expected 9 query blocks"):
        compaction.work_order(counts, seq_q=1100, block_m=128, tile_m=128, order=1)


def test_grid():
    assert cuda_backend.grid(_variant(0, 0), 931, 2, 132) == (931, 2, 1)
    assert cuda_backend.grid(_variant(2, 0), 931, 2, 132) == (931, 2, 1)
    assert cuda_backend.grid(_variant(0, 1), 931, 2, 132) == (132, 1, 1)
    assert cuda_backend.grid(_variant(1, 1), 8, 3, 132) == (24, 1, 1)  # never an idle CTA


# ---------------------------------------------------------------------------------------------- GPU


def _uneven_mask(gen, b, h, n_qblocks, n_kblocks, density, device="cuda"):
    """Per query block a density drawn log-uniformly in [density / 30, min(1, 3 density)], every 7th block
    dense and every 5th empty: dense fallback blocks beside very sparse ones."""
    lo, hi = math.log(density / 30), math.log(min(1.0, 3 * density))
    rows = torch.exp(lo + (hi - lo) * torch.rand(b, h, n_qblocks, 1, generator=gen))
    mask = torch.rand(b, h, n_qblocks, n_kblocks, generator=gen) < rows
    mask[:, :, ::7] = True
    mask[:, :, 2::5] = False
    return mask.to(device)


def _run_all(q, k, v, keys, variants, **kw):
    return {v.key: attention(q, k, v, keys, variant=v, return_lse=True, **kw) for v in variants}


def _same_as_raster(results, raster_key):
    out0, lse0 = results[raster_key]
    for key, (out, lse) in results.items():
        assert torch.equal(out, out0) and torch.equal(lse, lse0), f"{key} differs from {raster_key}"


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("order, persist", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("sq, sk, block_m, tile_m, block_n", [(1999, 333, 64, 64, 3), (3001, 2777, 256, 128, 1),
                                                               (70, 5, 64, 64, 1), (1, 1, 128, 128, 1)])
def test_schedule_odd_sizes_and_empty_blocks(gen, poisoned, order, persist, sq, sk, block_m, tile_m, block_n):
    q, k, v = make_qkv(gen, 2, 3, sq, sk, 128, BF16, "cuda")
    mask = make_block_mask(gen, 2, 3, ceil_div(sq, block_m), ceil_div(sk, block_n), "some_empty", density=0.4,
                           device="cuda")
    mask[0, 0, 0, -1] = True  # the ragged last key block
    keys = KeySet.from_mask(mask, block_m=block_m, block_n=block_n)
    variant = _variant(order, persist, block_m=block_m, tile_m=tile_m, block_n=block_n)
    out, lse = attention(q, k, v, keys, variant=variant, return_lse=True, scale=0.11)
    _check(q, k, v, keys, mask, out, lse, scale=0.11, flex=False)


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("head_dim, dtype, tile_m, tile_n, stages", [(128, BF16, 128, 128, 2), (64, FP16, 64, 64, 3),
                                                                     (128, FP16, 64, 32, 4)])
def test_schedules_on_uneven_masks(gen, poisoned, head_dim, dtype, tile_m, tile_n, stages):
    """More tiles than SMs (282 at 64 rows, so a persistent CTA computes two or three), uneven key counts:
    every schedule matches the reference and the raster schedule bit for bit."""
    sq, sk = 3001, 2999
    q, k, v = make_qkv(gen, 2, 3, sq, sk, head_dim, dtype, "cuda")
    mask = _uneven_mask(gen, 2, 3, ceil_div(sq, tile_m), sk, 0.05)
    keys = KeySet.from_mask(mask, block_m=tile_m, block_n=1)
    name = "bf16" if dtype is BF16 else "fp16"
    variants = [_variant(o, p, head_dim=head_dim, block_m=keys.block_m, tile_m=tile_m, tile_n=tile_n, stages=stages,
                         dtype=name) for o, p in SCHEDULES]
    results = _run_all(q, k, v, keys, variants)
    out, lse = results[variants[0].key]
    _check(q, k, v, keys, mask, out, lse, flex=False)
    _same_as_raster(results, variants[0].key)


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
def test_schedules_over_head_chunks(gen, poisoned, monkeypatch):
    """A 1 MB index workspace runs 6 heads in chunks of 2 (bh_start > 0; each chunk has its own order)."""
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "1")
    q, k, v = make_qkv(gen, 2, 3, 2001, 2777, 64, FP16, "cuda")
    mask = _uneven_mask(gen, 2, 3, ceil_div(2001, 64), 2777, 0.1)
    keys = KeySet.from_mask(mask, block_m=64, block_n=1)
    assert compaction.heads_per_chunk(keys) == 2
    variants = [_variant(o, p, head_dim=64, block_m=64, tile_m=64, tile_n=64, dtype="fp16") for o, p in SCHEDULES]
    results = _run_all(q, k, v, keys, variants)
    out, lse = results[variants[0].key]
    _check(q, k, v, keys, mask, out, lse, flex=False)
    _same_as_raster(results, variants[0].key)


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("order, persist", SCHEDULES, ids=SCHEDULE_IDS)
def test_schedule_with_query_order(gen, poisoned, order, persist):
    """The query permutation path (KeySet.query_order: rows gathered, attended, scattered back)."""
    from fgattn_gen import reference_attention
    from conftest import LSE_TOL, TOL

    sq, sk = 1500, 1777
    q, k, v = make_qkv(gen, 1, 4, sq, sk, 128, BF16, "cuda")
    mask = _uneven_mask(gen, 1, 4, ceil_div(sq, 128), sk, 0.1)
    plain = KeySet.from_mask(mask, block_m=128)
    perm = torch.stack([torch.randperm(sq, generator=gen) for _ in range(4)]).view(1, 4, sq).to("cuda")
    keys = KeySet(plain.bits, plain.n_kblocks, 128, 1, query_order=perm)
    out, lse = attention(q, k, v, keys, variant=_variant(order, persist), return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, keys, return_lse=True)
    torch.testing.assert_close(out.float(), ref, atol=TOL[BF16][0], rtol=TOL[BF16][1])
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=LSE_TOL[0], rtol=LSE_TOL[1])
    assert (lse[~finite] == float("-inf")).all() and (out[~finite] == 0).all()


@pytest.mark.gpu
@pytest.mark.usefixtures("mma_path")
@pytest.mark.parametrize("order, persist", [(2, 0), (1, 1)], ids=["o2p0", "o1p1"])
def test_schedule_graph_capture(gen, order, persist):
    """The work order is computed on the device (no host sync): the call captures in a CUDA graph, and a
    replay with another mask's bits follows the new counts."""
    from fgattn_gen import reference_attention
    from conftest import TOL

    q, k, v = make_qkv(gen, 1, 2, 1000, 777, 128, BF16, "cuda")
    masks = [_uneven_mask(gen, 1, 2, ceil_div(1000, 128), 777, d) for d in (0.05, 0.3)]
    keys = KeySet.from_mask(masks[0], block_m=128)
    variant = _variant(order, persist)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and loads the kernels outside the capture
        for _ in range(2):
            attention(q, k, v, keys, variant=variant)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = attention(q, k, v, keys, variant=variant)
    for mask in masks[::-1]:
        keys.bits.copy_(KeySet.from_mask(mask, block_m=128).bits)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_attention(q, k, v, KeySet.from_mask(mask, block_m=128))
        torch.testing.assert_close(static_out.float(), ref, atol=TOL[BF16][0], rtol=TOL[BF16][1])
