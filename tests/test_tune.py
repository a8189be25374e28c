"""``fgattn-tune`` end to end (``fgattn_gen.cli.main`` in-process) plus its parts: model specs, search space,
storage URLs and the tuned-file schema.

Without CUDA the runs use ``--interpret`` (conftest.py has set TRITON_INTERPRET=1) on a tiny custom model,
so each tuning trial is one interpreted kernel call plus three timed ones; with CUDA they tune on the GPU.
"""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from conftest import HAS_CUDA
from fgattn_gen import cli, default_variant
from fgattn_gen.models import ModelSpecError, load_model, preset_names
from fgattn_gen.tune import objective
from fgattn_gen.catalogue import space_hash
from fgattn_gen.tune.space import build_space
from fgattn_gen.tune.storage import StorageError, parse_storage
from fgattn_gen.tuned import gpu_slug, load_tuned, validate_tuned, write_tuned

REPO = Path(__file__).resolve().parent.parent
MODE = ["--backend", "triton"] if HAS_CUDA else ["--interpret"]  # the pipeline tests walk the Triton space
TINY = {
    "name": "tiny", "heads": 2, "head_dim": 64, "dtype": "bf16", "block_m": 128, "block_n": 1,
    "densities": [0.5], "shapes": [{"name": "s300", "video_tokens": 300, "text_tokens": 0}],
}
DEFAULT_KEY = default_variant(dtype=torch.bfloat16, head_dim=64, block_m=128, block_n=1).key  # enqueued first
SMALL_VARIANTS = {  # key: optuna params, for variants of the tiny layout
    f"triton_bf16_d64_qb128_kg1_bm{m}_bn{n}_w4_s2": {"tile_m": m, "tile_n": n, "num_warps": 4, "num_stages": 2}
    for m in (64, 128) for n in (32, 64, 128)
}


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def tune(model, out, *extra) -> int:
    return cli.main(["--model", str(model), "--out", str(out), *MODE, *extra])


def tuned_file(out: Path) -> Path:
    (path,) = out.glob("*/tiny.yaml")
    return path


def studies(out: Path) -> list[optuna.Study]:
    (journal,) = out.glob(".studies/*/tiny.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return [optuna.load_study(study_name=n, storage=storage) for n in optuna.get_all_study_names(storage)]


def finished(study):
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def fail_on_launch(monkeypatch):
    def launch(*args, **kwargs):
        raise AssertionError("a resumed study must not launch a kernel")

    monkeypatch.setattr(objective, "attention", launch)


# ---------------------------------------------------------------- end to end


def test_tune_writes_valid_file_and_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "4") == 0
    data = load_tuned(tuned_file(out))
    assert data["metadata"]["interpret"] is not HAS_CUDA
    assert data["metadata"]["model"] == "tiny"
    (entry,) = data["entries"]
    assert entry["shape"] == {"batch": 1, "heads": 2, "seq_q": 300, "seq_k": 300, "head_dim": 64, "dtype": "bf16",
                              "block_m": 128, "block_n": 1}
    assert (entry["density"], entry["n_trials"], entry["n_pruned"]) == (0.5, 4, 0)
    assert len(entry["runners_up"]) == 3
    assert entry["best"]["ms"] <= min(r["ms"] for r in entry["runners_up"])
    assert ("baselines" in entry) is HAS_CUDA
    (study,) = studies(out)
    assert study.trials[0].user_attrs["variant"] == DEFAULT_KEY  # the default variant is enqueued first

    fail_on_launch(monkeypatch)  # same budget: the rerun only re-exports
    assert tune(tiny, out, "--trials", "4") == 0
    (study,) = studies(out)
    assert len(study.trials) == 4
    assert load_tuned(tuned_file(out))["entries"][0]["n_trials"] == 4

    monkeypatch.undo()  # a larger budget adds only the missing trials, on variants not measured yet
    assert tune(tiny, out, "--trials", "6") == 0
    (study,) = studies(out)
    measured = [t.user_attrs["variant"] for t in finished(study) if "reused_from" not in t.user_attrs]
    assert len(finished(study)) == 6 and len(study.trials) == 6
    assert len(set(measured)) == len(measured)


def test_failing_variant_is_pruned_and_study_goes_on(tiny, tmp_path, monkeypatch):
    from triton.runtime.errors import OutOfResources

    real = objective.attention

    def attention(q, k, v, keys, *, variant, **kwargs):
        if variant.key == DEFAULT_KEY:
            raise OutOfResources(300000, 232448, "shared memory")
        return real(q, k, v, keys, variant=variant, **kwargs)

    monkeypatch.setattr(objective, "attention", attention)
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "3") == 0
    (study,) = studies(out)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.PRUNED
    assert "OutOfResources" in first.user_attrs["pruned_reason"]
    (entry,) = load_tuned(tuned_file(out))["entries"]
    assert (entry["n_trials"], entry["n_pruned"]) == (3, 1)
    assert entry["best"]["key"] != DEFAULT_KEY


def test_wrong_results_are_pruned_and_nothing_is_written(tiny, tmp_path, monkeypatch, capsys):
    real = objective.attention
    monkeypatch.setattr(objective, "attention", lambda *a, **kw: real(*a, **kw) * float("nan"))
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "2") == 1
    assert "no correct variant" in capsys.readouterr().out
    assert not list(out.glob("*/tiny.yaml"))
    (study,) = studies(out)
    assert all(t.user_attrs["pruned_reason"] == "NaN in the output" for t in study.trials)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter path; on a GPU --gpus runs real workers")
def test_gpus_start_workers_that_share_the_budget(tiny, tmp_path):
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "3", "--gpus", "0,1") == 0
    (study,) = studies(out)
    assert len(finished(study)) == 3
    assert sorted(p.name for p in out.glob(".studies/*/logs/*.log")) == ["worker0-gpu0.log", "worker1-gpu1.log"]
    assert load_tuned(tuned_file(out))["entries"][0]["n_trials"] == 3


def test_interrupted_trial_is_run_again(tiny, tmp_path):
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "2") == 0
    (study,) = studies(out)
    done = {t.user_attrs["variant"] for t in study.trials}
    template = study.trials[0]
    key, params = next((k, p) for k, p in SMALL_VARIANTS.items() if k not in done)
    study.add_trial(optuna.trial.create_trial(  # what Ctrl-C leaves behind: FAIL, no fatal_error
        state=optuna.trial.TrialState.FAIL, params=params, distributions=template.distributions,
        user_attrs={"variant": key}))
    assert tune(tiny, out, "--trials", "3") == 0
    (study,) = studies(out)
    rerun = [t for t in finished(study) if t.user_attrs["variant"] == key]
    assert len(finished(study)) == 3 and len(rerun) == 1 and "reused_from" not in rerun[0].user_attrs


@pytest.mark.gpu
def test_two_backend_study_on_the_gpu(tiny, tmp_path):
    """--backend all: one study over the Triton and CUDA spaces; the file records both, the registry serves it."""
    out = tmp_path / "out"
    assert cli.main(["--model", str(tiny), "--out", str(out), "--backend", "all", "--trials", "4",
                     "--sampler", "tpe"]) == 0
    data = load_tuned(tuned_file(out))
    assert data["metadata"]["search_backends"] == ["triton", "cuda"]
    (study,) = studies(out)
    assert len(finished(study)) == 4
    assert all(t.distributions["backend"].choices == ("cuda", "triton") for t in finished(study))
    assert {t.params["backend"] for t in study.trials[:2]} == {"triton", "cuda"}  # each backend's default first
    from fgattn_gen.registry import Registry
    (entry,) = data["entries"]
    shape = entry["shape"]
    best = Registry([out]).lookup(gpu=data["metadata"]["gpu"], dtype="bf16", head_dim=64, seq_q=shape["seq_q"],
                                  seq_k=shape["seq_k"], density=entry["density"], block_m=128, block_n=1)
    assert best.key == entry["best"]["key"]


def test_other_densities_are_kept_in_the_tuned_file(tiny, tmp_path):
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "1") == 0
    assert tune(tiny, out, "--trials", "1", "--densities", "1") == 0
    assert sorted(e["density"] for e in load_tuned(tuned_file(out))["entries"]) == [0.5, 1.0]


def test_corrupt_tuned_file_is_kept_aside_and_reported(tiny, tmp_path, capsys):
    """An unreadable tuned file was silently overwritten (its other densities lost), in mode 0600."""
    out = tmp_path / "out"
    path = out / (gpu_slug(torch.cuda.get_device_name()) if HAS_CUDA else "interpret") / "tiny.yaml"
    path.parent.mkdir(parents=True)
    corrupt = "schema: 1\nentries: [unclosed\n"
    path.write_text(corrupt)
    old = os.umask(0o022)
    try:
        assert tune(tiny, out, "--trials", "1") == 0
    finally:
        os.umask(old)
    (aside,) = path.parent.glob("tiny.yaml.corrupt-*")
    assert re.fullmatch(r"tiny\.yaml\.corrupt-\d{8}T\d{6}Z", aside.name)
    assert aside.read_text() == corrupt
    printed = "".join(capsys.readouterr().out.split())  # rich wraps long paths
    assert "cannotberead" in printed and "".join(str(aside).split()) in printed and str(path) in printed
    assert [e["density"] for e in load_tuned(path)["entries"]] == [0.5]
    assert path.stat().st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's 0600
    assert not list(path.parent.glob("*.tmp"))


def test_interpret_runs_write_outside_the_shipped_tuned_dir(tiny, tmp_path, monkeypatch):
    """bash scripts/tune.sh --model ... --interpret wrote tuned/interpret/ into the shipped tuned/."""
    from fgattn_gen.environment import tuned_dir

    shipped = sorted(p.relative_to(tuned_dir()) for p in tuned_dir().rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--model", str(tiny), "--interpret", "--backend", "triton", "--trials", "1"]) == 0
    assert len(load_tuned(tmp_path / "tuned-interpret" / "interpret" / "tiny.yaml")["entries"]) == 1
    assert not (tmp_path / "tuned").exists()
    assert sorted(p.relative_to(tuned_dir()) for p in tuned_dir().rglob("*")) == shipped
    assert "tuned-interpret/" in cli.build_parser().format_help().replace("\n", " ").replace("  ", " ")


def test_plot_writes_png(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert tune(tiny, out, "--trials", "1", "--plot") == 0
    assert len(list(out.glob("*/plots/tiny_s300_d0.5.png"))) == 1


def test_plot_without_matplotlib_exits_2(tiny, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert tune(tiny, tmp_path / "out", "--plot") == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["unknown model", "bad yaml", "missing key", "bad head_dim", "no valid variant",
                                  "bad storage"])
def test_bad_settings_exit_2_and_write_nothing(case, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    model, extra = str(tiny), []
    if case == "unknown model":
        model, expected = "no-such-model", "known presets: " + ", ".join(preset_names())
    elif case == "bad yaml":
        tiny.write_text("name: [tiny\nheads: 2\n")
        expected = "not valid YAML"
    elif case == "missing key":
        tiny.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "heads"}))
        expected = "missing key(s) heads"
    elif case == "bad head_dim":
        tiny.write_text(yaml.safe_dump({**TINY, "head_dim": 96}))
        expected = "head_dim: expected one of (64, 128), got 96"
    elif case == "no valid variant":
        tiny.write_text(yaml.safe_dump({**TINY, "block_m": 32}))  # no tile_m in {64, 128} divides 32
        expected = "no valid triton variant for dtype=bf16, head_dim=64, block_m=32"
    else:
        extra, expected = ["--storage", "redis://localhost"], "expected journal:PATH, sqlite:///PATH"
    assert tune(model, out, *extra) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("case", ["binary model", "model is a FIFO", "seed -5", "unwritable out", "sqlite folder missing",
                                  "unwritable FGATTN_CACHE_DIR", "densities repeated", "storage is a folder"])
def test_bad_option_or_file_exits_2_with_one_line(case, tiny, tmp_path, monkeypatch, capsys):
    """Each was a raw traceback (UnicodeDecodeError, ValueError, PermissionError, OperationalError) or a hang."""
    from conftest import unwritable_dir

    monkeypatch.chdir(tmp_path)
    out, extra, model = tmp_path / "out", [], str(tiny)
    if case == "binary model":
        tiny.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00")
        names = str(tiny)
    elif case == "model is a FIFO":
        model = str(tmp_path / "fifo.yaml")
        os.mkfifo(model)
        names = model
    elif case == "seed -5":
        extra, names = ["--seed", "-5"], "--seed"
    elif case == "unwritable out":
        out = unwritable_dir(tmp_path)
        names = f"--out {out}"
    elif case == "sqlite folder missing":
        extra, names = ["--storage", "sqlite:///missing/dir/x.db"], "--storage sqlite:///missing/dir/x.db"
    elif case == "unwritable FGATTN_CACHE_DIR":
        monkeypatch.setenv("FGATTN_CACHE_DIR", str(unwritable_dir(tmp_path)))
        names = "FGATTN_CACHE_DIR"
    elif case == "densities repeated":
        extra, names = ["--densities", "0.5,0.5"], "--densities"
    else:
        (tmp_path / "folder").mkdir()
        extra, names = ["--storage", f"journal:{tmp_path / 'folder'}"], "--storage journal:"
    assert cli.main(["--model", model, "--out", str(out), *MODE, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fgattn-tune: error: ") and err.count("\n") == 1, err
    assert names in err and "Traceback" not in err
    assert not out.exists() or case == "unwritable out"  # nothing written


@pytest.mark.parametrize("backend", ["cuda", "all"])
def test_interpret_with_cuda_backend_exits_2(tiny, tmp_path, capsys, backend):
    assert cli.main(["--model", str(tiny), "--out", str(tmp_path / "out"), "--interpret", "--backend", backend]) == 2
    assert f"--backend {backend}: the CUDA kernel needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the message shown without a GPU")
def test_no_cuda_without_interpret_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "fgattn_gen.cli", "--model", "wan-1.3b", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU found; rerun with --interpret" in proc.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- parts


def test_presets_load():
    assert set(preset_names()) >= {"hunyuan", "wan-1.3b", "wan-14b", "cogvideox-5b", "mochi", "flux"}
    hunyuan = load_model("hunyuan")
    assert (hunyuan.heads, hunyuan.head_dim, hunyuan.dtype) == (24, 128, "bf16")
    assert [s.seq for s in hunyuan.shapes] == [119056, 67576, 52726]
    assert load_model("cogvideox-5b").shapes[0].seq == 17550 + 226
    with pytest.raises(ModelSpecError, match="no such file"):
        load_model("missing.yaml")


def test_space_filters_before_sampling_and_hash_is_stable():
    layout = dict(dtype="bf16", head_dim=128, block_m=128, block_n=1)
    unlimited = build_space("triton", **layout, smem_limit=None)
    h100 = build_space("triton", **layout, smem_limit=227 * 1024)
    a100 = build_space("triton", **layout, smem_limit=163 * 1024)
    assert len(unlimited) == len(h100) == 2 * 3 * 2 * 3
    assert len(a100) < len(h100)
    assert unlimited.hash == h100.hash == a100.hash == space_hash("triton", **layout)  # the same on every device
    assert space_hash("triton", **{**layout, "head_dim": 64}) != unlimited.hash
    assert all(v.smem_bytes() <= 163 * 1024 for v in a100.candidates)
    assert len(build_space("triton", **{**layout, "block_m": 64}, smem_limit=None)) == 18  # tile_m must divide
    for variant in a100.candidates:  # each point has its own params; restricted fields get their own name
        params = a100.trial_params(variant)
        assert sorted(params.values()) == sorted((variant.tile_m, variant.tile_n, variant.num_warps,
                                                  variant.num_stages))
    assert len({tuple(a100.trial_params(v).items()) for v in a100.candidates}) == len(a100)
    assert "num_stages[2,3]" in a100.trial_params(a100.variant("triton_bf16_d128_qb128_kg1_bm128_bn128_w8_s3"))


def test_space_of_two_backends_samples_the_backend_first():
    """--backend all / auto on a GPU: one study over Triton and CUDA points; the Triton-only hash (shipped
    files) is unchanged; every point is reachable through its own trial params."""
    layout = dict(dtype="bf16", head_dim=128, block_m=128, block_n=1)
    both = build_space(("triton", "cuda"), **layout, smem_limit=227 * 1024)
    triton_only = build_space("triton", **layout, smem_limit=227 * 1024)
    cuda = [v for v in both.candidates if v.backend == "cuda"]
    assert both.fields[0] == "backend" and both.backends == ("triton", "cuda")
    assert len(both) == len(triton_only) + len(cuda) and cuda
    assert all(v.tile_m == 16 * v.num_warps for v in cuda)  # the CUDA kernel's rule, enforced by Variant
    assert both.hash == space_hash(("triton", "cuda"), **layout) != triton_only.hash == space_hash("triton", **layout)
    for variant in both.candidates:
        assert both.suggest(optuna.trial.FixedTrial(both.trial_params(variant))) == variant
    assert "backend" not in build_space("cuda", **layout, smem_limit=None).fields


@pytest.mark.parametrize("choice, sm, has_cuda_python, expected", [
    ("auto", "9.0", True, ("triton", "cuda")), ("auto", "9.0", False, ("triton",)), ("auto", "7.5", True, ("triton",)),
    ("auto", None, True, ("triton",)), ("triton", "9.0", True, ("triton",)), ("cuda", "9.0", True, ("cuda",)),
    ("all", "9.0", True, ("triton", "cuda")),
])
def test_search_backends(monkeypatch, choice, sm, has_cuda_python, expected):
    import importlib.util

    from fgattn_gen.tune import device as tune_device

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if has_cuda_python else None) if name == "cuda" else find_spec(name, *a))
    dev = tune_device.Device("x", "x", sm, 0, None, 0, torch.device("cpu" if sm is None else "cuda"))
    assert tune_device.search_backends(choice, dev) == expected


def test_heads_for_tuning_fill_the_gpu():
    from fgattn_gen.tune.workload import heads_for_tuning

    h100_sms = 132
    assert heads_for_tuning(24, -(-119056 // 128), h100_sms) == 1  # hunyuan 720p: 931 query blocks
    assert heads_for_tuning(24, -(-4608 // 128), h100_sms) == 15  # flux: 36 query blocks
    assert heads_for_tuning(2, 3, h100_sms) == 2


def test_storage_urls(tmp_path):
    assert parse_storage("journal:/tmp/x.journal").kind == "journal"
    for url in (f"sqlite:///{tmp_path}/x.db", "postgresql://u@h/db", "postgresql+psycopg2://u@h/db", "mysql://u@h/db"):
        assert parse_storage(url).kind == "rdb"
    for url in ("journal:", "sqlite://relative.db", "redis://h", "/tmp/x.journal"):
        with pytest.raises(StorageError):
            parse_storage(url)


def _valid_document() -> dict:
    result = {"key": "triton_bf16_d64_qb128_kg1_bm128_bn64_w8_s3", "backend": "triton", "ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1,
              "params": {"backend": "triton", "dtype": "bf16", "head_dim": 64, "block_m": 128, "block_n": 1,
                         "tile_m": 128, "tile_n": 64, "num_warps": 8, "num_stages": 3}}
    return {
        "schema": 1,
        "metadata": {"fgattn": "0.1.0", "torch": "2.13", "triton": "3.6.0", "optuna": "5.0.0", "cuda": None,
                     "gpu": "triton-interpreter", "sm": None, "search_space_hash": "ab", "date": "2026-01-01",
                     "interpret": True, "model": "tiny", "tuned_heads_note": "-"},
        "entries": [{"label": "s300", "density": 0.5, "best": result, "runners_up": [], "n_trials": 1,
                     "n_pruned": 0, "measured": {"batch": 1, "heads": 2, "seq_q": 300, "seq_k": 300},
                     "shape": {"batch": 1, "heads": 2, "seq_q": 300, "seq_k": 300, "head_dim": 64, "dtype": "bf16",
                               "block_m": 128, "block_n": 1}}],
    }


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.pop("schema"), "schema: expected 1"),
    (lambda d: d["metadata"].pop("gpu"), "metadata: missing key(s) 'gpu'"),
    (lambda d: d["metadata"].update(interpret="yes"), "metadata.interpret: expected bool"),
    (lambda d: d["entries"][0]["shape"].update(heads=2.5), "entries[0].shape.heads: expected int"),
    (lambda d: d["entries"][0]["best"].update(ms="fast"), "entries[0].best.ms: expected number"),
    (lambda d: d["entries"][0]["best"]["params"].update(tile_n=32), "do not match params"),
    (lambda d: d["entries"][0]["best"]["params"].update(tile_m=96), "not a valid variant"),
    (lambda d: d["entries"][0].update(runners_up=[d["entries"][0]["best"]] * 4), "at most 3"),
    (lambda d: d["entries"][0].update(baselines={"sdpa-cudnn": None}), "baselines"),
    (lambda d: d["metadata"].update(search_backends=["triton", "tpu"]), "metadata.search_backends"),
    (lambda d: d["metadata"].update(search_backends=[]), "metadata.search_backends"),
    (lambda d: d["metadata"].update(search_backends="triton"), "metadata.search_backends: expected list"),
])
def test_load_tuned_rejects_corrupt_files(corrupt, message, tmp_path):
    path = tmp_path / "t.yaml"
    write_tuned(path, _valid_document())
    assert load_tuned(path) == _valid_document()
    data = copy.deepcopy(_valid_document())
    corrupt(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_tuned(path)
    with pytest.raises(ValueError):  # and write_tuned refuses it, leaving the old file as it was
        write_tuned(path, data)
    assert path.read_text() == yaml.safe_dump(data)
    assert [p.name for p in tmp_path.iterdir()] == ["t.yaml"]


def test_load_tuned_rejects_truncated_yaml(tmp_path):
    path = tmp_path / "t.yaml"
    write_tuned(path, _valid_document())
    path.write_text(path.read_text()[:150])
    with pytest.raises(ValueError):
        load_tuned(path)
    with pytest.raises(ValueError, match="expected a mapping at the top level"):
        validate_tuned(["schema", 1])


def test_write_tuned_syncs_and_keeps_the_umask_mode(tmp_path, monkeypatch):
    """Tuned files were written with mkstemp's mode 0600 and no fsync before the rename."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    path = tmp_path / "gpu" / "t.yaml"
    old = os.umask(0o027)
    try:
        write_tuned(path, _valid_document())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    assert len(synced) == 2 and synced[1] == str(path.parent)  # the file (before its rename), then its folder
    assert load_tuned(path) == _valid_document()
