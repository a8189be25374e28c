"""``fgattn-tune --merge``: tuned files of several runs on one GPU model -> one file, best per entry, metadata
checked (documents built as in test_registry.py; no tuning)."""

import copy

import pytest
import torch
import triton
import yaml

from fgattn_gen import __version__, cli
from fgattn_gen.catalogue import space_hash
from fgattn_gen.tune.merge import MergeError, merge_documents
from fgattn_gen.tuned import load_tuned
from fgattn_gen.variant import Variant

GPU = "NVIDIA Test GPU"
LAYOUT = dict(dtype="bf16", head_dim=128, block_m=128, block_n=1)


def _variant(tile_n: int, stages: int) -> Variant:
    return Variant(backend="triton", **LAYOUT, tile_m=128, tile_n=tile_n, num_warps=8, num_stages=stages)


V = [_variant(n, s) for n in (32, 64, 128) for s in (2, 3)]


def _result(v: Variant, ms: float) -> dict:
    return {"key": v.key, "backend": v.backend, "params": v.params, "ms": ms, "ms_p20": ms, "ms_p80": ms}


def _entry(seq: int, density: float, ranked: list[tuple[Variant, float]], n_trials: int = 5) -> dict:
    results = [_result(v, ms) for v, ms in ranked]
    return {"label": f"s{seq}", "shape": {"batch": 1, "heads": 24, "seq_q": seq, "seq_k": seq, **LAYOUT},
            "measured": {"batch": 1, "heads": 1, "seq_q": seq, "seq_k": seq}, "density": density,
            "best": results[0], "runners_up": results[1:], "n_trials": n_trials, "n_pruned": 0}


def _document(entries, **meta) -> dict:
    metadata = {"fgattn": __version__, "torch": str(torch.__version__), "triton": str(triton.__version__),
                "optuna": "5.0.0", "cuda": "13.0", "gpu": GPU, "sm": "9.0",
                "search_space_hash": space_hash("triton", **LAYOUT), "date": "2026-11-27T00:00:00+00:00",
                "interpret": False, "model": "test", "tuned_heads_note": "x"}
    metadata.update(meta)
    return {"schema": 1, "metadata": metadata, "entries": copy.deepcopy(entries)}


HOST_A = _document([_entry(32760, 0.3, [(V[0], 2.0), (V[1], 2.5), (V[2], 3.0)], n_trials=7),
                    _entry(75600, 0.3, [(V[3], 9.0)])])
HOST_B = _document([_entry(32760, 0.3, [(V[4], 1.5), (V[1], 2.2), (V[5], 4.0), (V[0], 2.1)], n_trials=9),
                    _entry(32760, 0.1, [(V[5], 1.0)])])


def _by_key(doc) -> dict:
    return {(e["label"], e["density"]): e for e in doc["entries"]}


def test_faster_entry_wins_and_runners_up_are_reranked():
    merged = _by_key(merge_documents([("a.yaml", HOST_A), ("b.yaml", HOST_B)]))
    entry = merged[("s32760", 0.3)]
    assert entry["best"]["key"] == V[4].key and entry["best"]["ms"] == 1.5
    # pooled, one result per variant (its fastest), ranked, at most 3
    assert [(r["key"], r["ms"]) for r in entry["runners_up"]] == [(V[0].key, 2.0), (V[1].key, 2.2), (V[2].key, 3.0)]
    assert entry["n_trials"] == 9  # the winning entry's other fields


def test_entries_only_one_file_has_are_kept():
    merged = _by_key(merge_documents([("a.yaml", HOST_A), ("b.yaml", HOST_B)]))
    assert set(merged) == {("s32760", 0.3), ("s75600", 0.3), ("s32760", 0.1)}
    assert merged[("s75600", 0.3)] == HOST_A["entries"][1]
    assert merged[("s32760", 0.1)] == HOST_B["entries"][1]


def test_merge_is_order_independent_for_the_best():
    one = _by_key(merge_documents([("a.yaml", HOST_A), ("b.yaml", HOST_B)]))
    two = _by_key(merge_documents([("b.yaml", HOST_B), ("a.yaml", HOST_A)]))
    assert {k: (e["best"], e["runners_up"]) for k, e in one.items()} == \
           {k: (e["best"], e["runners_up"]) for k, e in two.items()}


@pytest.mark.parametrize("key, value", [("gpu", "NVIDIA Other GPU"), ("fgattn", "9.9.0"), ("triton", "0.0.1"),
                                        ("search_space_hash", "0" * 16), ("interpret", True), ("model", "other")])
def test_mismatched_metadata_is_rejected_naming_the_file_and_key(key, value):
    other = _document(HOST_B["entries"], **{key: value})
    with pytest.raises(MergeError, match=rf"b\.yaml: metadata\.{key}"):
        merge_documents([("a.yaml", HOST_A), ("b.yaml", other)])


def test_other_patch_version_and_torch_may_differ():
    other = _document(HOST_B["entries"], fgattn=__version__.rsplit(".", 1)[0] + ".99", torch="0.0", date="x")
    merge_documents([("a.yaml", HOST_A), ("b.yaml", other)])


def _write(tmp_path, name, doc) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_cli_merge_writes_gpu_slug_model_file(tmp_path, capsys):
    a, b = _write(tmp_path, "a.yaml", HOST_A), _write(tmp_path, "b.yaml", HOST_B)
    out = tmp_path / "out"
    assert cli.main(["--merge", a, b, "--out", str(out)]) == 0  # no --model needed
    merged = load_tuned(out / "nvidia-test-gpu" / "test.yaml")
    assert _by_key(merged)[("s32760", 0.3)]["best"]["key"] == V[4].key
    assert "nvidia-test-gpu/test.yaml" in capsys.readouterr().out


def test_cli_merge_mismatch_exits_2_and_writes_nothing(tmp_path, capsys):
    a = _write(tmp_path, "a.yaml", HOST_A)
    b = _write(tmp_path, "b.yaml", _document(HOST_B["entries"], search_space_hash="f" * 16))
    out = tmp_path / "out"
    assert cli.main(["--merge", a, b, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b.yaml" in err and "search_space_hash" in err and len(err.strip().splitlines()) == 1
    assert not list(out.rglob("*.yaml"))


def test_cli_merge_unreadable_or_missing_file_exits_2(tmp_path, capsys):
    a = _write(tmp_path, "a.yaml", HOST_A)
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 1\nmetadata: {}\n")
    assert cli.main(["--merge", a, str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert cli.main(["--merge", a, str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_without_model_or_merge_exits_2(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
