"""Registry lookup: order and fallbacks, rejected files (one warning each), thread safety, shipped files."""

import copy
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import triton
import yaml

from fgattn_gen import __version__, default_variant, registry
from fgattn_gen.registry import Registry
from fgattn_gen.catalogue import space_hash
from fgattn_gen.variant import Variant

GPU = "NVIDIA Test GPU"
LAYOUT = dict(dtype="bf16", head_dim=128, block_m=128, block_n=1)


def _variant(tile_n: int, stages: int) -> Variant:
    return Variant(backend="triton", **LAYOUT, tile_m=128, tile_n=tile_n, num_warps=8, num_stages=stages)


def _result(v: Variant, ms: float) -> dict:
    return {"key": v.key, "backend": v.backend, "params": v.params, "ms": ms, "ms_p20": ms, "ms_p80": ms}


def _entry(seq: int, density: float, best: Variant) -> dict:
    return {"label": f"s{seq}", "shape": {"batch": 1, "heads": 24, "seq_q": seq, "seq_k": seq, **LAYOUT},
            "measured": {"batch": 1, "heads": 1, "seq_q": seq, "seq_k": seq}, "density": density,
            "best": _result(best, 1.0), "runners_up": [], "n_trials": 1, "n_pruned": 0}


A, B, C = _variant(64, 2), _variant(64, 3), _variant(32, 3)
ENTRIES = [_entry(32760, 1.0, A), _entry(32760, 0.3, B), _entry(75600, 0.3, C), _entry(75600, 0.1, C)]


def _document(**meta) -> dict:
    metadata = {"fgattn": __version__, "torch": str(torch.__version__), "triton": str(triton.__version__), "optuna": "5.0.0",
                "cuda": "13.0", "gpu": GPU, "sm": "9.0", "search_space_hash": space_hash("triton", **LAYOUT),
                "date": "2026-11-27T00:00:00+00:00", "interpret": False, "model": "test", "tuned_heads_note": "x"}
    metadata.update(meta)
    return {"schema": 1, "metadata": metadata, "entries": copy.deepcopy(ENTRIES)}


def _registry(tmp_path, *documents) -> Registry:
    for i, doc in enumerate(documents):
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
        (tmp_path / f"model{i}.yaml").write_text(text)
    return Registry([tmp_path])


def _lookup(reg: Registry, seq: int, density, **layout) -> Variant:
    args = {**LAYOUT, **layout}
    return reg.lookup(gpu=GPU, seq_q=seq, seq_k=seq, density=density, **args)


def test_exact_entry(tmp_path):
    reg = _registry(tmp_path, _document())
    assert _lookup(reg, 32760, 1.0) == A
    assert _lookup(reg, 32760, 0.3) == B
    assert _lookup(reg, 75600, 0.1) == C


def test_nearest_bucket(tmp_path):
    reg = _registry(tmp_path, _document())
    assert _lookup(reg, 33000, 0.9) == A      # nearest sequence length, then density
    assert _lookup(reg, 30000, 0.35) == B
    assert _lookup(reg, 70000, 0.5) == C
    assert _lookup(reg, 32760, None) in (A, B)  # unknown density: an entry of this length


def test_most_frequent_when_no_bucket_is_near(tmp_path):
    reg = _registry(tmp_path, _document())
    assert _lookup(reg, 4096, 0.3) == C  # C is best in two entries


def test_default_for_unknown_layout_or_gpu(tmp_path):
    reg = _registry(tmp_path, _document())
    assert _lookup(reg, 32760, 0.3, head_dim=64) == default_variant(
        dtype=torch.bfloat16, head_dim=64, block_m=128, block_n=1)
    with pytest.warns(UserWarning, match="tuned on 'NVIDIA Test GPU'"):  # a user-dir file of another GPU
        assert reg.lookup(gpu="Other GPU", seq_q=32760, seq_k=32760, density=0.3, **LAYOUT) == default_variant(
            dtype=torch.bfloat16, **{k: LAYOUT[k] for k in ("head_dim", "block_m", "block_n")})


def test_file_of_a_two_backend_search_is_served(tmp_path):
    """search_backends names the space the file's hash covers; the best may be a CUDA variant."""
    cuda = Variant(backend="cuda", **LAYOUT, tile_m=128, tile_n=128, num_warps=8, num_stages=2)
    doc = _document(search_backends=["triton", "cuda"], search_space_hash=space_hash(("triton", "cuda"), **LAYOUT))
    doc["entries"][0]["best"] = _result(cuda, 0.9)
    reg = _registry(tmp_path, doc)
    assert _lookup(reg, 32760, 1.0) == cuda
    assert _lookup(reg, 32760, 0.3) == B
    assert _lookup(reg, 32760, 1.0, backend="triton") == B  # attention(backend="triton"): the best Triton entry
    assert _lookup(reg, 75600, 0.1, backend="cuda") == cuda  # the only CUDA entry of the layout
    assert _lookup(reg, 32760, 1.0, head_dim=64, backend="cuda") == default_variant(
        dtype=torch.bfloat16, head_dim=64, block_m=128, block_n=1, backend="cuda")
    (tmp_path / "stale").mkdir()
    stale = _document(search_backends=["triton", "cuda"])  # the Triton-only hash under a two-backend claim
    with pytest.warns(UserWarning, match="search space"):
        assert _lookup(_registry(tmp_path / "stale", stale), 32760, 1.0) == default_variant(
            dtype=torch.bfloat16, head_dim=128, block_m=128, block_n=1)


@pytest.mark.parametrize("meta, reason", [
    ({"triton": "0.0.1"}, "Triton 0.0.1"),
    ({"fgattn": "9.9.0"}, "fgattn 9.9.0"),
    ({"search_space_hash": "0" * 64}, "search space"),
    ({"interpret": True}, "interpreter"),
    ({"gpu": "NVIDIA Other"}, "tuned on 'NVIDIA Other'"),
])
def test_mismatched_file_is_skipped_with_one_warning(tmp_path, meta, reason):
    reg = _registry(tmp_path, _document(**meta))
    with pytest.warns(UserWarning, match=reason) as record:
        assert _lookup(reg, 32760, 1.0) == default_variant(dtype=torch.bfloat16, head_dim=128, block_m=128, block_n=1)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lookup(reg, 75600, 0.3)  # the same file is not reported again


@pytest.mark.parametrize("text", ["entries: [unclosed", "schema: 1\nmetadata: {}\nentries: []\n", "- just a list\n"])
def test_corrupt_file_is_skipped_and_others_served(tmp_path, text):
    reg = _registry(tmp_path, text, _document())
    with pytest.warns(UserWarning, match="not a valid tuned file") as record:
        assert _lookup(reg, 32760, 1.0) == A
    assert len(record) == 1


def test_concurrent_lookups_load_once(tmp_path, monkeypatch):
    reg = _registry(tmp_path, _document())
    loads = []
    original = Registry._load
    monkeypatch.setattr(Registry, "_load", lambda self, gpu: loads.append(gpu) or original(self, gpu))
    results, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append([_lookup(reg, seq, d) for seq, d in ((32760, 1.0), (75600, 0.1), (4096, 0.3))])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [GPU]
    assert all(r == [A, C, C] for r in results)


def test_module_lookup_reads_user_dirs_and_caches(tmp_path, monkeypatch):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_document()))
    monkeypatch.setenv("FGATTN_TUNED_PATH", str(tmp_path))
    registry.reload()
    try:
        kwargs = dict(device=GPU, dtype=torch.bfloat16, head_dim=128, seq_q=32760, seq_k=32760, density=0.3)
        assert registry.lookup(**kwargs) == B
        assert registry._cached_lookup.cache_info().hits == 0
        assert registry.lookup(**kwargs) == B
        assert registry._cached_lookup.cache_info().hits == 1
    finally:
        monkeypatch.delenv("FGATTN_TUNED_PATH")
        registry.reload()


def test_shipped_tuned_files_are_servable():
    """Every shipped tuned file matches the current templates and search space (else: re-tune)."""
    variants = registry.shipped_variants()
    assert variants, "no tuned/<gpu>/*.yaml shipped"
    for path in sorted(registry.SHIPPED.glob("*/*.yaml")):
        gpu = yaml.safe_load(path.read_text())["metadata"]["gpu"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert Registry([registry.SHIPPED]).choices(gpu), f"{path} serves nothing"


def test_registry_sources_match_templates():
    """registry/ holds exactly the rendered sources of the shipped variants, once per variant key (python -m fgattn_gen.registry)."""
    expected = registry.expected_sources()
    present = {p for p in registry.SOURCES.rglob("*") if p.is_file()}
    assert present == set(expected), "registry/ is stale: run python -m fgattn_gen.registry"
    for path, text in expected.items():
        assert path.read_text() == text, f"{path} drifted from templates/: run python -m fgattn_gen.registry"


def test_lookup_does_not_need_the_tuner(tmp_path):
    """The runtime serves tuned files without optuna (a tuning-only dependency) being importable."""
    _registry(tmp_path, _document())  # writes model0.yaml
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from pathlib import Path\nfrom fgattn_gen.registry import Registry\n"
            f"assert Registry([Path({str(tmp_path)!r})]).choices({GPU!r})")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fifo_named_yaml_is_skipped_without_opening_it(tmp_path):
    """A FIFO named *.yaml in FGATTN_TUNED_PATH made every first lookup hang (opened for reading)."""
    import os

    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(_document()))
    os.mkfifo(tmp_path / "pipe.yaml")
    reg = Registry([tmp_path])
    result = []
    worker = threading.Thread(target=lambda: result.append(_lookup(reg, 32760, 1.0)), daemon=True)
    with pytest.warns(UserWarning, match="pipe.yaml: not a regular file") as record:
        worker.start()
        worker.join(timeout=30)
    assert result == [A], "the lookup hung on the FIFO"
    assert len([w for w in record if "pipe.yaml" in str(w.message)]) == 1


def test_missing_or_file_search_dir_warns_once(tmp_path, monkeypatch):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_document()))
    missing, a_file = tmp_path / "missing", tmp_path / "m.yaml"
    monkeypatch.setenv("FGATTN_TUNED_PATH", os.pathsep.join(map(str, (missing, a_file, tmp_path))))
    registry.reload()
    try:
        kwargs = dict(device=GPU, dtype=torch.bfloat16, head_dim=128, seq_q=32760, seq_k=32760, density=0.3)
        with pytest.warns(UserWarning) as record:
            assert registry.lookup(**kwargs) == B
        messages = [str(w.message) for w in record]
        assert sum(f"ignoring {missing}: FGATTN_TUNED_PATH entry does not exist" in m for m in messages) == 1
        assert sum(f"ignoring {a_file}: FGATTN_TUNED_PATH entry is not a directory" in m for m in messages) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            registry.lookup(**{**kwargs, "seq_q": 75600, "seq_k": 75600})
    finally:
        monkeypatch.delenv("FGATTN_TUNED_PATH")
        registry.reload()
