"""attention() against the fp32 reference_attention (CPU: Triton interpreter; GPU: compiled kernels).

The interpreter is slow, so the shapes are small and the parameter space is covered by an explicit
list of cases rather than a cross product: every dtype, head dim, (block_m, block_n) pair, odd
(Sq, Sk) pair, density / mask structure and memory layout appears at least once.
"""

import math

import pytest
import torch

from conftest import LSE_TOL, TOL, TOLERANCES, ceil_div, empty_query_rows, make_block_mask, make_qkv
from fgattn_gen import KeySet, Variant, attention, default_variant, reference_attention

BF16, FP16 = torch.bfloat16, torch.float16

# dtype, head_dim, block_m, block_n, B, H, Sq, Sk, mask kind, density, layout
CASES = [
    (BF16, 64, 16, 1, 1, 2, 37, 53, "random", 0.5, "contiguous"),
    (FP16, 128, 16, 1, 2, 1, 53, 37, "random", 0.1, "bshd"),
    (BF16, 128, 32, 1, 1, 3, 100, 77, "band", None, "contiguous"),
    (FP16, 64, 32, 1, 2, 2, 1, 300, "full", None, "contiguous"),           # Sq = 1, density 1
    (BF16, 64, 64, 3, 1, 2, 150, 101, "some_empty", 0.5, "sliced"),
    (FP16, 128, 64, 3, 1, 1, 65, 1, "full", None, "contiguous"),           # Sk = 1 < block_n
    (BF16, 64, 32, 16, 2, 2, 97, 250, "random", 0.1, "bshd"),
    (FP16, 128, 32, 16, 1, 4, 33, 33, "first_last", None, "contiguous"),
    (BF16, 128, 16, 128, 1, 2, 300, 290, "random", 0.5, "contiguous"),
    (FP16, 64, 16, 128, 1, 1, 1, 1, "full", None, "contiguous"),            # Sq = Sk = 1
    (BF16, 64, 16, 1, 1, 1, 1, 1, "full", None, "sliced"),
    (FP16, 64, 16, 1, 2, 2, 250, 299, "random", 0.0, "contiguous"),          # density 0: all rows empty
    (BF16, 128, 64, 3, 1, 2, 200, 299, "random", 1.0, "bshd"),
    (FP16, 64, 32, 16, 1, 2, 129, 17, "some_empty", 0.5, "sliced"),
    (BF16, 128, 32, 1, 1, 1, 255, 257, "random", 0.1, "sliced"),
    (FP16, 128, 16, 128, 2, 1, 47, 129, "band", None, "contiguous"),
    (BF16, 64, 64, 3, 2, 1, 64, 96, "first_last", None, "contiguous"),       # block sizes divide: no raggedness
    (FP16, 64, 16, 1, 1, 3, 17, 3, "random", 0.5, "bshd"),
    (BF16, 128, 32, 16, 1, 2, 31, 200, "full", None, "contiguous"),
    (FP16, 128, 64, 3, 1, 1, 1, 299, "random", 0.1, "contiguous"),
    (BF16, 64, 16, 128, 1, 2, 99, 300, "some_empty", 0.1, "bshd"),
    (FP16, 64, 32, 1, 1, 2, 300, 1, "full", None, "contiguous"),             # Sk = 1
    (BF16, 64, 48, 1, 1, 2, 100, 61, "random", 0.5, "contiguous"),           # block_m not a power of two
    (FP16, 128, 128, 1, 1, 1, 130, 70, "random", 0.5, "sliced"),             # tile_m = block_m = 128
    (BF16, 128, 32, 7, 1, 2, 45, 88, "band", None, "contiguous"),
    (FP16, 64, 16, 3, 1, 2, 83, 149, "random", 0.1, "contiguous"),
    (BF16, 64, 16, 1, 1, 1, 20, 1100, "random", 0.1, "contiguous"),         # > 1024 key blocks: 2 scan chunks
]


def test_poison_fixture_poisons(poisoned):
    import importlib

    fake_torch = importlib.import_module("fgattn_gen.ops").torch
    assert fake_torch.empty_like(torch.zeros(3, dtype=torch.bfloat16)).isnan().all()
    assert fake_torch.empty(2, 3, dtype=torch.float32).isnan().all()


def case_id(case):
    dtype, d, bm, bn, b, h, sq, sk, kind, density, layout = case
    dens = "" if density is None else f"{density:g}"
    return f"{'bf16' if dtype is BF16 else 'fp16'}-d{d}-m{bm}n{bn}-{b}x{h}-q{sq}k{sk}-{kind}{dens}-{layout}"


def make_case(gen, case, device="cpu"):
    dtype, d, bm, bn, b, h, sq, sk, kind, density, layout = case
    q, k, v = make_qkv(gen, b, h, sq, sk, d, dtype, device, layout=layout)
    mask = make_block_mask(gen, b, h, ceil_div(sq, bm), ceil_div(sk, bn), kind,
                           density=0.5 if density is None else density, device=device)
    return q, k, v, mask, KeySet.from_mask(mask, block_m=bm, block_n=bn)


def check_against_reference(q, k, v, keys, mask, out, lse, *, scale=None):
    """out / lse of attention() against the fp32 reference, plus the empty-row contract."""
    b, h, sq, d = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert not out.isnan().any(), "NaN in the output (unwritten or bad softmax)"
    assert not lse.isnan().any(), "NaN in the LSE"
    ref, ref_lse = reference_attention(q, k, v, keys, scale=scale, return_lse=True)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    empty = empty_query_rows(mask, keys.block_m, sq)
    assert (out[empty] == 0).all(), "rows with no selected key must be exactly 0"
    assert (lse[empty] == float("-inf")).all(), "rows with no selected key must have LSE = -inf"
    assert torch.isfinite(lse[~empty]).all()


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(gen, poisoned, device, case):
    q, k, v, mask, keys = make_case(gen, case, device)
    out, lse = attention(q, k, v, keys, return_lse=True)
    check_against_reference(q, k, v, keys, mask, out, lse)


def test_case_list_covers_every_axis():
    axes = list(zip(*CASES))
    assert set(axes[0]) == {BF16, FP16}
    assert set(axes[1]) == {64, 128}
    pairs = set(zip(axes[2], axes[3]))
    assert {(16, 1), (32, 1), (64, 3), (32, 16), (16, 128)} <= pairs
    sq_sk = list(zip(axes[6], axes[7]))
    assert any(sq != sk for sq, sk in sq_sk) and any(sq == sk for sq, sk in sq_sk)
    assert any(sq == 1 for sq, _ in sq_sk) and any(sk == 1 for _, sk in sq_sk)
    assert set(axes[8]) >= {"random", "full", "band", "some_empty", "first_last"}
    assert {0.0, 0.1, 0.5, 1.0} <= set(axes[9])
    assert set(axes[10]) == {"contiguous", "bshd", "sliced"}
    assert all(b * h <= 4 for b, h in zip(axes[4], axes[5]))


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_return_lse_false_and_determinism(gen, device, dtype):
    q, k, v, mask, keys = make_case(gen, (dtype, 64, 32, 3, 1, 2, 70, 90, "some_empty", 0.5, "contiguous"), device)
    out = attention(q, k, v, keys)
    assert isinstance(out, torch.Tensor) and out.is_contiguous()
    out2, lse = attention(q, k, v, keys, return_lse=True)
    assert torch.equal(out, out2)  # same kernel, same inputs: bitwise identical
    out3 = attention(q, k, v, keys, backend="triton")
    assert torch.equal(out, out3)


@pytest.mark.parametrize("layout", ["bshd", "sliced"])
@pytest.mark.parametrize("dtype, head_dim", [(BF16, 128), (FP16, 64)])
def test_non_contiguous_inputs_equal_contiguous(gen, poisoned, device, layout, dtype, head_dim):
    """Strided q/k/v (contiguous last dim) give bitwise the same result as their contiguous copies."""
    case = (dtype, head_dim, 16, 3, 2, 2, 50, 61, "random", 0.5, layout)
    q, k, v, mask, keys = make_case(gen, case, device)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = attention(q, k, v, keys, return_lse=True)
    out_c, lse_c = attention(q.contiguous(), k.contiguous(), v.contiguous(), keys, return_lse=True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    check_against_reference(q, k, v, keys, mask, out, lse)


def test_mixed_layouts(gen, device):
    """q, k and v may each have their own strides."""
    q, _, _ = make_qkv(gen, 1, 2, 40, 40, 64, FP16, device, layout="bshd")
    _, k, _ = make_qkv(gen, 1, 2, 40, 70, 64, FP16, device, layout="sliced")
    _, _, v = make_qkv(gen, 1, 2, 40, 70, 64, FP16, device, layout="contiguous")
    mask = make_block_mask(gen, 1, 2, 3, 70, "random", density=0.3, device=device)
    keys = KeySet.from_mask(mask, block_m=16)
    out, lse = attention(q, k, v, keys, return_lse=True)
    check_against_reference(q, k, v, keys, mask, out, lse)


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0, 2])
def test_scale(gen, poisoned, device, scale):
    case = (BF16 if scale != 2 else FP16, 64, 32, 1, 1, 2, 45, 60, "random", 0.5, "contiguous")
    q, k, v, mask, keys = make_case(gen, case, device)
    out, lse = attention(q, k, v, keys, scale=scale, return_lse=True)
    check_against_reference(q, k, v, keys, mask, out, lse, scale=scale)
    # and the scale really is used: the default scale gives a different answer
    default = attention(q, k, v, keys)
    assert not torch.allclose(out.float(), default.float(), atol=TOL[q.dtype][0], rtol=TOL[q.dtype][1])


def test_default_scale_is_inverse_sqrt_head_dim(gen, device):
    q, k, v, mask, keys = make_case(gen, (FP16, 128, 16, 1, 1, 1, 20, 30, "full", None, "contiguous"), device)
    torch.testing.assert_close(attention(q, k, v, keys), attention(q, k, v, keys, scale=1 / math.sqrt(128)),
                               atol=0, rtol=0)


# dtype, head_dim, block_m, block_n, tile_m, tile_n, num_warps, num_stages
VARIANTS = [
    (BF16, 64, 32, 1, 16, 32, 4, 2),
    (FP16, 128, 64, 3, 16, 32, 4, 2),
    (BF16, 128, 32, 16, 32, 16, 8, 1),
    (FP16, 64, 16, 128, 16, 128, 4, 4),
    (BF16, 64, 128, 1, 64, 256, 8, 3),
]


@pytest.mark.parametrize("dtype, head_dim, block_m, block_n, tile_m, tile_n, num_warps, num_stages", VARIANTS)
def test_explicit_variant(gen, poisoned, device, dtype, head_dim, block_m, block_n, tile_m, tile_n, num_warps, num_stages):
    variant = Variant(backend="triton", dtype="bf16" if dtype is BF16 else "fp16", head_dim=head_dim,
                      block_m=block_m, block_n=block_n, tile_m=tile_m, tile_n=tile_n,
                      num_warps=num_warps, num_stages=num_stages)
    default = default_variant(dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n)
    assert (variant.tile_m, variant.tile_n) != (default.tile_m, default.tile_n)
    case = (dtype, head_dim, block_m, block_n, 1, 2, 140, 173, "some_empty", 0.4, "bshd")
    q, k, v, mask, keys = make_case(gen, case, device)
    out, lse = attention(q, k, v, keys, variant=variant, return_lse=True)
    check_against_reference(q, k, v, keys, mask, out, lse)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_reference_backend(gen, device, dtype):
    q, k, v, mask, keys = make_case(gen, (dtype, 64, 16, 3, 1, 2, 40, 50, "some_empty", 0.5, "bshd"), device)
    out, lse = attention(q, k, v, keys, backend="reference", return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, keys, return_lse=True)
    assert out.dtype == dtype
    assert torch.equal(out, ref.to(dtype)) and torch.equal(lse, ref_lse)


def test_reference_empty_rows_and_fp32():
    """The reference itself: zeros and -inf LSE for empty query blocks; fp32 inputs accepted."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, s, 64, generator=g) for s in (40, 30, 30))
    mask = torch.tensor([True, False, True])[None, None, :, None].expand(1, 1, 3, 30).contiguous()
    keys = KeySet.from_mask(mask, block_m=16)
    out, lse = reference_attention(q, k, v, keys, return_lse=True)
    assert out.dtype == torch.float32
    assert (out[0, 0, 16:32] == 0).all() and (lse[0, 0, 16:32] == float("-inf")).all()
    scores = q[0, 0, :16] @ k[0, 0].T / 8
    torch.testing.assert_close(out[0, 0, :16], torch.softmax(scores, -1) @ v[0, 0])
    torch.testing.assert_close(lse[0, 0, :16], torch.logsumexp(scores, -1))


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_tolerances_catch_real_bugs(gen, device, dtype, atol, rtol):
    """The per-dtype tolerances pass the kernel, yet reject a 5 % wrong scale or one dropped key block."""
    q, k, v, mask, keys = make_case(gen, (dtype, 64, 16, 16, 1, 2, 100, 300, "random", 0.5, "contiguous"), device)
    mask[..., 0] = True
    mask[..., 1] = True  # every query block selects >= 2 key blocks
    keys = KeySet.from_mask(mask, block_m=16, block_n=16)
    out = attention(q, k, v, keys).float()
    torch.testing.assert_close(out, reference_attention(q, k, v, keys), atol=atol, rtol=rtol)

    wrong_scale = reference_attention(q, k, v, keys, scale=1.05 / math.sqrt(64))
    assert not torch.allclose(out, wrong_scale, atol=atol, rtol=rtol)

    last = (mask.long() * torch.arange(mask.shape[-1], device=mask.device)).argmax(-1, keepdim=True)
    dropped = mask.scatter(-1, last, False)  # drop the last selected key block of every query block
    wrong_keys = reference_attention(q, k, v, KeySet.from_mask(dropped, block_m=16, block_n=16))
    assert not torch.allclose(out, wrong_keys, atol=atol, rtol=rtol)


def test_predictor_argument(gen, device):
    from functools import partial

    from fgattn_gen import predictors

    q, k, v = (torch.randn(1, 2, 150, 64, generator=gen).to(device, torch.float16) for _ in range(3))
    for predictor in ("pooled_top_p", partial(predictors.pooled_top_p, block_m=32, top_p=0.8)):
        keys = predictors.pooled_top_p(q, k) if predictor == "pooled_top_p" else predictor(q, k)
        torch.testing.assert_close(attention(q, k, v, predictor=predictor), attention(q, k, v, keys), atol=0, rtol=0)
    with pytest.raises(ValueError, match="^keys: pass either"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="^keys: pass either"):
        attention(q, k, v, keys, predictor="pooled_top_p")
    with pytest.raises(ValueError, match="^predictor: expected"):
        attention(q, k, v, predictor="magic")
    with pytest.raises(TypeError, match="^predictor: returned"):
        attention(q, k, v, predictor=lambda q, k: None)
