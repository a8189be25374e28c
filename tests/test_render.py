"""Variants, template rendering (StrictUndefined) and the on-disk build cache."""

import ast
import os
import re
import dataclasses
import itertools

import jinja2
import pytest
import torch

from fgattn_gen import Variant, default_variant, environment, render
from fgattn_gen.backends.triton import launch as triton_launch
from fgattn_gen.variant import BACKENDS, DTYPES, HEAD_DIMS

TEMPLATE = "triton/gather_attention.py.j2"


def make_variant(**overrides) -> Variant:
    params = dict(backend="triton", dtype="bf16", head_dim=128, block_m=128, block_n=1,
                  tile_m=128, tile_n=64, num_warps=8, num_stages=3)
    params.update(overrides)
    return Variant(**params)


def template_context(variant: Variant, interpret: bool = False) -> dict:
    return dict(variant.params, key=variant.key, tl_dtype={"bf16": "tl.bfloat16", "fp16": "tl.float16"}[variant.dtype],
                dot_fp32=interpret)


# ---------------------------------------------------------------------------------------- Variant
def test_key_example_from_docs():
    assert make_variant().key == "triton_bf16_d128_qb128_kg1_bm128_bn64_w8_s3"


def test_key_names_every_parameter():
    base = make_variant(dtype="fp16", head_dim=64, block_m=64, block_n=3, tile_m=32, tile_n=32,
                        num_warps=4, num_stages=2)
    assert base.key == "triton_fp16_d64_qb64_kg3_bm32_bn32_w4_s2"
    changes = dict(dtype="bf16", head_dim=128, block_m=128, block_n=16, tile_m=16, tile_n=128,
                   num_warps=8, num_stages=4)
    keys = {base.key}
    fields = [f.name for f in dataclasses.fields(Variant)]
    # backend: a Triton variant stays Triton; order / persist (CUDA only): tests/test_cuda_schedule.py
    assert set(fields) == set(changes) | {"backend", "order", "persist"}
    for name, value in changes.items():
        other = dataclasses.replace(base, **{name: value})
        assert other.key != base.key, name
        assert str(value) in other.key
        keys.add(other.key)
    assert len(keys) == len(changes) + 1
    assert base.key.startswith("triton_")


def test_params_round_trip():
    v = make_variant(block_n=7, tile_n=16)
    assert Variant(**v.params) == v
    assert hash(Variant(**v.params)) == hash(v)  # usable as a cache key


@pytest.mark.parametrize("overrides, problem", [
    (dict(head_dim=96), "head_dim must be one of"),
    (dict(head_dim=256), "head_dim must be one of"),
    (dict(block_m=64, tile_m=128), "must divide the query block"),
    (dict(block_m=48, tile_m=32), "must divide the query block"),
    (dict(block_m=0, tile_m=16), "must divide the query block"),
    (dict(tile_m=8, block_m=16), r"tile_m \(BLOCK_M\) must be a power of two"),
    (dict(tile_m=48, block_m=96), r"tile_m \(BLOCK_M\) must be a power of two"),
    (dict(tile_m=512, block_m=512), r"tile_m \(BLOCK_M\) must be a power of two"),
    (dict(tile_n=8), r"tile_n \(BLOCK_N\) must be a power of two"),
    (dict(tile_n=96), r"tile_n \(BLOCK_N\) must be a power of two"),
    (dict(block_n=0), "block_n"),
    (dict(num_warps=2), "num_warps must be 4 or 8"),
    (dict(num_stages=0), r"num_stages must be in \[1, 6\]"),
    (dict(num_stages=7), r"num_stages must be in \[1, 6\]"),
    (dict(backend="cutlass"), "backend must be one of"),
    (dict(dtype="fp32"), "dtype must be one of"),
])
def test_invalid_variants(overrides, problem):
    with pytest.raises(ValueError, match=r"^invalid variant (triton|cuda|cutlass)_") as info:
        make_variant(**overrides)
    assert re.search(problem, str(info.value)), str(info.value)


def test_invalid_variant_lists_every_problem():
    with pytest.raises(ValueError) as info:
        make_variant(head_dim=96, num_warps=3, num_stages=9)
    msg = str(info.value)
    assert "head_dim" in msg and "num_warps" in msg and "num_stages" in msg


@pytest.mark.parametrize("head_dim, block_m, tile_m", [
    (64, 16, 16), (64, 32, 32), (64, 48, 16), (64, 64, 64), (64, 96, 32), (64, 128, 64), (64, 384, 64),
    (128, 16, 16), (128, 64, 64), (128, 128, 128), (128, 256, 128), (128, 384, 128),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_variant(head_dim, block_m, tile_m, dtype):
    v = default_variant(dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=5)
    assert v.problems() == []
    assert (v.tile_m, v.block_m, v.block_n, v.head_dim) == (tile_m, block_m, 5, head_dim)
    assert v.smem_bytes() <= 227 * 1024
    assert v.dtype == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def test_default_variant_fits_small_shared_memory():
    v = default_variant(dtype=torch.float16, head_dim=128, block_m=128, block_n=1, smem_limit=100 * 1024)
    assert v.smem_bytes() <= 100 * 1024


def test_default_variant_rejects():
    with pytest.raises(ValueError, match="block_m must be a multiple of 16"):
        default_variant(dtype=torch.float16, head_dim=64, block_m=40, block_n=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        default_variant(dtype=torch.float32, head_dim=64, block_m=64, block_n=1)
    with pytest.raises(ValueError, match="head_dim"):
        default_variant(dtype=torch.float16, head_dim=96, block_m=64, block_n=1)


# ---------------------------------------------------------------------------------------- rendering
def test_environment_is_strict():
    env = render._environment(environment.templates_dir())
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("x = {{ missing }}").render()


@pytest.mark.parametrize("missing", ["key", "head_dim", "block_m", "block_n", "tile_m", "tile_n", "num_warps",
                                     "num_stages", "tl_dtype", "dot_fp32", "dtype"])
@pytest.mark.parametrize("block_n", [1, 4])
def test_template_missing_variable_raises(missing, block_n):
    """Every variable the template uses is required: leaving any one out raises instead of rendering ''."""
    variant = make_variant(block_n=block_n, dtype="fp16")
    context = template_context(variant)
    template = render._environment(environment.templates_dir()).get_template(TEMPLATE)
    template.render(**context)  # complete context renders
    del context[missing]  # (tl_dtype is only used by the non-interpreter form: dot_fp32 is False here)
    with pytest.raises(jinja2.UndefinedError, match=missing):
        template.render(**context)


def test_render_pins_parameters():
    v = make_variant(dtype="fp16", head_dim=64, block_m=96, block_n=5, tile_m=32, tile_n=16, num_warps=4,
                     num_stages=2)
    src = render.render(v)
    for line in [f'KEY = "{v.key}"', "HEAD_DIM = 64", "QUERY_BLOCK = 96", "KEY_GRAN = 5", "TILE_M = 32",
                 "TILE_N = 16", "NUM_WARPS = 4", "NUM_STAGES = 2"]:
        assert line in src.splitlines(), line
    assert "tl.float16" in src and "tl.bfloat16" not in src
    assert "{{" not in src and "{%" not in src
    assert src == render.render(v)  # deterministic
    interp = render.render(v, interpret=True)
    assert interp != src and "to(tl.float32)" in interp


def test_render_uses_templates_env(tmp_path, monkeypatch):
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "gather_attention.py.j2").write_text("KEY = '{{ key }}'\n{{ not_provided }}\n")
    monkeypatch.setenv("FGATTN_TEMPLATES", str(tmp_path))
    assert environment.templates_dir() == tmp_path
    with pytest.raises(jinja2.UndefinedError, match="not_provided"):
        render.render(make_variant())


SPREAD = [
    make_variant(dtype=dt, head_dim=d, block_m=bm, block_n=bn, tile_m=tm, tile_n=tn, num_warps=w, num_stages=s)
    for (dt, d), (bm, tm), (bn, tn), (w, s) in zip(
        itertools.cycle(itertools.product(DTYPES, HEAD_DIMS)),
        [(16, 16), (128, 64), (64, 64), (48, 16), (256, 128), (32, 32), (128, 128), (96, 32)],
        [(1, 16), (3, 32), (16, 64), (128, 128), (1, 256), (7, 64), (1, 64), (2, 32)],
        itertools.cycle([(4, 1), (8, 3), (4, 6), (8, 2)]),
    )
]


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("variant", SPREAD, ids=lambda v: v.key)
def test_rendered_source_compiles(variant, interpret):
    src = render.render(variant, interpret=interpret)
    code = compile(src, f"{variant.key}.py", "exec")
    assert code is not None
    tree = ast.parse(src)
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert {"kernel", "_tile_step"} <= functions
    assert ("offs_n // " in src) == (variant.block_n > 1)


def test_spread_covers_axes():
    assert {v.backend for v in SPREAD} == set(BACKENDS) - {"cuda"}  # CUDA sources: tests/test_cuda_variant.py
    assert {v.dtype for v in SPREAD} == set(DTYPES)
    assert {v.head_dim for v in SPREAD} == set(HEAD_DIMS)
    assert 1 in {v.block_n for v in SPREAD} and any(v.block_n > 1 for v in SPREAD)


# ---------------------------------------------------------------------------------------- build cache
@pytest.fixture
def fresh_build_cache(tmp_path, monkeypatch):
    """An empty FGATTN_CACHE_DIR and an empty in-process load() cache (cleared again afterwards, so no
    later test gets a module from this test's temporary directory)."""
    monkeypatch.setenv("FGATTN_CACHE_DIR", str(tmp_path))
    triton_launch.load.cache_clear()
    yield tmp_path
    triton_launch.load.cache_clear()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FGATTN_CACHE_DIR", str(tmp_path / "x"))
    assert environment.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FGATTN_CACHE_DIR")
    assert environment.cache_dir().parts[-3:] == (".cache", "fgattn", "0.1.0")


@pytest.mark.parametrize("interpret", [False, True])
def test_source_cached_by_content_hash(fresh_build_cache, interpret):
    v = make_variant(dtype="fp16", head_dim=64, block_m=32, block_n=3, tile_m=16, tile_n=32, num_warps=4,
                     num_stages=2)
    src = render.render(v, interpret=interpret)
    path = triton_launch.source_path(v, interpret=interpret)
    assert path == fresh_build_cache / "triton" / f"{v.key}-{render.source_hash(src)}.py"
    assert path.read_text() == src
    assert len(render.source_hash(src)) == 16
    mtime = path.stat().st_mtime_ns
    assert triton_launch.source_path(v, interpret=interpret) == path
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    other = triton_launch.source_path(v, interpret=not interpret)  # different source, different file
    assert other != path and other.name.startswith(v.key + "-")
    assert sorted(p.name for p in (fresh_build_cache / "triton").iterdir()) == sorted([path.name, other.name])


def test_source_path_does_not_rewrite_existing(fresh_build_cache, monkeypatch):
    v = make_variant()
    triton_launch.source_path(v)
    writes = []
    monkeypatch.setattr(triton_launch, "write_atomic", lambda p, t: writes.append(p))
    triton_launch.source_path(v)
    assert writes == []


def test_load_renders_once_and_returns_same_module(fresh_build_cache, monkeypatch):
    v = make_variant(dtype="bf16", head_dim=64, block_m=64, block_n=16, tile_m=32, tile_n=64, num_warps=4,
                     num_stages=3)
    calls = []
    real_render = triton_launch.render

    def counting_render(variant, **kwargs):
        calls.append((variant.key, kwargs))
        return real_render(variant, **kwargs)

    monkeypatch.setattr(triton_launch, "render", counting_render)
    m1 = triton_launch.load(v, interpret=True)
    m2 = triton_launch.load(v, interpret=True)
    assert m1 is m2
    assert calls == [(v.key, {"interpret": True})]
    assert (m1.KEY, m1.HEAD_DIM, m1.QUERY_BLOCK, m1.KEY_GRAN, m1.TILE_M, m1.TILE_N, m1.NUM_WARPS, m1.NUM_STAGES) == \
        (v.key, 64, 64, 16, 32, 64, 4, 3)
    assert callable(m1.kernel)
    assert len(list((fresh_build_cache / "triton").glob("*.py"))) == 1
    assert not list((fresh_build_cache / "triton").glob("*.tmp"))
    assert triton_launch.load(dataclasses.replace(v), interpret=True) is m1  # an equal variant hits the cache too
    assert len(calls) == 1


def test_reused_cache_file_is_not_rerendered_to_disk(fresh_build_cache):
    """A second process (emulated by clearing load()'s cache) imports the existing file."""
    v = make_variant(dtype="fp16")
    m1 = triton_launch.load(v)
    files = list((fresh_build_cache / "triton").iterdir())
    triton_launch.load.cache_clear()
    m2 = triton_launch.load(v)
    assert m2 is not m1 and m2.KEY == m1.KEY
    assert list((fresh_build_cache / "triton").iterdir()) == files


# ---------------------------------------------------------------------------------------- verified caches
SMALL = dict(backend="triton", dtype="fp16", head_dim=64, block_m=16, block_n=1, tile_m=16, tile_n=32, num_warps=4,
             num_stages=2)


def _tamper(path, how: str) -> None:
    text = path.read_text()
    if how == "append":
        path.write_text(text + "\nraise RuntimeError('appended code ran')\n")
    elif how == "edit":  # a valid kernel that computes something else
        assert "acc = acc * alpha[:, None]" in text
        path.write_text(text.replace("acc = acc * alpha[:, None]", "acc = acc * alpha[:, None] * 0.5"))
    else:
        path.write_bytes(path.read_bytes()[: len(text) // 2])


@pytest.mark.parametrize("how", ["append", "edit", "truncate"])
def test_tampered_cached_source_is_rendered_again(fresh_build_cache, gen, how):
    """A cached source whose bytes do not hash to its name is rendered again (one warning), never run."""
    import warnings

    from conftest import TOL
    from fgattn_gen import KeySet, attention, reference_attention

    v = Variant(**SMALL)
    q, k, vv = (torch.randn(1, 1, 40, 64, generator=gen).half() for _ in range(3))
    keys = KeySet.from_mask(torch.rand(1, 1, 3, 40, generator=gen) < 0.5, block_m=16)
    first = attention(q, k, vv, keys, variant=v)
    path = triton_launch.source_path(v, interpret=environment.interpreting())
    _tamper(path, how)
    triton_launch.load.cache_clear()  # a new process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = attention(q, k, vv, keys, variant=v)
        attention(q, k, vv, keys, variant=v)
    ours = [w for w in caught if "does not hash" in str(w.message)]
    assert len(ours) == 1 and str(path) in str(ours[0].message)
    assert torch.equal(again, first)
    torch.testing.assert_close(again.float(), reference_attention(q, k, vv, keys), atol=TOL[torch.float16][0],
                               rtol=TOL[torch.float16][1])
    assert path.read_text() == render.render(v, interpret=environment.interpreting())


@pytest.mark.parametrize("how", ["append", "edit", "truncate", "renamed"])
def test_cubin_cache_is_verified(fresh_build_cache, how):
    from fgattn_gen import nvrtc

    builds = []

    def build() -> bytes:
        builds.append(1)
        return bytes(range(256)) * 4

    stem = "fgattn_test_kernel-0123456789abcdef"
    assert nvrtc.cached_build(stem, build) == bytes(range(256)) * 4
    assert nvrtc.cached_build(stem, build) == bytes(range(256)) * 4 and len(builds) == 1
    (path,) = (fresh_build_cache / "cuda").glob(f"{stem}-*.cubin")
    data = path.read_bytes()
    if how == "append":
        path.write_bytes(data + b"\0extra")
    elif how == "edit":
        path.write_bytes(data[:10] + b"X" + data[11:])
    elif how == "truncate":
        path.write_bytes(data[:100])
    else:
        path.rename(path.with_name(f"{stem}-{'0' * 16}.cubin"))
    with pytest.warns(RuntimeWarning, match="is not what was built") as record:
        assert nvrtc.cached_build(stem, build) == bytes(range(256)) * 4
    assert len([w for w in record if "is not what was built" in str(w.message)]) == 1
    assert len(builds) == 2
    (path,) = (fresh_build_cache / "cuda").glob(f"{stem}-*.cubin")
    assert path.read_bytes() == bytes(range(256)) * 4
    assert nvrtc.cached_build(stem, build) == bytes(range(256)) * 4 and len(builds) == 2


def test_unwritable_cache_dir_falls_back_to_a_temporary_one(tmp_path, monkeypatch):
    import warnings

    from conftest import unwritable_dir

    root = unwritable_dir(tmp_path)
    monkeypatch.setenv("FGATTN_CACHE_DIR", str(root))
    triton_launch.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="FGATTN_CACHE_DIR") as record:
            fallback = environment.cache_dir()
        assert len(record) == 1 and str(root) in str(record[0].message)
        assert fallback != root and fallback.is_dir()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert environment.cache_dir() == fallback  # warned once
            path = triton_launch.source_path(make_variant())
        assert path.parent.parent == fallback and path.is_file()
    finally:
        triton_launch.load.cache_clear()


def test_write_atomic_gives_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        environment.write_atomic(tmp_path / "a.txt", "x")
        environment.write_atomic(tmp_path / "b.bin", b"y", fsync=True)
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]
