"""Every bad input to attention() raises ValueError / TypeError naming the offending argument."""

import pytest
import torch

from conftest import make_qkv
from fgattn_gen import KeySet, Variant, attention, reference_attention

B, H, SQ, SK, D = 1, 2, 40, 50, 64
BLOCK_M, BLOCK_N = 16, 3


@pytest.fixture
def inputs(gen, device):
    q, k, v = make_qkv(gen, B, H, SQ, SK, D, torch.float16, device)
    keys = KeySet.full(B, H, SQ, SK, block_m=BLOCK_M, block_n=BLOCK_N, device=device)
    return q, k, v, keys


def variant(**overrides):
    params = dict(backend="triton", dtype="fp16", head_dim=D, block_m=BLOCK_M, block_n=BLOCK_N,
                  tile_m=16, tile_n=32, num_warps=4, num_stages=2)
    params.update(overrides)
    return Variant(**params)


def test_good_inputs_run(inputs):
    q, k, v, keys = inputs
    assert attention(q, k, v, keys).shape == q.shape
    assert attention(q, k, v, keys, variant=variant()).shape == q.shape


# ---------------------------------------------------------------------------------------- q / k / v
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("shape_of", [lambda t: t[0], lambda t: t[None], lambda t: t.flatten(0, 1)],
                         ids=["rank3", "rank5", "rank3_flat"])
def test_wrong_rank(inputs, name, shape_of):
    q, k, v, keys = inputs
    args = dict(q=q, k=k, v=v)
    args[name] = shape_of(args[name])
    with pytest.raises(ValueError, match=rf"^{name}: expected rank 4"):
        attention(args["q"], args["k"], args["v"], keys)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_not_a_tensor(inputs, name):
    q, k, v, keys = inputs
    args = dict(q=q, k=k, v=v)
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor"):
        attention(args["q"], args["k"], args["v"], keys)


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_mismatch(inputs, name, dtype):
    q, k, v, keys = inputs
    args = dict(q=q, k=k, v=v)
    args[name] = args[name].to(dtype)
    with pytest.raises(ValueError, match=rf"^{name}: dtype {dtype} does not match q's torch.float16"):
        attention(args["q"], args["k"], args["v"], keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int8, torch.float8_e4m3fn])
def test_unsupported_dtype(inputs, dtype):
    q, k, v, keys = inputs
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with pytest.raises(ValueError, match=rf"^q: dtype must be one of .*got {dtype}"):
        attention(q, k, v, keys)


def test_reference_dtypes(inputs):
    """The fp32 reference also takes fp32 inputs, but not integers."""
    q, k, v, keys = inputs
    out = reference_attention(q.float(), k.float(), v.float(), keys)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"^q: dtype must be one of"):
        reference_attention(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), keys)


@pytest.mark.parametrize("head_dim", [96, 32, 256, 63])
def test_unsupported_head_dim(gen, head_dim):
    q, k, v = make_qkv(gen, B, H, SQ, SK, head_dim, torch.float16)
    keys = KeySet.full(B, H, SQ, SK, block_m=BLOCK_M, block_n=BLOCK_N)
    with pytest.raises(ValueError, match=rf"^q: head dim must be one of \(64, 128\), got {head_dim}"):
        attention(q, k, v, keys)


@pytest.mark.parametrize("k_shape", [(B + 1, H, SK, D), (B, H + 1, SK, D), (B, H, SK, 128)])
def test_k_shape_mismatch(gen, k_shape):
    q = torch.randn(B, H, SQ, D, generator=gen).half()
    k = torch.randn(*k_shape, generator=gen).half()
    keys = KeySet.full(B, H, SQ, SK, block_m=BLOCK_M, block_n=BLOCK_N)
    with pytest.raises(ValueError, match=r"^k: shape .* does not match q"):
        attention(q, k, k.clone(), keys)


@pytest.mark.parametrize("v_shape", [(B, H, SK + 1, D), (B, H, SK, 128), (B, H + 1, SK, D)])
def test_v_shape_mismatch(gen, v_shape):
    q, k, _ = make_qkv(gen, B, H, SQ, SK, D, torch.float16)
    v = torch.randn(*v_shape, generator=gen).half()
    keys = KeySet.full(B, H, SQ, SK, block_m=BLOCK_M, block_n=BLOCK_N)
    with pytest.raises(ValueError, match=r"^v: shape .* does not match k"):
        attention(q, k, v, keys)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_contiguous_last_dim(gen, name):
    q, k, v = make_qkv(gen, B, H, SQ, SK, 2 * D, torch.float16)
    args = dict(q=q[..., :D].contiguous(), k=k[..., :D].contiguous(), v=v[..., :D].contiguous())
    args[name] = dict(q=q, k=k, v=v)[name][..., ::2]  # head dim D with stride 2
    keys = KeySet.full(B, H, SQ, SK, block_m=BLOCK_M, block_n=BLOCK_N)
    with pytest.raises(ValueError, match=rf"^{name}: the last \(head\) dim must be contiguous"):
        attention(args["q"], args["k"], args["v"], keys)


@pytest.mark.parametrize("name, dim", [("q", 0), ("q", 1), ("q", 2), ("k", 2), ("v", 2)])
def test_empty_dims(gen, name, dim):
    q, k, v = make_qkv(gen, B, H, SQ, SK, D, torch.float16)
    args = dict(q=q, k=k, v=v)
    args[name] = args[name].narrow(dim, 0, 0)
    keys = KeySet.full(B, H, SQ, SK, block_m=BLOCK_M, block_n=BLOCK_N)
    with pytest.raises(ValueError, match=rf"^{name}: every dim must be >= 1"):
        attention(args["q"], args["k"], args["v"], keys)


@pytest.mark.parametrize("name", ["k", "v"])
def test_device_mismatch(inputs, name):
    """Only partly expressible without a GPU: the meta device stands in for another device."""
    q, k, v, keys = inputs
    args = dict(q=q, k=k, v=v)
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}: on meta, but q is on {q.device}"):
        attention(args["q"], args["k"], args["v"], keys)


def test_keys_device_mismatch(inputs):
    q, k, v, _ = inputs
    keys = KeySet.full(B, H, SQ, SK, block_m=BLOCK_M, block_n=BLOCK_N, device="meta")
    with pytest.raises(ValueError, match=rf"^keys: KeySet is on meta but q is on {q.device}"):
        attention(q, k, v, keys)


# ---------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("batch, heads, seq_q, seq_k", [
    (B + 1, H, SQ, SK),        # wrong B
    (B, H + 1, SQ, SK),        # wrong H
    (B, 1, SQ, SK),            # wrong H
    (B, H, SQ + BLOCK_M, SK),  # one query block too many
    (B, H, 16, SK),            # too few query blocks
    (B, H, SQ, SK + BLOCK_N),  # one key block too many
    (B, H, SQ, SK - 3),        # one key block too few
])
def test_keys_shape_mismatch(inputs, batch, heads, seq_q, seq_k):
    q, k, v, _ = inputs
    keys = KeySet.full(batch, heads, seq_q, seq_k, block_m=BLOCK_M, block_n=BLOCK_N)
    with pytest.raises(ValueError, match=r"^keys: KeySet of shape .* does not match"):
        attention(q, k, v, keys)
    with pytest.raises(ValueError, match=r"^keys: KeySet of shape .* does not match"):
        reference_attention(q, k, v, keys)


def test_keys_not_a_keyset(inputs):
    q, k, v, keys = inputs
    with pytest.raises(TypeError, match=r"^keys: expected a fgattn_gen.KeySet"):
        attention(q, k, v, keys.to_mask())


@pytest.mark.parametrize("block_m", [8, 24, 1])
def test_block_m_not_multiple_of_16(gen, device, block_m):
    q, k, v = make_qkv(gen, B, H, SQ, SK, D, torch.float16, device)
    keys = KeySet.full(B, H, SQ, SK, block_m=block_m, block_n=BLOCK_N, device=device)
    with pytest.raises(ValueError, match=r"^keys: block_m must be a multiple of 16"):
        attention(q, k, v, keys)


# ---------------------------------------------------------------------------------------- scale / backend / variant
@pytest.mark.parametrize("scale", [0, 0.0, -0.125, float("nan"), float("inf"), -float("inf"), "0.125",
                                   torch.tensor(0.125)], ids=repr)
def test_bad_scale(inputs, scale):
    q, k, v, keys = inputs
    with pytest.raises(ValueError, match=r"^scale: expected a positive finite float"):
        attention(q, k, v, keys, scale=scale)


@pytest.mark.parametrize("backend", ["cutlass", "Triton", "", "flash"])
def test_bad_backend(inputs, backend):
    q, k, v, keys = inputs
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        attention(q, k, v, keys, backend=backend)


def test_bad_backend_with_variant(inputs):
    """An explicit variant must not bypass the backend check."""
    q, k, v, keys = inputs
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        attention(q, k, v, keys, backend="cutlass", variant=variant())


def test_bad_backend_on_reference_fallback(inputs, monkeypatch):
    """Without the interpreter, CPU inputs fall back to the reference; a bad backend must still raise."""
    q, k, v, keys = (x.to("cpu") for x in inputs)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        attention(q, k, v, keys, backend="cutlass")


@pytest.mark.parametrize("overrides", [dict(head_dim=128), dict(block_m=32), dict(block_n=1), dict(block_n=4)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_variant_not_fitting(inputs, overrides):
    q, k, v, keys = inputs
    with pytest.raises(ValueError, match=r"^variant: .* does not fit"):
        attention(q, k, v, keys, variant=variant(**overrides))


def test_variant_dtype_not_fitting(inputs):
    """A bf16 variant for fp16 inputs must be refused, like a variant of the wrong head dim."""
    q, k, v, keys = inputs
    with pytest.raises(ValueError, match=r"^variant: "):
        attention(q, k, v, keys, variant=variant(dtype="bf16"))


def test_variant_not_a_variant(inputs):
    q, k, v, keys = inputs
    with pytest.raises((TypeError, ValueError), match=r"variant"):
        attention(q, k, v, keys, variant="triton_fp16_d64_qb16_kg3_bm16_bn32_w4_s2")


# ---------------------------------------------------------------------------------------- beyond attention()
def test_autograd_says_inference_only(inputs):
    q, k, v, keys = inputs
    with pytest.raises(RuntimeError, match="^q, k, v: attention\\(\\) is inference-only"):
        attention(q.clone().requires_grad_(True), k, v, keys)
    with torch.no_grad():
        attention(q.clone().requires_grad_(True), k, v, keys, backend="reference")


def test_empty_keyset_is_refused(device):
    with pytest.raises(ValueError, match="^KeySet: bits must have at least one batch"):
        KeySet.from_mask(torch.zeros(0, 2, 3, 40, dtype=torch.bool, device=device), block_m=16)


@pytest.mark.parametrize("density", [0, 1.5, -1, float("nan"), True])
def test_bad_density(inputs, density):
    q, k, v, keys = inputs
    with pytest.raises(ValueError, match="^density: expected a key density in"):
        attention(q, k, v, keys, density=density)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_q=0), "^seq_q: expected an int >= 1"),
    (dict(seq_k=-5), "^seq_k: expected an int >= 1"),
    (dict(density=0.0), "^density: expected a key density"),
    (dict(density=float("nan")), "^density: expected a key density"),
    (dict(device="cpu"), "^device: expected a CUDA device or a GPU name"),
])
def test_registry_lookup_rejects(kwargs, match):
    from fgattn_gen import registry
    args = {**dict(device="NVIDIA H200", dtype=torch.bfloat16, head_dim=128, seq_q=1000, seq_k=1000), **kwargs}
    with pytest.raises(ValueError, match=match):
        registry.lookup(**args)


@pytest.mark.parametrize("where, value, match", [
    (("shape", "seq_q"), 0, r"entries\[0\]\.shape\.seq_q: expected an int >= 1"),
    (("measured", "heads"), 0, r"entries\[0\]\.measured\.heads: expected an int >= 1"),
    (("density",), -1, r"entries\[0\]\.density: expected a key density in \(0, 1\]"),
    (("density",), 1.5, r"entries\[0\]\.density: expected a key density in \(0, 1\]"),
    (("best", "ms"), 0.0, r"entries\[0\]\.best\.ms: expected a time > 0"),
])
def test_tuned_file_ranges(where, value, match):
    """A tuned YAML with a number out of range fails validation (it would break every later lookup)."""
    import copy

    import yaml

    from fgattn_gen.environment import tuned_dir
    from fgattn_gen.tuned import validate_tuned
    data = copy.deepcopy(yaml.safe_load((tuned_dir() / "nvidia-h200" / "hunyuan.yaml").read_text()))
    validate_tuned(data)
    target = data["entries"][0]
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(ValueError, match=match):
        validate_tuned(data)


def test_cached_mask_starts_a_new_generation(gen, device):
    """Step 0 after later steps (a second generation) refreshes even when 0 is the only refresh step."""
    from fgattn_gen.predictors import CachedMask
    q, k, v = make_qkv(gen, 1, 1, 48, 48, 64, torch.bfloat16, device)
    cache = CachedMask(refresh_steps=[0], block_m=16, threshold=0.05)
    steps = [0, 1, 2, 0, 1]
    refreshed = [cache.at(step=s, layer=0).predict(q * (1 + i), k, v).out is not None for i, s in enumerate(steps)]
    assert refreshed == [True, False, False, True, False]
    cache.reset()
    assert cache.needs_refresh(1, layer=0)


def test_threshold_that_keeps_nothing_warns_once(gen, device):
    """pooled_top_p(threshold=0.01) at S=300 (above every pooled probability of flat scores) keeps no key:
    one warning naming the knob (read without a host sync: on the GPU at the next call)."""
    import warnings

    import importlib

    from fgattn_gen.predictors import pooled_top_p
    watch = importlib.import_module("fgattn_gen.predictors.pooled_top_p")._EMPTY
    watch._warned, watch._pending = False, []
    q = (0.01 * torch.randn(1, 2, 300, 64, generator=gen)).to(device, torch.bfloat16)
    with pytest.warns(UserWarning, match="^pooled_top_p: threshold=0.01 kept no key for any query block") as record:
        for _ in range(3):
            pooled_top_p(q, q, threshold=0.01, sim_threshold=-1.0)
            if device == "cuda":
                torch.cuda.synchronize()
    assert sum("kept no key" in str(w.message) for w in record) == 1
    watch._warned = False
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="pooled_top_p")
        pooled_top_p(q, q, threshold=1 / 600, sim_threshold=-1.0)  # keeps keys: no warning
