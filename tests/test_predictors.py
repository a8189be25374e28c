"""Training-free key predictors: each KeySet against a slow pure-torch version of the same rule (loops and a
full sort per row), on small shapes through Triton's interpreter (CPU) and torch ops; gates,
always-kept keys, the exact-mask refresh output, CachedMask, and clear errors for bad knobs."""

import math

import pytest
import torch

from conftest import HAS_CUDA, TOL, ceil_div, make_qkv
from fgattn_gen import KeySet, attention, reference_attention
from fgattn_gen.predictors import CachedMask, exact_mask, pooled_top_p, top_p_search, threshold_rule, words
from fgattn_gen.predictors.block_stats import block_stat
from fgattn_gen.predictors.dense import dense_attention_with_lse

IMPLS = ["kernels", "torch"]
EXACT_ITERS = 40  # enough bisection steps for the threshold to land on the exact sorted value
DEVICE = "cuda" if HAS_CUDA else "cpu"


def assert_same_keys(got: torch.Tensor, want: torch.Tensor) -> None:
    """bool masks equal; on a GPU (other exp / summation order than the CPU reference) up to near-ties."""
    got, want = got.cpu(), want.cpu()
    if DEVICE == "cpu":
        assert torch.equal(got, want)
    else:
        assert (got != want).float().mean() <= 2e-3


# ---------------------------------------------------------------------------------------- slow references
def _top_p_keep(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool: the smallest set of entries of the 1-D distribution p whose mass reaches top_p (ties kept)."""
    ordered = p.sort(descending=True).values
    mass = ordered.cumsum(0)
    n = int((mass < top_p * mass[-1]).sum()) + 1
    return p >= ordered[min(n, len(p)) - 1]


def _always_kept(mask, block_m, block_n, seq_q, seq_k, keep_keys, local_window):
    for qb in range(mask.shape[2]):
        qs, qe = qb * block_m, min((qb + 1) * block_m, seq_q)
        ranges = list(keep_keys) + ([(qs - local_window, qe + local_window)] if local_window is not None else [])
        for kb in range(mask.shape[3]):
            ks, ke = kb * block_n, min((kb + 1) * block_n, seq_k)
            if any(ks < end and ke > start for start, end in ranges):
                mask[:, :, qb, kb] = True
    return mask


def slow_pooled_top_p(q, k, *, block_m, block_n=1, top_p=None, sim_threshold, pool=None, keep_keys=(),
                      local_window=None, threshold=None, query_variance=False):
    # On CUDA, half-precision inputs are scored on tensor cores: q̄ * scale and k̄ rounded to the input dtype.
    score_dtype = q.dtype if q.is_cuda and q.dtype != torch.float32 else torch.float32
    q, k = q.cpu(), k.cpu()
    b, h, seq_q, d = q.shape
    seq_k = k.shape[2]
    pool = pool or block_m
    mask = torch.zeros(b, h, ceil_div(seq_q, block_m), ceil_div(seq_k, block_n), dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            kf = k[bi, hi].float()
            k_mean = torch.stack([kf[j:j + block_n].mean(0) for j in range(0, seq_k, block_n)])
            for start in range(0, seq_q, pool):
                rows = q[bi, hi, start:start + pool].float()
                q_mean = rows.mean(0)
                similarity = torch.nn.functional.cosine_similarity(rows, q_mean[None], dim=-1).mean()
                scores = (q_mean / math.sqrt(d)).to(score_dtype).float() @ k_mean.to(score_dtype).float().T
                if query_variance:  # log-normal estimate of the rows' mean exp(scale q_i . k̄)
                    var = rows.var(0, unbiased=False) / (2 * d)
                    scores += var.to(score_dtype).float() @ k_mean.square().to(score_dtype).float().T
                p = torch.softmax(scores, -1)
                if similarity < sim_threshold:
                    keep = torch.ones_like(p, dtype=torch.bool)
                else:
                    keep = p > threshold if threshold is not None else _top_p_keep(p, top_p)
                mask[bi, hi, start // block_m] |= keep
    return _always_kept(mask, block_m, block_n, seq_q, seq_k, keep_keys, local_window)


def slow_exact_mask(q, k, *, block_m, block_n=1, threshold=None, top_p=None):
    q, k = q.cpu(), k.cpu()
    b, h, seq_q, d = q.shape
    seq_k = k.shape[2]
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(d), -1)
    mask = torch.zeros(b, h, ceil_div(seq_q, block_m), ceil_div(seq_k, block_n), dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(mask.shape[2]):
                rows = probs[bi, hi, qb * block_m:(qb + 1) * block_m]
                groups = range(0, seq_k, block_n)
                if top_p is None:
                    best = torch.stack([rows[:, j:j + block_n].max() for j in groups])
                    mask[bi, hi, qb] = best > threshold
                else:
                    mass = torch.stack([rows[:, j:j + block_n].sum() for j in groups]) / rows.shape[0]
                    mask[bi, hi, qb] = _top_p_keep(mass, top_p)
    return mask


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------------- words
@pytest.mark.parametrize("n_kblocks", [1, 31, 32, 33, 70])
def test_words_match_keyset(gen, n_kblocks):
    mask = torch.rand(2, 3, 4, n_kblocks, generator=gen) < 0.5
    assert torch.equal(words.pack_mask(mask), KeySet.from_mask(mask, block_m=16).bits)
    assert torch.equal(words.full_bits(2, 3, 4, n_kblocks, mask.device),
                       KeySet.full(2, 3, 64, n_kblocks, block_m=16).bits)
    first = torch.randint(0, n_kblocks, (20,), generator=gen)
    end = torch.minimum(first + torch.randint(0, n_kblocks + 1, (20,), generator=gen), torch.tensor(n_kblocks))
    expected = (torch.arange(n_kblocks) >= first[:, None]) & (torch.arange(n_kblocks) < end[:, None])
    assert torch.equal(words.interval_words(first, end, ceil_div(n_kblocks, 32)), words.pack_mask(expected))


# ---------------------------------------------------------------------------------------- threshold search
@pytest.mark.parametrize("resident_keys", [top_p_search.RESIDENT_KEYS, 64], ids=["resident", "streamed"])
@pytest.mark.parametrize("n_keys", [1, 37, 200])
def test_top_p_words_match_sort(gen, monkeypatch, resident_keys, n_keys):
    monkeypatch.setattr(top_p_search, "RESIDENT_KEYS", resident_keys)
    scores = randn(gen, 2, 5, n_keys) * 3
    for top_p in (0.05, 0.9, 0.999):
        keep = torch.stack([torch.stack([_top_p_keep(torch.softmax(r, -1), top_p) for r in m])
                            for m in scores.cpu()])
        keep = torch.nn.functional.pad(keep, (0, 0, 0, 1)).view(2, 3, 2, n_keys).any(2)  # 2 rows per block
        keep_all = torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)
        keep_all[0, 1] = True
        keep[0, 1] = True
        for impl in IMPLS:
            got = top_p_search.top_p_words(scores, top_p, rows_per_block=2, n_blocks=3, iters=EXACT_ITERS,
                                        impl=impl, keep_all=keep_all)
            assert_same_keys(KeySet(got[None], n_keys, 1).to_mask()[0], keep)


@pytest.mark.parametrize("n_keys, rows_per_block", [(1, 1), (37, 4), (300, 2), (300, 3)])
def test_pooled_threshold_words_match_slow(gen, n_keys, rows_per_block):
    """The fused kernel (several key tiles, rows OR-ed per block, rows past the last block) and the torch
    rule against softmax > threshold, with and without the variance term; 150 pooled rows span at least two
    programs of either launch configuration."""
    groups = 150
    n_blocks = -(-groups // rows_per_block) + 1
    q_mean, q_var = randn(gen, 2, groups, 64), randn(gen, 2, groups, 64).abs()
    k_mean = 3 * randn(gen, 2, n_keys, 64)
    keep_all = torch.zeros(2, n_blocks, dtype=torch.bool, device=DEVICE)
    keep_all[0, 1] = True
    for var in (None, q_var):
        scores = q_mean.cpu() @ k_mean.cpu().transpose(1, 2) / 8
        if var is not None:
            scores += var.cpu() @ k_mean.cpu().square().transpose(1, 2) / 128
        for t in (0.5, 2.0, 20.0):
            keep = torch.softmax(scores, -1) > min(1.0, t / n_keys)
            keep = torch.nn.functional.pad(keep, (0, 0, 0, n_blocks * rows_per_block - groups))
            keep = keep.view(2, n_blocks, rows_per_block, n_keys).any(2)
            keep[0, 1] = True
            for impl in IMPLS:
                got = threshold_rule.pooled_threshold_words(
                    q_mean, k_mean, 1 / 8, min(1.0, t / n_keys), rows_per_block=rows_per_block, n_blocks=n_blocks,
                    impl=impl, dtype=torch.float32, q_var=var, keep_all=keep_all)
                assert_same_keys(KeySet(got[None], n_keys, 1).to_mask()[0], keep)
                assert not got[1, -1].any()  # block past the last row


def test_top_p_keeps_at_least_the_mass(gen):
    """Few bisection steps: the kept mass still reaches top_p (the threshold is approached from below)."""
    scores = randn(gen, 1, 8, 300)
    words = top_p_search.top_p_words(scores, 0.9, rows_per_block=1, n_blocks=8, iters=4, impl="kernels")
    keep = KeySet(words[None], 300, 1).to_mask()[0, 0]
    assert ((torch.softmax(scores[0], -1) * keep).sum(-1) >= 0.9 - 1e-5).all()


# ---------------------------------------------------------------------------------------- pooled top-p
POOLED_CASES = [
    # seq_q, seq_k, block_m, pool, block_n, top_p
    (100, 77, 32, None, 1, 0.9),
    (130, 150, 64, 16, 1, 0.7),
    (64, 300, 64, 32, 1, 0.95),
    (90, 200, 32, 16, 16, 0.8),
    (128, 260, 128, 128, 128, 0.5),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_q, seq_k, block_m, pool, block_n, top_p", POOLED_CASES)
def test_pooled_top_p_matches_slow(gen, impl, seq_q, seq_k, block_m, pool, block_n, top_p):
    q, k = randn(gen, 1, 2, seq_q, 64), randn(gen, 1, 2, seq_k, 64)
    keys = pooled_top_p(q, k, block_m=block_m, block_n=block_n, pool=pool, top_p=top_p, sim_threshold=-1.0,
                        search_iters=EXACT_ITERS, impl=impl)
    assert (keys.block_m, keys.block_n) == (block_m, block_n)
    expected = slow_pooled_top_p(q, k, block_m=block_m, block_n=block_n, pool=pool, top_p=top_p, sim_threshold=-1.0)
    assert_same_keys(keys.to_mask(), expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_q, seq_k, block_m, pool, block_n, t_x_uniform", [
    (100, 77, 32, None, 1, 2.0), (130, 150, 64, 16, 1, 1.0), (90, 200, 32, 16, 16, 1.0), (16, 300, 16, 16, 1, 1.0)])
def test_pooled_threshold_matches_slow(gen, impl, seq_q, seq_k, block_m, pool, block_n, t_x_uniform):
    """The threshold rule: a key group is kept where its pooled probability exceeds the threshold for a
    group of the block (t_x_uniform times the uniform probability); the similarity gate still applies."""
    q, k = randn(gen, 1, 2, seq_q, 64), randn(gen, 1, 2, seq_k, 64)
    threshold = t_x_uniform / -(-seq_k // block_n)
    for gate in (-1.0, 0.1):  # random queries: the gate keeps every key of some blocks
        keys = pooled_top_p(q, k, block_m=block_m, block_n=block_n, pool=pool, threshold=threshold,
                            sim_threshold=gate, impl=impl)
        expected = slow_pooled_top_p(q, k, block_m=block_m, block_n=block_n, pool=pool, threshold=threshold,
                                     sim_threshold=gate)
        assert_same_keys(keys.to_mask(), expected)
        assert 0.0 < expected.float().mean() < 1.0 or gate > -1.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_q, seq_k, block_m, pool, block_n, rule", [
    (100, 77, 32, 8, 1, dict(threshold=2.0 / 77)), (130, 150, 64, 16, 1, dict(top_p=0.8)),
    (90, 200, 32, 16, 16, dict(threshold=1.0 / 13))])
def test_pooled_query_variance_matches_slow(gen, impl, seq_q, seq_k, block_m, pool, block_n, rule):
    """query_variance adds scale^2 / 2 * var(q) . k̄^2 to the pooled logits; the kept keys change (keys of
    norm ~3 sqrt(D): the term varies across key groups)."""
    q, k = randn(gen, 1, 2, seq_q, 64), 3 * randn(gen, 1, 2, seq_k, 64)
    opts = dict(block_m=block_m, block_n=block_n, pool=pool, sim_threshold=-1.0, **rule)
    keys = pooled_top_p(q, k, query_variance=True, search_iters=EXACT_ITERS, impl=impl, **opts)
    expected = slow_pooled_top_p(q, k, query_variance=True, **opts)
    assert_same_keys(keys.to_mask(), expected)
    assert not torch.equal(expected, slow_pooled_top_p(q, k, **opts))


def test_pooled_top_p_bf16_strided(gen):
    """bf16 inputs in [B, S, H, D] storage (non-contiguous views), batch 2."""
    q, k, _ = make_qkv(gen, 2, 3, 70, 90, 64, torch.bfloat16, DEVICE, layout="bshd")
    keys = pooled_top_p(q, k, block_m=32, pool=16, top_p=0.8, sim_threshold=-1.0, search_iters=EXACT_ITERS)
    assert_same_keys(keys.to_mask(), slow_pooled_top_p(q, k, block_m=32, pool=16, top_p=0.8, sim_threshold=-1.0))


def test_similarity_gate(gen):
    """A block of near-identical queries is predicted; a block of random queries keeps every key."""
    d, seq_k = 64, 100
    similar = randn(gen, d)[None] + 0.05 * randn(gen, 32, d)
    q = torch.cat([similar, randn(gen, 32, d)])[None, None]
    k = randn(gen, 1, 1, seq_k, d)
    keys = pooled_top_p(q, k, block_m=32, top_p=0.5, sim_threshold=0.6).to_mask()[0, 0]
    assert not keys[0].all() and keys[1].all()
    assert not pooled_top_p(q, k, block_m=32, top_p=0.5, sim_threshold=-1.0).to_mask()[0, 0, 1].all()
    expected = slow_pooled_top_p(q, k, block_m=32, top_p=0.5, sim_threshold=0.6)
    assert_same_keys(keys, expected[0, 0])


def test_gate_on_a_sub_block_opens_its_kernel_block(gen):
    d = 64
    q = randn(gen, 1, 1, 64, d)
    q[..., :48, :] = randn(gen, d) + 0.01 * randn(gen, 48, d)  # sub-blocks 0-2 similar, sub-block 3 random
    k = randn(gen, 1, 1, 80, d)
    keys = pooled_top_p(q, k, block_m=64, pool=16, top_p=0.3, sim_threshold=0.6, search_iters=EXACT_ITERS)
    assert keys.to_mask().all()
    assert not pooled_top_p(q[..., :48, :], k, block_m=64, pool=16, top_p=0.3, sim_threshold=0.6).to_mask().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_keep_keys_and_local_window(gen, impl):
    seq_q, seq_k, block_m, block_n = 96, 120, 32, 8
    q, k = randn(gen, 1, 2, seq_q, 64), randn(gen, 1, 2, seq_k, 64)
    opts = dict(block_m=block_m, block_n=block_n, top_p=0.05, sim_threshold=-1.0)
    ranges = [(100, 120), (3, 4)]
    keys = pooled_top_p(q, k, keep_keys=ranges, local_window=5, search_iters=EXACT_ITERS, impl=impl,
                        **opts).to_mask()
    expected = slow_pooled_top_p(q, k, keep_keys=ranges, local_window=5, **opts)
    assert_same_keys(keys, expected)
    assert keys[..., 0].all() and keys[..., 12:].all()  # key 3 -> group 0; keys 100..119 -> groups 12..14
    assert keys[:, :, 1, 3].all() and keys[:, :, 1, 8].all()  # block 1 = queries 32..63 keeps keys 27..68
    single = pooled_top_p(q, k, keep_keys=(10, 11), impl=impl, **opts).to_mask()
    assert single[..., 1].all()


@pytest.mark.parametrize("top_p", [1.0, 1 - 1e-9])  # 1 - 1e-9 is 1.0 in fp32
def test_top_p_one_keeps_everything(gen, top_p):
    q, k = randn(gen, 1, 2, 50, 64), randn(gen, 1, 2, 70, 64)
    assert pooled_top_p(q, k, block_m=16, top_p=top_p).to_mask().all()
    assert exact_mask(q, k, k, block_m=16, top_p=top_p)[1].to_mask().all()


def test_chunked_heads_same_result(gen, monkeypatch):
    """A tiny workspace budget forces one head per chunk; the KeySet does not change."""
    q, k = randn(gen, 2, 3, 64, 64), randn(gen, 2, 3, 100, 64)
    whole = pooled_top_p(q, k, block_m=32, top_p=0.8, sim_threshold=-1.0)
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "0")
    assert torch.equal(pooled_top_p(q, k, block_m=32, top_p=0.8, sim_threshold=-1.0).bits, whole.bits)
    _, exact = exact_mask(q, k, k, block_m=32)
    monkeypatch.delenv("FGATTN_INDEX_WORKSPACE_MB")
    assert torch.equal(exact_mask(q, k, k, block_m=32)[1].bits, exact.bits)


# ---------------------------------------------------------------------------------------- exact mask
EXACT_CASES = [
    # seq_q, seq_k, block_m, block_n, rule
    (100, 77, 32, 1, dict(threshold=None)),
    (130, 150, 64, 1, dict(threshold=0.02)),
    (200, 90, 128, 1, dict(top_p=0.9)),
    (70, 130, 16, 8, dict(threshold=0.01)),
    (96, 260, 32, 128, dict(top_p=0.7)),
    (40, 60, 256, 1, dict(threshold=0.05)),  # block_m above the kernel's 128-query tile
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_q, seq_k, block_m, block_n, rule", EXACT_CASES)
def test_exact_mask_matches_slow(gen, impl, seq_q, seq_k, block_m, block_n, rule):
    q, k, v = randn(gen, 1, 2, seq_q, 64), randn(gen, 1, 2, seq_k, 64), randn(gen, 1, 2, seq_k, 64)
    out, keys = exact_mask(q, k, v, block_m=block_m, block_n=block_n, search_iters=EXACT_ITERS, impl=impl,
                           **rule)
    ref = reference_attention(q, k, v, KeySet.full(1, 2, seq_q, seq_k, block_m=16, device=DEVICE))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if rule.get("top_p") is None:
        rule = dict(threshold=rule["threshold"] or 0.5 / seq_k)
    assert_same_keys(keys.to_mask(), slow_exact_mask(q, k, block_m=block_m, block_n=block_n, **rule))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_mask_half_inputs(gen, dtype):
    q, k, v = make_qkv(gen, 1, 2, 90, 110, 128, dtype, DEVICE, layout="sliced")
    out, keys = exact_mask(q, k, v, block_m=32, score_precision="exact")
    ref = reference_attention(q, k, v, KeySet.full(1, 2, 90, 110, block_m=16, device=DEVICE))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    assert_same_keys(keys.to_mask(), slow_exact_mask(q, k, block_m=32, threshold=0.5 / 110))


@pytest.mark.parametrize("rule", [dict(threshold=None), dict(top_p=0.9)])
def test_fp8_scores_agree(gen, rule):
    """fp8 statistics: the Triton kernel and the torch emulation agree, and both stay close to the exact mask."""
    q, k, v = make_qkv(gen, 1, 2, 256, 300, 64, torch.bfloat16, DEVICE)
    k = k + 2.0  # a shared offset in the keys: the centring before quantisation takes it out
    exact = exact_mask(q, k, v, block_m=64, score_precision="exact", **rule)[1].to_mask()
    fp8 = {b: exact_mask(q, k, v, block_m=64, score_precision="fp8", impl=b, **rule)[1].to_mask()
           for b in IMPLS}
    assert (fp8["kernels"] != fp8["torch"]).float().mean() < 0.005
    assert (fp8["kernels"] != exact).float().mean() < 0.05


def test_exact_mask_keep_keys(gen):
    q, k, v = randn(gen, 1, 1, 64, 64), randn(gen, 1, 1, 90, 64), randn(gen, 1, 1, 90, 64)
    _, keys = exact_mask(q, k, v, block_m=32, threshold=0.9, keep_keys=[(80, 90)], local_window=0)
    mask = keys.to_mask()[0, 0].cpu()
    assert mask[:, 80:].all() and mask[0, :32].all() and mask[1, 32:64].all()
    assert_same_keys(mask, slow_exact_mask(q, k, block_m=32, threshold=0.9)[0, 0] | _always_kept(
        torch.zeros(1, 1, 2, 90, dtype=torch.bool), 32, 1, 64, 90, [(80, 90)], 0)[0, 0])


@pytest.mark.parametrize("mode", ["max", "mean", "words"])
@pytest.mark.parametrize("precision", ["exact", "fp8"])
def test_block_stat_launches_agree(gen, mode, precision):
    """The Triton statistics (plain, two query blocks per program, other tiles) equal the torch version."""
    q, k = randn(gen, 2, 300, 64, dtype=torch.bfloat16), randn(gen, 2, 200, 64, dtype=torch.bfloat16)
    lse = torch.logsumexp(q.float() @ k.float().transpose(1, 2) / 8.0, -1)
    args = dict(block_m=128, scale=1 / 8.0, mode=mode, precision=precision, threshold=0.5 / 200)
    want = block_stat(q, k, lse, impl="torch", **args)
    for launch in (None, {"pair": True}, {"tile_n": 32, "num_warps": 4}):
        got = block_stat(q, k, lse, impl="kernels", launch=launch, **args)
        if mode == "words":
            assert_same_keys(KeySet(got[None], 200, 128).to_mask(), KeySet(want[None], 200, 128).to_mask())
        else:  # Hopper's fp8 tensor cores accumulate with fewer mantissa bits than fp32
            tol = 2e-3 if precision == "fp8" else 1e-5
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_dense_lse(gen):
    q, k, v = randn(gen, 2, 2, 50, 64), randn(gen, 2, 2, 70, 64), randn(gen, 2, 2, 70, 64)
    out, lse = dense_attention_with_lse(q, k, v, 0.3)
    scores = q @ k.transpose(-1, -2) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- CachedMask
def test_cached_mask_schedule(gen):
    q, k, v = make_qkv(gen, 1, 2, 64, 64, 64, torch.bfloat16, DEVICE)
    q = q * 3  # peaked attention: a sparse mask
    cache = CachedMask(refresh_steps=[0, 3], block_m=32, threshold=0.05)
    dense = reference_attention(q, k, v, KeySet.full(1, 2, 64, 64, block_m=16, device=DEVICE))
    atol, rtol = TOL[torch.bfloat16]
    for step in range(5):
        refresh = cache.needs_refresh(step, layer=7)
        assert refresh == (step in (0, 3))
        out = attention(q, k, v, predictor=cache.at(step=step, layer=7))
        keys = cache.keys(7)
        if refresh:
            torch.testing.assert_close(out.float(), dense, atol=atol, rtol=rtol)
        else:
            torch.testing.assert_close(out, attention(q, k, v, keys))
    assert not keys.to_mask().all()
    assert cache.memory_report() == {"masks": 1, "bytes": keys.nbytes,
                                     "bytes_by_device": {str(keys.device): keys.nbytes}}


def test_cached_mask_layers_and_branches(gen):
    q, k, v = make_qkv(gen, 1, 1, 32, 48, 64, torch.bfloat16, DEVICE)
    q, q2 = q * 3, q.flip(2) * 3
    separate = CachedMask(refresh_steps=[0], block_m=16, threshold=0.05)
    attention(q, k, v, predictor=separate.at(step=0, layer=0, branch=0))
    assert separate.needs_refresh(0, layer=0, branch=1) and separate.needs_refresh(0, layer=1)
    attention(q2, k, v, predictor=separate.at(step=0, layer=0, branch=1))
    assert not torch.equal(separate.keys(0, 0).bits, separate.keys(0, 1).bits)
    shared = CachedMask(refresh_steps=[0], block_m=16, threshold=0.05, share_branches=True)
    attention(q, k, v, predictor=shared.at(step=0, layer=0, branch=0))
    assert not shared.needs_refresh(0, layer=0, branch=1)
    attention(q2, k, v, predictor=shared.at(step=0, layer=0, branch=1))
    assert torch.equal(shared.keys(0, 1).bits, separate.keys(0, 0).bits)
    assert shared.nbytes == shared.keys(0).nbytes and separate.nbytes == 2 * shared.nbytes
    shared.clear()
    assert shared.keys(0) is None and shared.nbytes == 0


def test_cached_mask_offload_restore(gen):
    q, k, v = make_qkv(gen, 1, 2, 32, 32, 64, torch.bfloat16, DEVICE)
    cache = CachedMask(refresh_steps=[0], block_m=16, offload=True)
    attention(q, k, v, predictor=cache.at(step=0, layer=0))
    assert cache.keys(0).device.type == "cpu"
    cache.restore(q.device)
    assert cache.keys(0).device == q.device
    cache.offload()
    out = attention(q, k, v, predictor=cache.at(step=1, layer=0))
    assert cache.keys(0).device.type == "cpu"
    torch.testing.assert_close(out, attention(q, k, v, cache.keys(0).to(q.device)))


# ---------------------------------------------------------------------------------------- bad input
@pytest.fixture
def qk(gen):
    return randn(gen, 1, 2, 40, 64), randn(gen, 1, 2, 50, 64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=True), "top_p"), (dict(top_p="0.9"), "top_p"),
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"),
    (dict(threshold=0.1, top_p=0.9), "threshold, top_p"),
    (dict(sim_threshold=-1.5), "sim_threshold"), (dict(sim_threshold=1.01), "sim_threshold"),
    (dict(sim_threshold=float("inf")), "sim_threshold"),
    (dict(block_m=0), "block_m"), (dict(block_n=2.0), "block_n"), (dict(pool=48), "pool"), (dict(pool=0), "pool"),
    (dict(keep_keys=(5, 3)), "keep_keys"), (dict(keep_keys=[(0, 51)]), "keep_keys"),
    (dict(keep_keys="text"), "keep_keys"), (dict(local_window=-1), "local_window"),
    (dict(scale=0.0), "scale"), (dict(search_iters=0), "search_iters"), (dict(impl="cuda"), "impl"),
    (dict(query_variance=1), "query_variance"),
])
def test_pooled_bad_knobs(qk, kwargs, match):
    q, k = qk
    with pytest.raises(ValueError, match=rf"^{match}: "):
        pooled_top_p(q, k, **kwargs)


@pytest.mark.parametrize("which, make, match", [
    ("k", lambda t: t[..., :32].contiguous(), "k: shape"),
    ("k", lambda t: t[:, :1], "k: shape"),
    ("k", lambda t: t[0], "k: expected rank 4"),
    ("k", lambda t: t.to(torch.float16), "k: dtype"),
    ("q", lambda t: t.to(torch.int32), "q: dtype"),
    ("q", lambda t: t.transpose(-1, -2), "q: the last"),
    ("q", lambda t: t[:, :, :0], "q: every dim"),
])
def test_pooled_bad_tensors(qk, which, make, match):
    args = dict(zip("qk", qk))
    args[which] = make(args[which])
    with pytest.raises(ValueError, match=rf"^{match}"):
        pooled_top_p(args["q"], args["k"])


def test_not_a_tensor(qk):
    with pytest.raises(TypeError, match="^k: expected a torch.Tensor"):
        pooled_top_p(qk[0], qk[1].tolist())


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=0.1, top_p=0.9), "threshold, top_p"), (dict(threshold=0.0), "threshold"),
    (dict(threshold=2.0), "threshold"), (dict(top_p=0.0), "top_p"), (dict(score_precision="int8"), "score_precision"),
    (dict(block_n=0), "block_n"), (dict(keep_keys=[(0, 60)]), "keep_keys"),
])
def test_exact_bad_knobs(qk, kwargs, match):
    q, k = qk
    with pytest.raises(ValueError, match=rf"^{match}: "):
        exact_mask(q, k, k, **kwargs)


def test_exact_bad_shapes(qk):
    q, k = qk
    with pytest.raises(ValueError, match="^v: shape"):
        exact_mask(q, k, k[:, :, :10])
    with pytest.raises(ValueError, match="^q: head dim"):
        exact_mask(q[..., :48], k[..., :48], k[..., :48])


@pytest.mark.parametrize("steps", [[], [-1], [0.5], "0"])
def test_cached_mask_bad_schedule(steps):
    with pytest.raises(ValueError, match="^refresh_steps: "):
        CachedMask(refresh_steps=steps)


# ---------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_no_host_sync_and_graph_capture():
    """Both predictors run with CUDA sync debugging set to error, and pooled_top_p replays in a CUDA graph."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4000, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    want = pooled_top_p(q, k, pool=32)
    exact_mask(q, k, v)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pooled_top_p(q, k, pool=32)
        exact_mask(q, k, v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = pooled_top_p(q, k, pool=32)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got.bits, want.bits)


@pytest.mark.gpu
@pytest.mark.parametrize("n_keys", [1, 200, 5000, 32768, 40000])
def test_gpu_top_p_words_match_sort(n_keys):
    """The CUDA kernel (rows up to CUDA_RESIDENT_KEYS) and the streamed Triton kernel (longer rows) against
    sorting; a block past the last row stays empty; a keep_all block keeps every key."""
    g = torch.Generator(device="cuda").manual_seed(n_keys)
    scores = torch.randn(2, 5, n_keys, device="cuda", generator=g) * 3
    for top_p in (0.05, 0.9, 0.999):
        keep = torch.stack([torch.stack([_top_p_keep(torch.softmax(r, -1), top_p) for r in m])
                            for m in scores.cpu()])
        keep = torch.nn.functional.pad(keep, (0, 0, 0, 3)).view(2, 4, 2, n_keys).any(2)
        keep_all = torch.zeros(2, 4, dtype=torch.bool, device="cuda")
        keep_all[1, 0] = True
        got = top_p_search.top_p_words(scores, top_p, rows_per_block=2, n_blocks=4, iters=EXACT_ITERS,
                                    impl="kernels", keep_all=keep_all)
        keep[1, 0] = True
        assert_same_keys(KeySet(got[None], n_keys, 1).to_mask()[0], keep)
        assert not got[:, 3].any()
        assert torch.equal(got[1, 0], words.full_row_words(n_keys, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_gpu_dense_lse(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    out, lse = dense_attention_with_lse(q, k, v, 128 ** -0.5, backend=backend)
    scores = q.float() @ k.float().transpose(-1, -2) * 128 ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=2e-2, rtol=0)
    torch.testing.assert_close(out.float(), torch.softmax(scores, -1) @ v.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["exact", "fp8"])
def test_gpu_exact_mask_matches_slow(precision):
    """The statistics kernel compiled for the GPU (wgmma; fp8 on sm89+) against the slow rule in fp32."""
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm89+")
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    q = q * 2  # peaked attention: a sparse mask
    for rule in (dict(threshold=0.5 / 700), dict(top_p=0.9)):
        keys = exact_mask(q, k, v, score_precision=precision, search_iters=EXACT_ITERS, **rule)[1].to_mask().cpu()
        expected = slow_exact_mask(q.cpu(), k.cpu(), block_m=128, **rule)
        assert (keys != expected).float().mean() < (1e-3 if precision == "exact" else 2e-2), rule
    _, lse = dense_attention_with_lse(q, k, v, 128 ** -0.5)
    for mode in ("words", "mean"):
        args = dict(block_m=128, scale=128 ** -0.5, mode=mode, precision=precision, threshold=0.5 / 700,
                    impl="kernels")
        one = block_stat(q[0], k[0], lse[0], kernel="triton", **args)  # launch variants are Triton's
        for launch in ({"pair": True}, {"tile_n": 64, "num_stages": 2}):
            torch.testing.assert_close(block_stat(q[0], k[0], lse[0], launch=launch, **args), one)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_pooled_top_p_matches_slow(dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k = (torch.randn(1, 2, 1000, 128, device="cuda", generator=g).to(dtype) for _ in range(2))
    for pool, block_n in ((16, 1), (128, 1), (128, 128)):
        keys = pooled_top_p(q, k, pool=pool, block_n=block_n, top_p=0.9, sim_threshold=-1.0,
                            search_iters=EXACT_ITERS).to_mask().cpu()
        expected = slow_pooled_top_p(q.cpu(), k.cpu(), block_m=128, block_n=block_n, pool=pool, top_p=0.9,
                                     sim_threshold=-1.0)
        assert (keys != expected).float().mean() < 1e-3, (pool, block_n)
