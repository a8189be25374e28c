"""The fgattn diffusers processors under diffusers' context parallelism
(``enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``) on the CPU: P processes on the gloo
backend, Triton's interpreter, small random HunyuanVideo and Wan transformers (4 heads of 64; 60 video tokens
and 12 prompt tokens, so each rank holds an odd 15 and 3 of them at P = 4). With ``cached_exact`` (an exact
mask at the first step, reused at the second) each rank's output equals the one-process output of the same
model with the same processors, and its cached masks hold its H/P heads; the SDPA fallback (fp32) gets
HunyuanVideo's padded prompts right; ring attention is refused.

The workers are this file run as a script (``python test_parallel_diffusers.py RANK WORLD INIT_FILE OUT_DIR``)
with ``TRITON_INTERPRET=1`` in their environment. Two shims make diffusers 0.42.1's context parallelism run on
a CPU-only torch (both in ``_cpu_shims``): ``enable_parallelism`` picks the rank's device as
``rank % torch.accelerator.device_count()``, which is 0 without an accelerator (ZeroDivisionError), so the
workers report one device; and its split hook warns through ``logger.warning_once``, a method that
``transformers`` adds to ``logging.Logger`` (not installed here), so the workers add it.
"""

import warnings
from pathlib import Path

import pytest
import torch

import gloo_workers

pytest.importorskip("diffusers")

HEADS, HEAD_DIM = 4, 64
FRAMES, HEIGHT, WIDTH = 2, 12, 10  # latents; patch 1x2x2 -> 60 video tokens
TEXT, VALID_TEXT = 12, (5, 12)  # HunyuanVideo prompt tokens; sample 0 pads its last 7 (text shards of 2 ranks)
BLOCK_M = 16  # 72 joint tokens: 4 full query blocks and a ragged one
TIMESTEPS = (900.0, 800.0)  # cached_exact: a refresh (dense pass and exact mask), then the mask's reuse
# (model, predictor, knobs, dtype, batch): HunyuanVideo's sample 0 has a padded prompt
CASES = [("hunyuan", "cached_exact", dict(refresh_steps=(0,), top_p=0.3), torch.float16, 1),
         ("wan", "cached_exact", dict(refresh_steps=(0,), top_p=0.3), torch.float16, 1),
         ("hunyuan", "dense", {}, torch.float32, 2)]  # fp32: every layer falls back to SDPA
# Relative L2 error of a whole model's output, P ranks vs one process. The same predictor on the same rows
# gives the same mask, so the outputs agree to rounding (observed: bit-exact with fgattn, 1e-7 for the fp32
# SDPA fallback); keys attended in the wrong order, masks or text range move them by up to the sparse-vs-dense
# gap (observed 1.6e-2 Wan, 1.9e-2 HunyuanVideo), padded keys by up to the padded-vs-unpadded gap (3.6e-3 in
# fp32): the reference asserts both gaps exceed 20 * REL_L2.
REL_L2 = {torch.float16: 5e-4, torch.float32: 1e-5}


def _cpu_shims() -> None:
    import logging

    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = logging.Logger.warning


def make_model(name: str, dtype: torch.dtype):
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if name == "hunyuan":
        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32, pooled_projection_dim=16,
            rope_axes_dim=(16, 24, 24))
    else:
        model = WanTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                      out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.to(dtype=dtype).eval()


def make_inputs(name: str, dtype: torch.dtype, batch: int) -> dict:
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    inputs = dict(hidden_states=randn(batch, 4, FRAMES, HEIGHT, WIDTH), encoder_hidden_states=randn(batch, TEXT, 32),
                  return_dict=False)  # diffusers' context-parallel output hook takes tensors only
    if name == "hunyuan":
        inputs.update(encoder_attention_mask=torch.arange(TEXT)[None, :] < torch.tensor(VALID_TEXT[:batch])[:, None],
                      pooled_projections=randn(batch, 16), guidance=torch.full((batch,), 3500.0, dtype=dtype))
    return inputs


def run_case(name: str, predictor: str, knobs: dict, dtype: torch.dtype, batch: int, world: int) -> dict:
    """One model with fgattn through ``TIMESTEPS``: the outputs and the head count of every cached mask. With
    ``world > 1`` under context parallelism: HunyuanVideo installs fgattn after ``enable_parallelism``, Wan
    before (diffusers then sets the config on fgattn's processors, and ``remove()`` hands it to the originals)."""
    from diffusers import ContextParallelConfig

    from fgattn_gen.integrations import install
    from fgattn_gen.integrations.hunyuan_video import context_parallel_plan

    model, inputs = make_model(name, dtype), make_inputs(name, dtype, batch)
    config = ContextParallelConfig(ulysses_degree=world) if world > 1 else None
    plan = context_parallel_plan(model) if name == "hunyuan" else None
    if config is not None and name == "hunyuan":
        model.enable_parallelism(config=config, cp_plan=plan)
    handle = install(model, predictor=predictor, block_m=BLOCK_M, **knobs)
    if config is not None and name == "wan":
        model.enable_parallelism(config=config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fp32 fallback's warning; diffusers' experimental-feature notes
        outs = [model(**inputs, timestep=torch.full((batch,), t, dtype=dtype))[0] for t in TIMESTEPS]
    (sparse,) = handle.attentions
    masks = [cache.keys(layer) for cache in sparse.cached_masks() for layer in range(handle.layers)]
    result = dict(outs=outs, mask_heads=[keys.bits.shape[1] for keys in masks],
                  density=min((keys.density() for keys in masks), default=None))
    handle.remove()
    processors = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_parallel_config")]
    result["restored_config"] = all(p._parallel_config is model._parallel_config for p in processors)
    return result


def ring_errors() -> list[str]:
    """ValueError messages of ``ring_degree=2``: install after ``enable_parallelism``, and a forward of a model
    that installed fgattn before it (every rank raises in the first layer, before any collective)."""
    from diffusers import ContextParallelConfig

    from fgattn_gen.integrations import install

    errors = []
    model = make_model("wan", torch.float16)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    try:
        install(model, predictor="dense")
    except ValueError as e:
        errors.append(str(e))
    model = make_model("wan", torch.float16)
    install(model, predictor="dense")
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    try:
        with torch.no_grad():
            model(**make_inputs("wan", torch.float16, 1), timestep=torch.full((1,), 900.0, dtype=torch.float16))
    except ValueError as e:
        errors.append(str(e))
    return errors


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _cpu_shims()
    with gloo_workers.process_group(rank, world, init_file):
        results = {case_id(case): run_case(*case, world=world) for case in CASES}
        results["ring"] = ring_errors() if world == 2 else None
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def run_workers(world: int, tmp_path: Path) -> list[dict]:
    return gloo_workers.run_workers(__file__, world, tmp_path, timeout=300)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def case_id(case: tuple) -> str:
    return f"{case[0]}-{case[1]}-{str(case[3]).removeprefix('torch.')}"


@torch.no_grad()
def without_fgattn(name: str, dtype: torch.dtype, batch: int, **changes) -> torch.Tensor:
    """The model's own output (diffusers' SDPA, one process) at the last timestep."""
    inputs = dict(make_inputs(name, dtype, batch), **changes)
    return make_model(name, dtype)(**inputs, timestep=torch.full((batch,), TIMESTEPS[-1], dtype=dtype))[0]


@pytest.fixture(scope="module")
def single_process() -> dict:
    """Every case in this process, without parallelism, and checks that the data can fail the comparison: the
    reused sparse masks move the output far from dense attention's, and the padded prompt matters."""
    results = {case_id(case): run_case(*case, world=1) for case in CASES}
    for case in CASES:
        name, predictor, _, dtype, batch = case
        result = results[case_id(case)]
        if predictor == "cached_exact":
            assert set(result["mask_heads"]) == {HEADS} and result["density"] < 0.8, (case, result)
            assert rel_l2(result["outs"][-1], without_fgattn(name, dtype, batch)) > 20 * REL_L2[dtype], case
        if name == "hunyuan":  # sample 0 without its padding
            every_token = torch.ones(batch, TEXT, dtype=torch.bool)
            unpadded = without_fgattn(name, dtype, batch, encoder_attention_mask=every_token)
            assert rel_l2(result["outs"][-1][0], unpadded[0]) > 20 * REL_L2[dtype], case
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks(P)``: each rank's results under ``ContextParallelConfig(ulysses_degree=P)`` (one run per P)."""
    runs = {}

    def of(world: int) -> list[dict]:
        if world not in runs:
            runs[world] = run_workers(world, tmp_path_factory.mktemp(f"cp{world}"))
        return runs[world]

    return of


@pytest.mark.parametrize("case", [case_id(c) for c in CASES])
@pytest.mark.parametrize("world", [2, 4], ids=lambda world: f"P{world}")
def test_context_parallel_matches_one_process(world, case, single_process, ranks):
    want = single_process[case]
    for rank, result in enumerate(ranks(world)):
        result = result[case]
        for step, (got, ref) in enumerate(zip(result["outs"], want["outs"])):
            assert got.shape == ref.shape and got.dtype == ref.dtype and got.isfinite().all()
            assert rel_l2(got, ref) < REL_L2[ref.dtype], \
                f"{case}, P={world}, rank {rank}, step {step}: rel L2 {rel_l2(got, ref):.2e}"
        assert result["restored_config"], f"{case}, P={world}, rank {rank}: remove() lost the parallel config"
        # as many cached masks as in one process (one per layer), each of this rank's H/P heads
        assert len(result["mask_heads"]) == len(want["mask_heads"])
        assert set(result["mask_heads"]) <= {HEADS // world}, result["mask_heads"]


def test_ring_degree_is_refused(ranks):
    for result in ranks(2):
        assert len(result["ring"]) == 2
        for message in result["ring"]:
            assert "ContextParallelConfig.ring_degree=2" in message and "ulysses_degree" in message, message


if __name__ == "__main__":
    gloo_workers.main(worker)
