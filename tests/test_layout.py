"""The package as users get it: a wheel installed away from the checkout serves like the checkout; the
serving path imports no tuner; the public modules are attributes of ``fgattn_gen``; the call's key density
reaches the registry."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fgattn_gen import KeySet, attention, ops, predictors
from fgattn_gen.attention_api import density_bucket

ROOT = Path(__file__).resolve().parent.parent
HUNYUAN_720P = dict(dtype=torch.bfloat16, head_dim=128, seq_q=119056, seq_k=119056, block_m=128, block_n=1)


def _python(code: str, *, cwd: Path, path: Path, **env) -> str:
    """Run ``code`` in a fresh interpreter with ``path`` first on sys.path; returns its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(path), **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_serving_imports_no_tuner(tmp_path):
    """attention(), a registry lookup, the tuned files and the predictors load neither fgattn_gen.tune, optuna,
    rich nor matplotlib."""
    out = _python("""
        import sys, torch
        import fgattn_gen as fg
        q = torch.randn(1, 1, 40, 64, dtype=torch.float16)
        fg.attention(q, q, q, fg.KeySet.full(1, 1, 40, 40, block_m=16), backend="reference")
        fg.registry.lookup(device="NVIDIA H200", dtype=torch.bfloat16, head_dim=128, seq_q=119056, seq_k=119056)
        fg.predictors.pooled_top_p
        print(sorted(m for m in ("optuna", "rich", "matplotlib", "fgattn_gen.tune") if m in sys.modules))
    """, cwd=tmp_path, path=ROOT)
    assert out.strip() == "[]"


def test_public_modules_are_attributes(tmp_path):
    out = _python("""
        import fgattn_gen as fg
        print(fg.predictors.make_predictor.__name__, fg.registry.lookup.__name__,
              fg.integrations.__name__, fg.backends.BACKENDS, fg.ditdata.dit_qkv.__name__)
    """, cwd=tmp_path, path=ROOT)
    assert out.split() == ["make_predictor", "lookup", "fgattn_gen.integrations", "('triton',", "'cuda')", "dit_qkv"]


def test_wheel_installs_and_serves(tmp_path):
    """``pip wheel`` of the checkout, installed into a directory away from it: attention() runs (on the GPU, or
    in Triton's interpreter without one) and the shipped H200 tuned files are served (the CUDA variant they
    name, not the default)."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this Python")
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   cwd=tmp_path, timeout=600)
    (wheel,) = wheels.glob("fgattn-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=600)
    out = _python("""
        import warnings
        warnings.filterwarnings("error", message="fgattn registry")  # a skipped tuned file would warn
        import torch, fgattn_gen
        from fgattn_gen import KeySet, attention, reference_attention, registry
        print(fgattn_gen.__file__)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 45, 64, generator=gen).to(device, torch.float16) for _ in range(3))
        keys = KeySet.from_mask((torch.rand(1, 2, 3, 45, generator=gen) < 0.5).to(device), block_m=16)
        err = (attention(q, k, v, keys).float() - reference_attention(q, k, v, keys)).abs().max().item()
        print(err)
        for density in (1.0, 0.1):
            print(registry.lookup(device="NVIDIA H200", dtype=torch.bfloat16, head_dim=128, seq_q=119056,
                                  seq_k=119056, density=density).key)
    """, cwd=tmp_path, path=site, FGATTN_CACHE_DIR=str(tmp_path / "cache"),
        **({} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}))
    location, err, dense_key, sparse_key = out.split()
    assert Path(location).is_relative_to(site)
    assert float(err) < 2e-2
    assert (dense_key, sparse_key) == ("cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s3",
                                       "cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s2")


@pytest.mark.parametrize("density, key", [
    (1.0, "cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s3"),
    (0.1, "cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s2"),  # the tuned files' winners differ by density here
    (0.07, "cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s2"),
    (-1.0, "cuda_bf16_d128_qb128_kg1_bm128_bn128_w8_s3"),  # unknown: as dense
])
def test_density_reaches_the_lookup(density, key):
    variant = ops.served_variant("NVIDIA H200", variant_key="", density=density, **HUNYUAN_720P)
    assert variant.key == key


def test_attention_passes_the_density_hint(monkeypatch, device):
    """``attention`` hands the op ``density=`` or the KeySet's ``density_hint``, bucketed; -1 when unknown."""
    seen = []
    real = ops.sparse_attention

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ops, "sparse_attention", spy)
    q = torch.randn(1, 1, 40, 64, dtype=torch.float16, device=device)
    keys = KeySet.full(1, 1, 40, 40, block_m=64, device=device)
    attention(q, q, q, keys)
    attention(q, q, q, KeySet(keys.bits, keys.n_kblocks, 64, 1, density_hint=0.3))
    attention(q, q, q, keys, density=0.1)
    assert seen == [-1.0, density_bucket(0.3), density_bucket(0.1)]
    assert abs(density_bucket(0.3) / 0.3 - 1) < 0.2 and density_bucket(1.0) == 1.0
    with pytest.raises(ValueError, match="^density: expected a key density in"):
        attention(q, q, q, keys, density=1.5)


def test_cached_mask_fills_the_density_hint(device):
    """A reused mask carries its density (copied to the host without waiting: known once the copy is done)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(1, 2, 64, 64, generator=gen) * s).to(device, torch.bfloat16) for s in (3, 1, 1))
    cache = predictors.CachedMask(refresh_steps=[0], block_m=16, threshold=0.05)
    refresh = cache.at(step=0, layer=0).predict(q, k, v)
    assert refresh.out is not None and refresh.keys.density_hint is None
    if device == "cuda":
        torch.cuda.synchronize()
    reuse = cache.at(step=1, layer=0).predict(q, k, v)
    assert reuse.out is None
    assert reuse.keys.density_hint == pytest.approx(refresh.keys.density())
