"""captured_mass: the per-block softmax mass a KeySet keeps, from sampled query rows, against the exact fp32
mass of every row; ragged blocks, key groups, chunking, the fused kernels with split keys, and argument errors."""

import importlib
import math

import pytest
import torch

from conftest import ceil_div
from fgattn_gen import KeySet
from fgattn_gen.ditdata import dit_qkv
from fgattn_gen.predictors import captured_mass, pooled_top_p
from fgattn_gen.predictors.captured_mass import sample_rows
from fgattn_gen.reference import element_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(gen, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)


def exact_rows(q, k, keys):
    """fp32 [B, H, Sq]: each query row's softmax mass (over all keys) on its block's selected keys."""
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return (probs * element_mask(keys, q.shape[2], k.shape[2])).sum(-1)


def per_block(rows, block_m, reduce="mean"):
    """[B, H, Sq] -> [B, H, n_qblocks]: mean (or std) over each block's rows."""
    n = ceil_div(rows.shape[-1], block_m)
    out = []
    for i in range(n):
        part = rows[..., i * block_m:(i + 1) * block_m]
        out.append(part.mean(-1) if reduce == "mean" else part.std(-1, unbiased=False))
    return torch.stack(out, -1)


def random_keys(gen, b, h, seq_q, seq_k, block_m, block_n, density=0.4):
    mask = torch.rand(b, h, ceil_div(seq_q, block_m), ceil_div(seq_k, block_n), generator=gen) < density
    return KeySet.from_mask(mask.to(DEVICE), block_m=block_m, block_n=block_n)


CASES = [
    # batch, heads, seq_q, seq_k, block_m, block_n
    (1, 2, 100, 77, 32, 1),
    (2, 1, 130, 150, 64, 8),
    (1, 3, 70, 131, 16, 3),
    (1, 1, 40, 60, 256, 1),  # one query block, shorter than block_m
    (1, 2, 9, 33, 4, 5),  # ragged last query block of 1 row, last key group of 3 keys
    (1, 1, 300, 200, 128, 128),
]


@pytest.mark.parametrize("b, h, seq_q, seq_k, block_m, block_n", CASES)
def test_all_rows_is_exact(gen, b, h, seq_q, seq_k, block_m, block_n):
    """samples >= block_m: every row of every block, so the estimate is the exact per-block mean."""
    q, k = randn(gen, b, h, seq_q, 64, scale=2.0), randn(gen, b, h, seq_k, 64)
    keys = random_keys(gen, b, h, seq_q, seq_k, block_m, block_n)
    want = per_block(exact_rows(q, k, keys), block_m)
    for samples in (block_m, block_m + 5):
        got = captured_mass(q, k, keys, samples=samples)
        assert got.shape == (b, h, ceil_div(seq_q, block_m)) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    if block_m <= 64:  # a random generator picks every row too (one per stratum of one row)
        g = torch.Generator(device=DEVICE).manual_seed(3)
        torch.testing.assert_close(captured_mass(q, k, keys, samples=block_m, generator=g), want,
                                   atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("seq_q, block_m, samples", [(1000, 128, 8), (333, 64, 5), (77, 16, 3), (50, 7, 1)])
def test_sampled_rows_are_stratified(seq_q, block_m, samples):
    rows, weights = sample_rows(seq_q, block_m, samples, torch.device(DEVICE))
    rows, weights = rows.cpu(), weights.cpu()
    for i in range(rows.shape[0]):
        size = min(block_m, seq_q - i * block_m)
        taken = min(samples, size)
        valid = rows[i, :taken] - i * block_m
        assert (valid >= 0).all() and (valid < size).all()
        assert len(set(valid.tolist())) == taken  # distinct rows, one per stratum
        strata = torch.arange(taken) * size // taken
        assert (valid >= strata).all() and (valid[:-1] < strata[1:]).all()
        assert torch.allclose(weights[i, :taken], torch.full((taken,), 1 / taken)) and not weights[i, taken:].any()
    assert len(set((rows[:, 0] % block_m).tolist())) > 1 or rows.shape[0] == 1  # offsets move between blocks


@pytest.mark.parametrize("seq_q, seq_k, block_m, block_n, samples", [(600, 250, 64, 1, 8), (500, 333, 128, 4, 16)])
def test_few_samples_within_sampling_error(gen, seq_q, seq_k, block_m, block_n, samples):
    """Fewer rows than the block: the estimate is a sample mean of the rows' masses (each in [0, 1]). Its
    error is bounded statistically: over the blocks, the mean |error| stays below 3x the mean standard error
    of a simple random sample of `samples` rows of the block, sigma_block * sqrt((1 - s/m) / s) (stratified
    rows do no worse on average); and averaging random (generator) estimates converges to the exact mass."""
    q, k = randn(gen, 1, 3, seq_q, 64, scale=2.0), randn(gen, 1, 3, seq_k, 64)
    keys = random_keys(gen, 1, 3, seq_q, seq_k, block_m, block_n)
    rows = exact_rows(q, k, keys)
    want = per_block(rows, block_m)
    sigma = per_block(rows, block_m, reduce="std")
    standard_error = sigma * math.sqrt((1 - samples / block_m) / samples)
    got = captured_mass(q, k, keys, samples=samples)
    assert (got - want).abs().mean() <= 3 * standard_error.mean()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    draws = torch.stack([captured_mass(q, k, keys, samples=samples, generator=g) for _ in range(16)])
    assert (draws[0] != draws[1]).any()  # a generator draws new rows
    assert (draws.mean(0) - want).abs().mean() <= 3 * standard_error.mean() / 4  # sqrt(16) draws


@pytest.mark.parametrize("family", ["smooth", "scattered"])
def test_dit_data_within_sampling_error(family):
    """DiT-like data with a pooled KeySet (rows of a block keep very different masses in `scattered`): 8 fixed
    rows of 128 stay within the sampling-error bound of the test above."""
    data = dit_qkv("narrow-cpu", family=family, dtype=torch.float32, device=DEVICE)
    keys = pooled_top_p(data.q, data.k, pool=32, threshold=4 / data.shape.seq, impl="torch")
    rows = exact_rows(data.q, data.k, keys)
    standard_error = per_block(rows, 128, reduce="std") * math.sqrt((1 - 8 / 128) / 8)
    got = captured_mass(data.q, data.k, keys)
    assert (got - per_block(rows, 128)).abs().mean() <= 3 * standard_error.mean()


@pytest.mark.parametrize("block_m, block_n", [(32, 1), (16, 7), (128, 128)])
def test_empty_and_full_key_sets(gen, block_m, block_n):
    q, k = randn(gen, 2, 2, 90, 128, scale=3.0).bfloat16(), randn(gen, 2, 2, 140, 128).bfloat16()
    nq, nk = ceil_div(90, block_m), ceil_div(140, block_n)
    empty = KeySet.from_mask(torch.zeros(2, 2, nq, nk, dtype=torch.bool, device=DEVICE), block_m=block_m,
                             block_n=block_n)
    full = KeySet.full(2, 2, 90, 140, block_m=block_m, block_n=block_n, device=DEVICE)
    assert torch.equal(captured_mass(q, k, empty), torch.zeros(2, 2, nq, device=DEVICE))
    torch.testing.assert_close(captured_mass(q, k, full, samples=3), torch.ones(2, 2, nq, device=DEVICE),
                               atol=1e-5, rtol=0)


def test_chunked_same_result(gen, monkeypatch):
    """A zero workspace budget: one head and one query block per chunk; the estimate does not change."""
    q, k = randn(gen, 2, 3, 200, 64), randn(gen, 2, 3, 150, 64)
    keys = random_keys(gen, 2, 3, 200, 150, 32, 2)
    whole = captured_mass(q, k, keys, samples=5)
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "0")
    torch.testing.assert_close(captured_mass(q, k, keys, samples=5), whole, atol=1e-6, rtol=1e-6)


def test_strided_inputs(gen):
    """q/k as [B, S, H, D] storage viewed as [B, H, S, D]."""
    q = randn(gen, 1, 70, 2, 64).transpose(1, 2)
    k = randn(gen, 1, 90, 2, 64).transpose(1, 2)
    keys = random_keys(gen, 1, 2, 70, 90, 16, 1)
    torch.testing.assert_close(captured_mass(q, k, keys, samples=16), per_block(exact_rows(q, k, keys), 16),
                               atol=2e-6, rtol=1e-5)


@pytest.fixture
def qkk(gen):
    q, k = randn(gen, 1, 2, 40, 64), randn(gen, 1, 2, 50, 64)
    return q, k, random_keys(gen, 1, 2, 40, 50, 16, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(samples=0), "samples"), (dict(samples=2.0), "samples"), (dict(samples=True), "samples"),
    (dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"),
    (dict(generator=0), "generator"),
])
def test_bad_arguments(qkk, kwargs, match):
    with pytest.raises(ValueError, match=rf"^{match}: "):
        captured_mass(*qkk, **kwargs)


def test_bad_keys(qkk, gen):
    q, k, _ = qkk
    for keys in (random_keys(gen, 1, 2, 100, 50, 16, 1), random_keys(gen, 1, 3, 40, 50, 16, 1),
                 random_keys(gen, 1, 2, 40, 90, 16, 1), random_keys(gen, 2, 2, 40, 50, 16, 1)):
        with pytest.raises(ValueError, match="^keys: "):
            captured_mass(q, k, keys)
    with pytest.raises(TypeError, match="^keys: "):
        captured_mass(q, k, torch.ones(1, 2, 3, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="^k: "):
        captured_mass(q, k[..., :32].contiguous(), qkk[2])


@pytest.mark.parametrize("block_m, block_n", [(16, 1), (32, 3)])
def test_fused_kernel_matches_torch_ops(gen, monkeypatch, block_m, block_n):
    """The fused one-pass kernel (CUDA, the interpreter) and the torch-ops path give the same estimate."""
    module = importlib.import_module("fgattn_gen.predictors.captured_mass")
    q, k = randn(gen, 2, 2, 75, 64), randn(gen, 2, 2, 83, 64)
    keys = random_keys(gen, 2, 2, 75, 83, block_m, block_n)
    fused = captured_mass(q, k, keys, samples=3)
    monkeypatch.setattr(module, "runs_fused", lambda q: False)
    torch.testing.assert_close(fused, captured_mass(q, k, keys, samples=3), atol=2e-5, rtol=1e-4)


def test_query_order(gen):
    """With ``query_order`` block i's rows are the queries it orders there: every row sampled = exact mass of
    the permuted queries."""
    from fgattn_gen import KeySet
    q, k = randn(gen, 1, 2, 48, 64), randn(gen, 1, 2, 50, 64)
    plain = random_keys(gen, 1, 2, 48, 50, 16, 1)
    order = torch.stack([torch.randperm(48, generator=gen) for _ in range(2)])[None].to(q.device)
    ordered = KeySet(plain.bits, plain.n_kblocks, 16, 1, query_order=order)
    gathered = q.gather(2, order[..., None].expand(-1, -1, -1, 64))
    torch.testing.assert_close(captured_mass(q, k, ordered, samples=16),
                               per_block(exact_rows(gathered, k, plain), 16), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("block_m, block_n, samples", [(16, 1, 3), (32, 3, 2), (8, 1, 1)])
def test_fused_split_keys_match_torch_ops(gen, monkeypatch, block_m, block_n, samples):
    """The key range split into single 32-key steps over many programs (partials merged per row, rows
    weighted per block), rows read through a query order: the torch-ops estimate."""
    from fgattn_gen.predictors import mass_kernel
    module = importlib.import_module("fgattn_gen.predictors.captured_mass")
    monkeypatch.setattr(mass_kernel, "LAUNCH", (16, 32, 4, 1))
    monkeypatch.setattr(mass_kernel, "MIN_SPLIT_STEPS", 1)
    monkeypatch.setattr(mass_kernel, "PROGRAMS_PER_SM", 64)
    q, k = randn(gen, 2, 2, 75, 64, scale=2.0), randn(gen, 2, 2, 131, 64)
    plain = random_keys(gen, 2, 2, 75, 131, block_m, block_n)
    order = torch.stack([torch.randperm(75, generator=gen) for _ in range(4)]).view(2, 2, 75).to(q.device)
    keys = KeySet(plain.bits, plain.n_kblocks, block_m, block_n, query_order=order)
    fused = captured_mass(q, k, keys, samples=samples)
    monkeypatch.setattr(module, "runs_fused", lambda q: False)
    torch.testing.assert_close(fused, captured_mass(q, k, keys, samples=samples), atol=2e-5, rtol=1e-4)
