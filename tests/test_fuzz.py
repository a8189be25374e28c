"""Fuzz the public entry points: ``attention``, ``reference_attention``, ``KeySet.from_mask``,
``registry.lookup``. Every call either returns a result of the right shape (and, for finite inputs, the
reference's values) or raises ValueError / TypeError whose message starts with the argument it is about;
no other exception type, no hang.

Hypothesis draws dtypes, odd shapes, strides (transposed, sliced, a strided head dim, expanded), devices (cpu,
meta; cuda on a GPU), NaN / Inf, knob values in and out of range. ``derandomize=True`` and a small
``max_examples`` keep it deterministic and well under a minute on CI's two cores (the kernels run in Triton's
interpreter there)."""

import math
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import HAS_CUDA, TOL  # noqa: E402
from fgattn_gen import KeySet, attention, reference_attention, registry  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEVICES = ["cpu", "meta"] + (["cuda"] if HAS_CUDA else [])
BAD = [0, -1, 1.5, float("nan"), float("inf"), True, "16", None]


def _names_an_argument(exc: Exception, names: tuple[str, ...]) -> bool:
    return re.match(rf"^({'|'.join(map(re.escape, names))})\b", str(exc)) is not None


def _call(fn, names: tuple[str, ...]):
    """``fn()``, or None when it raised ValueError/TypeError naming one of ``names``; anything else fails."""
    try:
        return fn()
    except (ValueError, TypeError) as exc:
        assert _names_an_argument(exc, names), f"{type(exc).__name__} names no argument: {exc}"
        return None


@st.composite
def tensor(draw, shape, dtype, device, layout):
    """A tensor of ``shape`` in ``layout`` (strides) with random values, maybe a NaN / Inf somewhere."""
    b, h, s, d = shape
    base_shape = {"contiguous": (b, h, s, d), "bshd": (b, s, h, d), "sliced": (b, h, s + 2, d + 8),
                  "strided_d": (b, h, s, 2 * d), "expanded": (1, h, s, d)}[layout]
    x = torch.randn(base_shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    poison = draw(st.sampled_from([None, None, float("nan"), float("inf"), -float("inf")]))
    if poison is not None and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = poison
    x = x.to(dtype) if dtype.is_floating_point else (x.clamp(-3, 3) * 10).to(dtype)
    x = x.to(device)
    if layout == "bshd":
        return x.transpose(1, 2)
    if layout == "sliced":
        return x[:, :, 1:s + 1, 4:4 + d]
    if layout == "strided_d":
        return x[..., ::2]
    if layout == "expanded":
        return x.expand(b, h, s, d)
    return x


ATTENTION_FAULTS = ["none"] * 8 + [
    "dtype fp32", "dtype fp64", "dtype int32", "head dim 32", "head dim 63", "strided head dim", "k dtype",
    "v shape", "k device", "k heads", "keys shape", "keys not a KeySet", "block_m 8", "block_m 24", "scale",
    "density", "backend", "backend cuda"]


@st.composite
def attention_case(draw, kernel: bool):
    """Valid inputs over dtypes, odd shapes, strides, devices, NaN / Inf and knobs, then at most one fault."""
    fault = draw(st.sampled_from(ATTENTION_FAULTS))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sq, sk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    d = {"head dim 32": 32, "head dim 63": 63}.get(fault, draw(st.sampled_from([64, 128])))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16] + ([] if kernel else [torch.float32])))
    dtype = {"dtype fp32": torch.float32, "dtype fp64": torch.float64, "dtype int32": torch.int32}.get(fault, dtype)
    device = draw(st.sampled_from(DEVICES))
    layout = "strided_d" if fault == "strided head dim" else draw(
        st.sampled_from(["contiguous", "bshd", "sliced", "expanded"]))
    q = draw(tensor((b, h, sq, d), dtype, device, layout))
    k = draw(tensor((b, h, sk, d), dtype, device, draw(st.sampled_from(["contiguous", "sliced"]))))
    v = draw(tensor((b, h, sk, d), dtype, device, draw(st.sampled_from(["contiguous", "bshd"]))))
    if fault == "k dtype":
        k = k.to(torch.float16 if k.dtype != torch.float16 else torch.bfloat16)
    elif fault == "v shape":
        v = v[:, :, : sk - 1] if sk > 1 else torch.cat([v, v], 2)
    elif fault == "k device":
        k = torch.zeros(k.shape, dtype=k.dtype, device="cpu" if device != "cpu" else "meta")
    elif fault == "k heads":
        k = torch.cat([k, k], 1)
    block_m = {"block_m 8": 8, "block_m 24": 24}.get(fault, draw(st.sampled_from([16, 32, 48, 128])))
    block_n = draw(st.sampled_from([1, 3, 16, 128]))
    keys_shape = (b, h, -(-sq // block_m), -(-sk // block_n))
    if fault == "keys shape":
        keys_shape = (b, h, keys_shape[2] + 1, keys_shape[3])
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    mask = torch.rand(keys_shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < density
    keys = KeySet.from_mask(mask.to(device if device != "meta" else "cpu"), block_m=block_m, block_n=block_n)
    if device == "meta":
        keys = keys.to("meta")
    if fault == "keys not a KeySet":
        keys = mask
    kwargs = {"return_lse": draw(st.booleans())}
    if fault == "scale":
        kwargs["scale"] = draw(st.sampled_from([0, -1.0, float("nan"), float("inf"), "0.1", True]))
    elif draw(st.booleans()):
        kwargs["scale"] = draw(st.sampled_from([0.05, 0.125, 1.0]))
    if kernel:
        if fault == "density":
            kwargs["density"] = draw(st.sampled_from([0, 1.5, -1, float("nan"), True, "0.3"]))
        elif draw(st.booleans()):
            kwargs["density"] = draw(st.sampled_from([1e-6, 0.3, 1.0]))
        if fault == "backend":
            kwargs["backend"] = draw(st.sampled_from(["cutlass", "Triton", "", 3]))
        elif fault == "backend cuda" and not HAS_CUDA:
            kwargs["backend"] = "cuda"
        elif draw(st.booleans()):
            kwargs["backend"] = draw(st.sampled_from(["triton", "reference", None]))
    return q, k, v, keys, kwargs


def _check_result(result, q, k, v, keys, kwargs, out_dtype):
    out, lse = result if kwargs["return_lse"] else (result, None)
    assert out.shape == q.shape and out.dtype == out_dtype and out.device == q.device
    if lse is not None:
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    if q.device.type == "meta" or not all(bool(t.isfinite().all()) for t in (q, k, v)):
        return
    ref = reference_attention(q, k, v, keys, scale=kwargs.get("scale"))
    atol, rtol = TOL.get(q.dtype, (1e-5, 1e-5))
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


ATTENTION_ARGS = ("q", "k", "v", "keys", "KeySet", "scale", "density", "backend", "variant")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy in the interpreter
@settings(max_examples=150, **SETTINGS)
@given(attention_case(kernel=True))
def test_fuzz_attention(case):
    q, k, v, keys, kwargs = case
    result = _call(lambda: attention(q, k, v, keys, **kwargs), ATTENTION_ARGS)
    if result is not None:
        _check_result(result, q, k, v, keys, kwargs, q.dtype)


@settings(max_examples=100, **SETTINGS)
@given(attention_case(kernel=False))
def test_fuzz_reference_attention(case):
    q, k, v, keys, kwargs = case
    result = _call(lambda: reference_attention(q, k, v, keys, **kwargs), ATTENTION_ARGS)
    if result is not None:
        _check_result(result, q, k, v, keys, kwargs, torch.float32)


MASK_FAULTS = ["none"] * 6 + ["dtype", "rank", "empty dim", "a list", "block_m", "block_n"]


@settings(max_examples=150, **SETTINGS)
@given(st.data())
def test_fuzz_keyset_from_mask(data):
    fault = data.draw(st.sampled_from(MASK_FAULTS))
    rank = data.draw(st.sampled_from([3, 5])) if fault == "rank" else 4
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank - 1)] + [data.draw(st.integers(1, 70))]
    if fault == "empty dim":
        shape[data.draw(st.integers(0, rank - 1))] = 0
    dtype = data.draw(st.sampled_from([torch.uint8, torch.int32, torch.float32])) if fault == "dtype" else torch.bool
    device = data.draw(st.sampled_from(DEVICES))
    mask = (torch.rand(shape) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))).to(dtype).to(device)
    if data.draw(st.booleans()):
        mask = mask.transpose(-1, -2)  # not contiguous
    if fault == "a list":
        mask = torch.zeros(shape, dtype=torch.bool).tolist()
    block_m = data.draw(st.sampled_from(BAD)) if fault == "block_m" else data.draw(st.sampled_from([1, 16, 128]))
    block_n = data.draw(st.sampled_from(BAD)) if fault == "block_n" else data.draw(st.sampled_from([1, 3, 128]))
    keys = _call(lambda: KeySet.from_mask(mask, block_m=block_m, block_n=block_n),
                 ("mask", "block_m", "block_n", "KeySet"))
    if keys is None:
        return
    b, h, nq, nk = mask.shape
    assert keys.shape == (b, h, nq, nk) and keys.device == mask.device
    if mask.device.type == "meta":
        return
    assert torch.equal(keys.to_mask(), mask)
    density = keys.density()
    assert 0.0 <= density <= 1.0 and math.isclose(density, mask.float().mean().item(), rel_tol=1e-6)


LOOKUP_GOOD = {
    "device": ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA Test GPU"] + (["cuda", "cuda:0"] if HAS_CUDA else []),
    "dtype": [torch.bfloat16, torch.float16],
    "head_dim": [64, 128],
    "seq_q": [1, 300, 32760, 119056, 2**40],
    "seq_k": [1, 301, 32760, 119056],
    "density": [None, 1e-9, 0.1, 0.3, 1.0],
    "block_n": [1, 3, 128],
    "block_m": [128, 64, 16],
    "backend": [None, "triton"] + (["cuda"] if HAS_CUDA else []),
}
LOOKUP_BAD = {
    "device": ["cpu", "meta", "", torch.device("cpu"), 5, None] + ([] if HAS_CUDA else ["cuda", "cuda:7"]),
    "dtype": [torch.float32, "bf16", None],
    "head_dim": [96, 0, -1, 64.0, True],
    "seq_q": [0, -5, 1.5, None],
    "seq_k": [0, "300"],
    "density": [0, 1.5, -1, float("nan"), float("inf"), True, "0.3"],
    "block_n": [0, -1, 1.0],
    "block_m": [40, 0, 8, None],
    "backend": ["cutlass", 3, "reference"],
}


@settings(max_examples=300, **SETTINGS)
@given(st.data())
def test_fuzz_registry_lookup(data):
    from fgattn_gen.variant import Variant

    kwargs = {name: data.draw(st.sampled_from(values)) for name, values in LOOKUP_GOOD.items()}
    fault = data.draw(st.sampled_from([None, None, *LOOKUP_BAD]))
    if fault is not None:
        kwargs[fault] = data.draw(st.sampled_from(LOOKUP_BAD[fault]))
    if kwargs["backend"] == "cuda" and kwargs["block_m"] % 64:
        kwargs["block_m"] = 128
    variant = _call(lambda: registry.lookup(**kwargs), tuple(kwargs))
    if fault is not None:
        assert variant is None, f"{fault}={kwargs[fault]!r} was accepted"
        return
    assert isinstance(variant, Variant)
    assert (variant.head_dim, variant.block_m, variant.block_n) == (
        kwargs["head_dim"], kwargs["block_m"], kwargs["block_n"])
    assert kwargs["backend"] in (None, variant.backend)
