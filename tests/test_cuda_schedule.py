"""The CUDA kernel's work schedule (variant fields ``order`` and ``persist``; templates/cuda/include/fgattn/
schedule.cuh, ``compaction.work_order``).

CPU: the keys, the validity rules, the work order against an independent sort on uneven counts (odd
sequence lengths, several query tiles per block), the launch grid. The nvcc builds of every schedule are in
tests/test_cuda_variant.py. GPU (``gpu`` marker, sm_90a; both kernel bodies, ``FGATTN_CUDA_MMA`` ws and
wgmma; two tile configurations, built in parallel first): each schedule against the fp32 reference on odd
sizes, empty blocks, uneven masks (dense blocks beside very sparse ones), more tiles than SMs (a persistent
CTA loops), head chunks, the query permutation path and CUDA graphs, with poisoned outputs; each
schedule's output equals the raster schedule's bit for bit (a tile is computed the same wherever it runs).
"""

import math

import pytest
import torch

from conftest import ceil_div, make_block_mask, make_qkv
from test_cuda_variant import _check
from fgattn_gen import KeySet, Variant, attention, compaction, render
from fgattn_gen.backends.cuda import launch as cuda_backend
from fgattn_gen.variant import ORDERS, PERSIST

BF16, FP16 = torch.bfloat16, torch.float16
SCHEDULES = [(order, persist) for persist in PERSIST for order in ORDERS]


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

# Two kernel configurations x every schedule x the two kernel bodies (the schedule code of the mma.sync path
# is the wgmma body's, gather_attention.cuh): C128 the default (two consumer warpgroups, a tile per query
# block), C64 one consumer warpgroup, 3 stages, two tiles per query block of 128.
CONFIGS = {"C128": dict(head_dim=128, dtype="bf16", block_m=128, tile_m=128, tile_n=128, stages=2),
           "C64": dict(head_dim=64, dtype="fp16", block_m=128, tile_m=64, tile_n=64, stages=3)}
GPU_PATHS = ("ws", "wgmma")


@pytest.fixture(params=GPU_PATHS, ids=[f"mma_{p}" for p in GPU_PATHS])
def body(request, monkeypatch):
    """The kernel body (FGATTN_CUDA_MMA): warp-specialized or not; both need sm_90a."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"FGATTN_CUDA_MMA={request.param} needs sm_90a")
    monkeypatch.setenv("FGATTN_CUDA_MMA", request.param)
    return request.param


@pytest.fixture(scope="module")
def built():
    """Every (config, schedule, body) built once, in parallel (NVRTC), before the first GPU test; a build
    error fails the tests that use it, with its message."""
    from concurrent.futures import ThreadPoolExecutor

    device = torch.cuda.current_device()
    jobs = [(_variant(o, p, **cfg), path) for cfg in CONFIGS.values() for o, p in SCHEDULES for path in GPU_PATHS]

    def build(job):
        try:
            cuda_backend.load(job[0], device, job[1])
        except Exception as exc:  # noqa: BLE001 - reported by the test that needs the variant
            return f"{type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        errors = list(pool.map(build, jobs))
    return {(v.key, path): e for (v, path), e in zip(jobs, errors) if e}


def _variants(config: str, built, body) -> list[Variant]:
    variants = [_variant(o, p, **CONFIGS[config]) for o, p in SCHEDULES]
    failed = {v.key: built[(v.key, body)] for v in variants if (v.key, body) in built}
    assert not failed, f"build failed: {failed}"
    return variants


def _uneven_mask(gen, b, h, n_qblocks, n_kblocks, density, device="cuda"):
    """Per query block a density drawn log-uniformly in [density / 30, min(1, 3 density)], every 7th block
    dense and every 5th empty: dense fallback blocks beside very sparse ones."""
    lo, hi = math.log(density / 30), math.log(min(1.0, 3 * density))
    rows = torch.exp(lo + (hi - lo) * torch.rand(b, h, n_qblocks, 1, generator=gen))
    mask = torch.rand(b, h, n_qblocks, n_kblocks, generator=gen) < rows
    mask[:, :, ::7] = True
    mask[:, :, 2::5] = False
    return mask.to(device)


def _qkv(gen, config, b, h, sq, sk):
    dtype = BF16 if CONFIGS[config]["dtype"] == "bf16" else FP16
    return make_qkv(gen, b, h, sq, sk, CONFIGS[config]["head_dim"], dtype, "cuda")


def _check_all(q, k, v, keys, mask, variants, **kw):
    """Every schedule against the fp32 reference (the first, raster) and bit for bit against the raster one."""
    results = [attention(q, k, v, keys, variant=var, return_lse=True, **kw) for var in variants]
    _check(q, k, v, keys, mask, *results[0], flex=False, **kw)
    for var, (out, lse) in zip(variants, results):
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1]), f"{var.key} differs from raster"


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sq, sk", [(1999, 333), (3001, 2777), (70, 5), (1, 1)])
def test_schedules_odd_sizes_and_empty_blocks(gen, poisoned, built, body, config, sq, sk):
    q, k, v = _qkv(gen, config, 2, 3, sq, sk)
    mask = make_block_mask(gen, 2, 3, ceil_div(sq, 128), sk, "some_empty", density=0.4, device="cuda")
    mask[0, 0, 0, -1] = True  # the last key
    keys = KeySet.from_mask(mask, block_m=128)
    _check_all(q, k, v, keys, mask, _variants(config, built, body), scale=0.11)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("density", [0.01, 0.1])
def test_schedules_on_uneven_masks(gen, poisoned, built, body, config, density):
    """More tiles than SMs (a persistent CTA computes several: 144 tiles of 128 rows, 288 of 64), uneven key
    counts (dense, empty and very sparse blocks side by side)."""
    q, k, v = _qkv(gen, config, 2, 3, 3001, 2999)
    mask = _uneven_mask(gen, 2, 3, ceil_div(3001, 128), 2999, density)
    _check_all(q, k, v, KeySet.from_mask(mask, block_m=128), mask, _variants(config, built, body))


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
def test_schedules_over_head_chunks(gen, poisoned, built, body, config, monkeypatch):
    """A 1 MB index workspace (5 rows of 16 x 2,777 int32 indices) runs the 6 (batch, head) rows in two
    chunks of 3 (bh_start > 0, each chunk with its own order)."""
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "1")
    q, k, v = _qkv(gen, config, 2, 3, 2001, 2777)
    mask = _uneven_mask(gen, 2, 3, ceil_div(2001, 128), 2777, 0.1)
    keys = KeySet.from_mask(mask, block_m=128)
    assert (1 << 20) // (16 * 2777 * 4) == 5 and compaction.heads_per_chunk(keys) == 3
    _check_all(q, k, v, keys, mask, _variants(config, built, body))


@pytest.mark.gpu
def test_schedules_with_query_order(gen, poisoned, built, body):
    """The query permutation path (KeySet.query_order: rows gathered, attended, scattered back)."""
    from fgattn_gen import reference_attention
    from conftest import LSE_TOL, TOL

    sq, sk = 1500, 1777
    q, k, v = _qkv(gen, "C128", 1, 4, sq, sk)
    mask = _uneven_mask(gen, 1, 4, ceil_div(sq, 128), sk, 0.1)
    plain = KeySet.from_mask(mask, block_m=128)
    perm = torch.stack([torch.randperm(sq, generator=gen) for _ in range(4)]).view(1, 4, sq).to("cuda")
    keys = KeySet(plain.bits, plain.n_kblocks, 128, 1, query_order=perm)
    ref, ref_lse = reference_attention(q, k, v, keys, return_lse=True)
    finite = ref_lse.isfinite()
    for variant in _variants("C128", built, body):
        out, lse = attention(q, k, v, keys, variant=variant, return_lse=True)
        torch.testing.assert_close(out.float(), ref, atol=TOL[BF16][0], rtol=TOL[BF16][1], msg=lambda m: f"{variant.key}: {m}")
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=LSE_TOL[0], rtol=LSE_TOL[1])
        assert (lse[~finite] == float("-inf")).all() and (out[~finite] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("order, persist", [(2, 0), (1, 1)], ids=["o2p0", "o1p1"])
def test_schedule_graph_capture(gen, built, body, order, persist):
    """The work order is computed on the device (no host sync): the call captures in a CUDA graph, and a
    replay with another mask's bits follows the new counts."""
    from fgattn_gen import reference_attention
    from conftest import TOL

    q, k, v = _qkv(gen, "C128", 1, 2, 1000, 777)
    masks = [_uneven_mask(gen, 1, 2, ceil_div(1000, 128), 777, d) for d in (0.05, 0.3)]
    keys = KeySet.from_mask(masks[0], block_m=128)
    variant = _variant(order, persist, **CONFIGS["C128"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # loads the kernels outside the capture
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
