"""diffusers integration (``fgattn_gen.integrations``) on small randomly initialised HunyuanVideo and Wan
transformers (head_dim 64, a few layers): with every key kept the fgattn processors give SDPA's output, the
predictors run, padded text keys never leak in, steps follow the timesteps, and ``remove()`` restores the
original processors exactly.

CPU: fp16 models (diffusers' ops take fp16 on the CPU) and fgattn's kernels in Triton's interpreter; the
``gpu`` variants run bf16 on CUDA. Skipped when diffusers is not installed (optional extra).
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import TOL

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline, HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402

from fgattn_gen.integrations import install  # noqa: E402
from fgattn_gen.integrations.sparse_attention import SparseSelfAttention  # noqa: E402

DEVICES = [pytest.param(("cpu", torch.float16), id="cpu-fp16"),
           pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=pytest.mark.gpu)]
MODELS = ["hunyuan", "wan"]
FRAMES, HEIGHT, WIDTH = 3, 16, 16  # latents; patch 1x2x2 -> 192 video tokens (two query blocks with the text)
TEXT, VALID_TEXT = 16, (12, 16)  # HunyuanVideo prompt tokens; sample 0 pads its last 4
# Relative L2 error of a whole model's output, fgattn (every key) vs SDPA: both attend in half precision
# with fp32 accumulation; observed ~2e-4 (fp16) and ~3e-3 (bf16) on the CPU.
MODEL_REL_L2 = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_model(name: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if name == "hunyuan":
        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32, pooled_projection_dim=16,
            rope_axes_dim=(16, 24, 24))
    else:
        model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                                      text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.to(device=device, dtype=dtype).eval()


def make_inputs(name: str, device: str, dtype: torch.dtype, *, batch: int | None = None) -> dict:
    """Keyword arguments of one transformer call (default batch: HunyuanVideo 2, Wan 1); HunyuanVideo's
    sample 0 has padded text (``VALID_TEXT``)."""
    gen = torch.Generator().manual_seed(1)
    batch = batch or (2 if name == "hunyuan" else 1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    inputs = dict(hidden_states=randn(batch, 4, FRAMES, HEIGHT, WIDTH), encoder_hidden_states=randn(batch, TEXT, 32),
                  timestep=torch.full((batch,), 900.0, device=device, dtype=dtype))
    if name == "hunyuan":
        valid = torch.arange(TEXT)[None, :] < torch.tensor(VALID_TEXT[:batch])[:, None]
        inputs.update(encoder_attention_mask=valid.to(device), pooled_projections=randn(batch, 16),
                      guidance=torch.full((batch,), 3500.0, device=device, dtype=dtype))
    return inputs


@torch.no_grad()
def forward(model, inputs: dict, timestep: float | None = None) -> torch.Tensor:
    if timestep is not None:
        inputs = dict(inputs, timestep=torch.full_like(inputs["timestep"], timestep))
    return model(**inputs).sample


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------- every key kept
@pytest.mark.parametrize("device_dtype", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_dense_matches_sdpa_and_remove_restores(name, device_dtype):
    device, dtype = device_dtype
    model = make_model(name, device, dtype)
    inputs = make_inputs(name, device, dtype)
    originals = dict(model.attn_processors)
    want = forward(model, inputs)
    handle = install(model, predictor="dense")
    assert handle.layers == 2
    got = forward(model, inputs)
    assert got.isfinite().all()
    assert rel_l2(got, want) < MODEL_REL_L2[dtype]
    handle.remove()
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert torch.equal(forward(model, inputs), want)


def _layer_inputs(name: str, model, inputs: dict):
    """(attention modules, kwargs of one call of each) for a direct processor comparison."""
    hidden = torch.randn(inputs["hidden_states"].shape[0], FRAMES * HEIGHT * WIDTH // 4, 128,
                         generator=torch.Generator().manual_seed(2)).to(inputs["hidden_states"])
    rotary = model.rope(inputs["hidden_states"])
    if name == "wan":
        return [model.blocks[0].attn1], dict(hidden_states=hidden, rotary_emb=rotary)
    text = torch.randn(hidden.shape[0], TEXT, 128, generator=torch.Generator().manual_seed(3)).to(hidden)
    valid = torch.cat([torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device),
                       inputs["encoder_attention_mask"]], 1)
    modules = [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn]
    return modules, dict(hidden_states=hidden, encoder_hidden_states=text, attention_mask=valid[:, None, None],
                         image_rotary_emb=rotary)


@pytest.mark.parametrize("device_dtype", DEVICES)
@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_dense_layer_matches_sdpa(name, device_dtype):
    """Each processor's output against the original's at kernel tolerance; padded text keys (HunyuanVideo
    sample 0) must be left out: attending them would break the tolerance."""
    device, dtype = device_dtype
    model = make_model(name, device, dtype)
    modules, kwargs = _layer_inputs(name, model, make_inputs(name, device, dtype))

    def outputs(**extra):  # HunyuanVideo's processors return (video, text), Wan's the tokens
        return [out if isinstance(out, tuple) else (out,) for out in (m(**{**kwargs, **extra}) for m in modules)]

    wants = outputs()
    with install(model, predictor="dense"):
        gots = outputs()
    atol, rtol = TOL[dtype]
    for got, want in zip(gots, wants):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
    if name == "hunyuan":
        for got, leak in zip(gots, outputs(attention_mask=None)):
            assert not torch.allclose(got[0][0], leak[0][0], atol=atol, rtol=rtol), "test cannot see padded keys"


@torch.no_grad()
def test_padded_text_does_not_reach_the_video():
    """Changing the padded text embeddings leaves HunyuanVideo's output bit for bit unchanged."""
    model = make_model("hunyuan", "cpu", torch.float16)
    inputs = make_inputs("hunyuan", "cpu", torch.float16)
    changed = inputs["encoder_hidden_states"].clone()
    changed[0, VALID_TEXT[0]:] = 7.0
    with install(model, predictor="dense"):
        assert torch.equal(forward(model, inputs), forward(model, dict(inputs, encoder_hidden_states=changed)))


# ---------------------------------------------------------------------------------------- predictors
PREDICTORS = [("pooled_top_p", dict(top_p=0.5, sim_threshold=-1.0)),
              ("cached_exact", dict(refresh_steps=(0,))),
              ("fixed_density", dict(density=0.3))]


@pytest.mark.parametrize("device_dtype", DEVICES)
@pytest.mark.parametrize("predictor, knobs", PREDICTORS, ids=[p for p, _ in PREDICTORS])
@pytest.mark.parametrize("name", MODELS)
def test_predictors_run(name, predictor, knobs, device_dtype):
    """Two denoising steps (one sample, HunyuanVideo's with padded text): finite outputs of the right shape;
    ``cached_exact`` computes one mask per layer at step 0 and reuses it at step 1."""
    device, dtype = device_dtype
    model = make_model(name, device, dtype)
    inputs = make_inputs(name, device, dtype, batch=1)
    dense = forward(model, inputs)
    with install(model, predictor=predictor, **knobs) as handle:
        outs = [forward(model, inputs, t) for t in (900.0, 800.0)]
        (sparse,) = handle.attentions
    for out in outs:
        assert out.shape == dense.shape and out.isfinite().all()
    if predictor == "fixed_density":  # one KeySet (30 % of the key blocks plus the text) for every layer
        (predictor_of_shape,) = sparse._predictors.values()
        (keys,) = predictor_of_shape._built.values()
        assert 0.3 <= keys.density() < 0.5
    if predictor == "cached_exact":
        assert (sparse.step, sparse.branch) == (1, 0)
        (cache,) = sparse.cached_masks()
        assert cache.memory_report()["masks"] == 2
        assert all(entry.step == 0 for entry in cache._entries.values())


def test_steps_follow_timesteps():
    """Smaller timestep: next step; equal: next CFG branch; larger: new generation (masks dropped)."""
    sparse = SparseSelfAttention("cached_exact")
    seen = []
    for t in (900, 900, 800, 800, 700, 900):
        sparse.observe_timestep(torch.tensor([float(t)]))
        seen.append((sparse.step, sparse.branch))
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (0, 0)]


@torch.no_grad()
def test_manual_steps_refresh_on_schedule():
    model = make_model("wan", "cpu", torch.float16)
    inputs = make_inputs("wan", "cpu", torch.float16)
    with install(model, predictor="cached_exact", steps="manual", refresh_steps=(0, 5)) as handle:
        (sparse,) = handle.attentions
        for step in (0, 1, 5):
            handle.set_step(step)
            forward(model, inputs)
            (cache,) = sparse.cached_masks()
            assert [cache._entries[(layer, 0)].step for layer in (0, 1)] == [0 if step < 5 else 5] * 2
        assert not model._forward_pre_hooks


# ---------------------------------------------------------------------------------------- fallback, errors
@torch.no_grad()
def test_fp32_falls_back_to_sdpa_with_one_warning():
    model = make_model("hunyuan", "cpu", torch.float32)
    inputs = make_inputs("hunyuan", "cpu", torch.float32)
    want = forward(model, inputs)
    with install(model, predictor="dense"):
        with pytest.warns(UserWarning, match="torch.float32 inputs") as record:
            got = [forward(model, inputs), forward(model, inputs)]
    assert sum("fgattn" in str(w.message) for w in record) == 1
    assert all(torch.equal(g, want) for g in got)


def test_install_on_a_pipeline():
    class Pipe(DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    model = make_model("wan", "cpu", torch.float16)
    original = model.blocks[0].attn1.processor
    handle = install(Pipe(model), predictor="dense")
    assert handle.layers == 2 and model.blocks[0].attn1.processor is not original
    assert type(model.blocks[0].attn2.processor).__name__ == "WanAttnProcessor"  # cross-attention untouched
    handle.remove()
    assert model.blocks[0].attn1.processor is original


def test_install_errors():
    model = make_model("wan", "cpu", torch.float16)
    with pytest.raises(ValueError, match="predictor"):
        install(model, predictor="top_k")
    with pytest.raises(TypeError, match="top_k"):
        install(model, predictor="pooled_top_p", top_k=3)
    with pytest.raises(ValueError, match="density"):
        install(model, predictor="fixed_density")
    with pytest.raises(ValueError, match="refresh_steps"):
        install(model, predictor="cached_exact", refresh_steps=())
    with pytest.raises(ValueError, match="steps"):
        install(model, predictor="dense", steps="count")
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        install(torch.nn.Linear(2, 2))
    with install(model, predictor="dense"):
        with pytest.raises(RuntimeError, match="remove"):
            install(model, predictor="dense")


def test_importing_the_package_imports_neither_diffusers_nor_triton():
    code = "import sys, fgattn_gen.integrations; assert 'diffusers' not in sys.modules and 'triton' not in sys.modules"
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": path})
