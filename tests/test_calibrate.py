"""Calibration of predictor knobs (``predictors.calibrate``), per-head thresholds, the ``predictor_knobs``
section of the tuned file, its serving by the registry, and ``fgattn-tune --calibrate``.

Data: ``ditdata`` ``narrow-cpu`` (727 tokens, 4 heads, D=64; 128-query blocks span 6.4 latent rows), families
``smooth`` and ``mixed-sharpness`` (heads of very different sharpness: one threshold cannot fit them all).
The calibration tests run the predictors' torch paths (``_torch_predictors``): the per-head kernel path is
checked against the torch path and against per-head separate calls on a cut of the data.
"""

import copy

import pytest
import torch

from fgattn_gen import registry
from fgattn_gen.ditdata import dit_qkv
from fgattn_gen.predictors import exact_mask, pooled_top_p, predict
from fgattn_gen.predictors import UnreachableTarget, calibrate
from fgattn_gen.tuned import load_tuned, validate_tuned, write_tuned


@pytest.fixture
def _torch_predictors(monkeypatch):
    """CPU predictors in torch ops (the interpreter runs the same rules, checked below, 100x slower)."""
    import fgattn_gen.predictors.checks as checks
    import fgattn_gen.predictors.mass_kernel as mass_kernel

    monkeypatch.setattr(checks, "interpreting", lambda: False)
    monkeypatch.setattr(mass_kernel, "interpreting", lambda: False)


def _samples(family, seeds=(0, 1), seq=None):
    out = []
    for seed in seeds:
        a = dit_qkv("narrow-cpu", dtype=torch.float32, family=family, seed=seed)
        out.append(tuple(t[:, :, :seq].contiguous() if seq else t for t in (a.q, a.k, a.v)))
    return out


# ------------------------------------------------------------------ per-head thresholds
@pytest.mark.parametrize("impl", ["kernels", "torch"])
def test_per_head_threshold_equals_separate_calls(impl):
    (q, k, v), = _samples("mixed-sharpness", seeds=(0,), seq=300)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: CUDA, or the interpreter
    q, k, v = (t.half().to(device) for t in (q, k, v))
    values = [0.4 / 300, 1.0 / 300, 2.5 / 300, 6.0 / 300]
    per = pooled_top_p(q, k, threshold=values, impl=impl, pool=32)
    head = lambda t, i: t[:, i:i + 1].contiguous()  # noqa: E731
    for i, t in enumerate(values):
        one = pooled_top_p(head(q, i), head(k, i), threshold=t, impl=impl, pool=32)
        assert torch.equal(per.bits[:, i], one.bits[:, 0]), i
    densities = per.counts().float().mean((0, 2))
    assert densities[0] > densities[3]  # the values differ per head: so do the masks
    for block_n in (1, 4):
        _, per = exact_mask(q, k, v, threshold=values, block_n=block_n, impl=impl, score_precision="exact")
        for i, t in enumerate(values):
            _, one = exact_mask(head(q, i), head(k, i), head(v, i), threshold=t, block_n=block_n, impl=impl,
                                score_precision="exact")
            assert torch.equal(per.bits[:, i], one.bits[:, 0]), (block_n, i)


def test_per_head_threshold_scale_of_the_default_predictor(_torch_predictors):
    (q, k, _), = _samples("smooth", seeds=(0,))
    scales = [0.3, 1.0, 3.0, 9.0]
    keys = predict(q, k, threshold_scale=scales, min_mass=None)
    for i, s in enumerate(scales):
        one = predict(q[:, i:i + 1].contiguous(), k[:, i:i + 1].contiguous(), threshold_scale=s, min_mass=None)
        assert torch.equal(keys.bits[:, i], one.bits[:, 0])
        assert torch.equal(keys.query_order[:, i], one.query_order[:, 0])


def test_per_head_threshold_scale_with_a_batch_on_the_kernels():
    """B = 2 through the fused kernels (interpreter on the CPU): per-head values are indexed by head, not by
    batch * head."""
    (q0, k0, _), (q1, k1, _) = _samples("smooth", seeds=(0, 1), seq=256)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: CUDA, or the interpreter
    q, k = torch.cat([q0, q1]).half().to(device), torch.cat([k0, k1]).half().to(device)
    scales = [0.3, 1.0, 2.0, 4.0]
    keys = predict(q, k, threshold_scale=scales, min_mass=None)
    for b in range(2):
        for i, s in enumerate(scales):
            assert keys.bits[b, i].any(), (b, i)  # no trivial all-empty comparison
            one = predict(q[b:b + 1, i:i + 1].contiguous(), k[b:b + 1, i:i + 1].contiguous(), threshold_scale=s,
                          min_mass=None)
            assert torch.equal(keys.bits[b, i], one.bits[0, 0]), (b, i)


@pytest.mark.parametrize("bad", [[1.0, 2.0], [1.0, 2.0, 0.0, 1.0], [1.0, 2.0, float("nan"), 1.0], "1.5", True])
def test_per_head_threshold_scale_bad_values_name_the_knob(bad, _torch_predictors):
    (q, k, _), = _samples("smooth", seeds=(0,), seq=256)
    with pytest.raises(ValueError, match="threshold_scale: expected a number in .* or a list of 4"):
        predict(q, k, threshold_scale=bad)


# ------------------------------------------------------------------ calibration
@pytest.mark.parametrize("family", ["smooth", "mixed-sharpness"])
def test_calibration_reaches_its_target_and_a_looser_target_is_sparser(family, _torch_predictors):
    samples = {3: _samples(family)}
    tight = calibrate(samples, target_error=0.02, predictor="cached_exact", points=8, refine=2)
    loose = calibrate(samples, target_error=0.1, predictor="cached_exact", points=8, refine=2)
    for cal, target in ((tight, 0.02), (loose, 0.1)):
        assert set(cal.values) == {3, "*"} and cal.values["*"] == cal.values[3]
        # recompute the error of the chosen per-head thresholds, independently of the search
        for q, k, v in samples[3]:
            out, keys = exact_mask(q, k, v, threshold=cal.values[3], impl="torch")
            from fgattn_gen import reference_attention
            sparse = reference_attention(q, k, v, keys).double()
            dense = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, -1) @ v.double()
            err = (sparse - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)
            assert (err <= target + 1e-6).all(), (family, target, err)
    assert sum(loose.densities[3]) < sum(tight.densities[3]) - 0.1
    assert all(a >= b for a, b in zip(loose.values[3], tight.values[3]))


def test_default_predictor_calibration_uses_per_head_values(_torch_predictors):
    samples = {0: _samples("mixed-sharpness")}
    cal = calibrate(samples, target_error=0.1, predictor="default", knobs={"min_mass": 0.3}, points=8, refine=1)
    assert all(e <= 0.1 for e in cal.errors[0])
    assert len(set(round(x, 6) for x in cal.values[0])) > 1  # one threshold does not fit every head
    assert cal.knobs(0) == {"min_mass": 0.3, "threshold_scale": cal.values[0]}
    # without the captured-mass check the pooled rule cannot reach 0.1 on these heads at any threshold
    with pytest.raises(UnreachableTarget, match="layer 0 head"):
        calibrate(samples, target_error=0.1, predictor="default", knobs={"min_mass": None}, points=3, refine=0)


def test_calibration_bad_inputs_give_clear_errors(_torch_predictors):
    good = _samples("smooth", seeds=(0,), seq=256)
    with pytest.raises(ValueError, match="samples: empty"):
        calibrate({}, target_error=0.05)
    with pytest.raises(ValueError, match=r"samples\[0\]: expected a non-empty list"):
        calibrate({0: []}, target_error=0.05)
    with pytest.raises(TypeError, match=r"samples\['\*'\]\[0\]: expected a \(q, k, v\) tuple"):
        calibrate([good[0][0]], target_error=0.05)
    with pytest.raises(TypeError, match="samples: expected a mapping"):
        calibrate(good[0][0], target_error=0.05)
    with pytest.raises(ValueError, match=r"target_error: expected a relative L2 error in \(0, 1\]"):
        calibrate(good, target_error=0.0)
    with pytest.raises(ValueError, match="predictor: expected one of"):
        calibrate(good, target_error=0.05, predictor="dense")
    with pytest.raises(ValueError, match="knob: default is calibrated through 'threshold_scale'"):
        calibrate(good, target_error=0.05, knob="min_mass")
    with pytest.raises(ValueError, match="knobs: default has no fixed knob"):
        calibrate(good, target_error=0.05, knobs={"threshold_scale": 1.0})
    other = _samples("smooth", seeds=(1,), seq=200)
    with pytest.raises(ValueError, match=r"samples\[1\]\[0\]: .* differs from samples\[0\]\[0\]"):
        calibrate({0: good, 1: other}, target_error=0.05)


def test_unreachable_target_names_layer_head_and_best_error(_torch_predictors):
    samples = {7: _samples("mixed-sharpness", seeds=(0,))}
    # a grid of sparse thresholds only: no value gets near 1e-4
    with pytest.raises(UnreachableTarget, match=r"layer 7 head \d: the best error on the grid is [\d.e-]+ "
                                                 r"\(at threshold="):
        calibrate(samples, target_error=1e-4, predictor="cached_exact", grid=[0.01, 0.05])


# ------------------------------------------------------------------ the tuned file and serving
def _document(section=None, heads=4, seq=727):
    meta = {"fgattn": "0.1.0", "torch": "2", "triton": "3", "optuna": "5", "cuda": None, "gpu": "triton-interpreter",
            "sm": None, "search_space_hash": "ab", "date": "2026-01-01", "interpret": True, "model": "tiny",
            "tuned_heads_note": "-"}
    section = section or {
        "knob": "threshold_scale", "target_error": 0.05, "statistic": "max",
        "shape": {"heads": heads, "seq_q": seq, "seq_k": seq, "head_dim": 64, "block_m": 128, "block_n": 1},
        "samples": 2, "fixed": {"min_mass": None},
        "layers": {"*": {"threshold_scale": [0.5] * heads},
                   2: {"threshold_scale": [40.0, 40.0, 40.0, 40.0][:heads], "error": [0.01] * heads,
                       "density": [0.2] * heads}}}
    return {"schema": 1, "metadata": meta, "entries": [], "predictor_knobs": {"default": section}}


def test_knobs_round_trip_through_the_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    write_tuned(path, _document())
    assert load_tuned(path)["predictor_knobs"] == _document()["predictor_knobs"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(knob="threshold"), r"predictor_knobs.default.knob: expected 'threshold_scale'"),
    (lambda s: s.update(target_error=2.0), r"target_error: expected an error in \(0, 1\]"),
    (lambda s: s.update(statistic="median"), r"statistic: expected one of"),
    (lambda s: s["layers"].pop("*"), r"layers: missing key '\*'"),
    (lambda s: s["layers"][2].update(threshold_scale=[1.0, 2.0]), r"layers\[2\].threshold_scale: expected a list of 4"),
    (lambda s: s["layers"][2].update(threshold_scale=[1.0, 2.0, 3.0, 1e9]), r"in \(0, 727\]"),
    (lambda s: s["layers"][2].update(density=[0.1, 0.2, 0.3, 1.5]), r"layers\[2\].density: .* in \[0, 1\]"),
    (lambda s: s["layers"].update({-1: s["layers"]["*"]}), r"layers: expected '\*' or layer indices"),
    (lambda s: s["fixed"].update(threshold_scale=1.0), r"fixed: expected the other knobs"),
    (lambda s: s.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda s: s.update(measured_heads=[0, 9]), r"measured_heads: expected distinct head indices"),
])
def test_malformed_knob_sections_name_the_key(edit, message):
    doc = _document()
    edit(doc["predictor_knobs"]["default"])
    with pytest.raises(ValueError, match=message):
        validate_tuned(doc, "f.yaml")
    doc = _document()
    doc["predictor_knobs"] = {"dense": doc["predictor_knobs"]["default"]}
    with pytest.raises(ValueError, match="predictor_knobs: expected predictor names from"):
        validate_tuned(doc, "f.yaml")


@pytest.fixture
def served_file(tmp_path, monkeypatch):
    folder = tmp_path / "tuned"
    folder.mkdir()
    write_tuned(folder / "tiny.yaml", _document())
    monkeypatch.setenv("FGATTN_TUNED_PATH", str(folder))
    registry.reload()
    yield folder
    monkeypatch.delenv("FGATTN_TUNED_PATH")
    registry.reload()


def test_registry_serves_knobs_by_shape_and_layer(served_file):
    args = dict(device=torch.device("cpu"), predictor="default", heads=4, seq_q=727, seq_k=727, head_dim=64,
                block_m=128, block_n=1)
    assert registry.served_knobs(**args, layer=2) == {"min_mass": None, "threshold_scale": [40.0] * 4}
    assert registry.served_knobs(**args, layer=5) == {"min_mass": None, "threshold_scale": [0.5] * 4}
    assert registry.served_knobs(**args) == registry.served_knobs(**args, layer=5)
    assert registry.served_knobs(**{**args, "seq_q": 1000, "seq_k": 1000}) is not None  # within a factor 2
    assert registry.served_knobs(**{**args, "seq_q": 2000, "seq_k": 2000}) is None
    assert registry.served_knobs(**{**args, "heads": 2}) is None
    assert registry.served_knobs(**{**args, "block_m": 64}) is None
    assert registry.served_knobs(**{**args, "predictor": "cached_exact"}) is None
    assert registry.served_knobs(**{**args, "device": "NVIDIA H200"}) is None  # an interpreter file serves the CPU


def test_a_rank_under_context_parallelism_is_served_its_heads(tmp_path, monkeypatch, _torch_predictors):
    """A rank holding heads 2-3 of a 4-head layer (Ulysses degree 2) gets those heads' calibrated values, for
    the default predictor and for cached_exact; the cpu device may be named by a string."""
    from fgattn_gen.predictors import CachedMask
    from fgattn_gen.predictors.default import Default

    doc = _document()
    doc["predictor_knobs"]["default"]["layers"][2]["threshold_scale"] = [10.0, 20.0, 30.0, 40.0]
    section = copy.deepcopy(doc["predictor_knobs"]["default"])
    section.update(knob="threshold", fixed={"refresh_steps": [0]})
    section["layers"] = {"*": {"threshold": [0.5, 0.25, 1e-6, 0.05]}}
    doc["predictor_knobs"]["cached_exact"] = section
    write_tuned(tmp_path / "tiny.yaml", doc)
    monkeypatch.setenv("FGATTN_TUNED_PATH", str(tmp_path))
    registry.reload()
    try:
        args = dict(device="cpu", predictor="default", seq_q=727, seq_k=727, head_dim=64, block_m=128, block_n=1)
        assert registry.served_knobs(**args, heads=2, layer=2, head_range=(2, 4))["threshold_scale"] == [30.0, 40.0]
        assert registry.served_knobs(**args, heads=2, layer=2) is None  # a 2-head layer: not calibrated
        with pytest.raises(ValueError, match=r"^head_range: expected \(first, total\)"):
            registry.served_knobs(**args, heads=2, head_range=(3, 4))
        (q, k, v), = _samples("smooth", seeds=(0,))
        q, k, v = (t[:, 2:].contiguous() for t in (q, k, v))  # heads 2 and 3
        calls = []
        import fgattn_gen.predictors.default as default
        real = default.predict
        default.predict = lambda *a, **knobs: calls.append(knobs) or real(*a, **knobs)
        try:
            rank = Default()
            rank.head_range = (2, 4)
            rank.at(layer=2).predict(q, k, v)
        finally:
            default.predict = real
        assert calls[-1]["threshold_scale"] == [30.0, 40.0]
        cache = CachedMask([0])
        cache.head_range = (2, 4)
        sliced = cache.at(step=0, layer=0).predict(q, k, v).keys
        explicit = CachedMask([0], threshold=[1e-6, 0.05]).at(step=0, layer=0).predict(q, k, v).keys
    finally:
        monkeypatch.delenv("FGATTN_TUNED_PATH")
        registry.reload()
    assert torch.equal(sliced.bits, explicit.bits)


def test_attention_with_the_default_predictor_uses_served_knobs(served_file, _torch_predictors):
    from fgattn_gen import attention
    from fgattn_gen.predictors.default import Default

    (q, k, v), = _samples("smooth", seeds=(0,))
    q, k, v = (t.half() for t in (q, k, v))
    calls = []
    real = predict

    def spy(*args, **knobs):
        calls.append(knobs)
        return real(*args, **knobs)

    import fgattn_gen.predictors.default as default
    default.predict = spy
    try:
        _, stats = attention(q, k, v, predictor="default", backend="reference", return_stats=True)
        served_star = stats.density
        assert calls[-1]["threshold_scale"] == [0.5] * 4 and calls[-1]["min_mass"] is None
        layer2 = Default().at(layer=2).predict(q, k, v).keys
        assert calls[-1]["threshold_scale"] == [40.0] * 4
        explicit = Default(threshold_scale=1.5).predict(q, k, v).keys  # the user's knob wins
        assert calls[-1]["threshold_scale"] == 1.5 and calls[-1].get("min_mass", 0.3) == 0.3
    finally:
        default.predict = real
    assert layer2.density() < explicit.density() < served_star


def test_cached_exact_uses_served_thresholds(tmp_path, monkeypatch, _torch_predictors):
    from fgattn_gen.predictors import CachedMask

    doc = _document()
    section = copy.deepcopy(doc["predictor_knobs"]["default"])
    section.update(knob="threshold", fixed={"refresh_steps": [0]})
    section["layers"] = {"*": {"threshold": [1e-6] * 4},
                         1: {"threshold": [0.05] * 4, "error": [0.1] * 4, "density": [0.3] * 4}}
    doc["predictor_knobs"] = {"cached_exact": section}
    write_tuned(tmp_path / "tiny.yaml", doc)
    monkeypatch.setenv("FGATTN_TUNED_PATH", str(tmp_path))
    registry.reload()
    try:
        (q, k, v), = _samples("smooth", seeds=(0,))
        cache = CachedMask([0])
        dense_ish = cache.at(step=0, layer=0).predict(q, k, v).keys.density()
        sparse = cache.at(step=0, layer=1).predict(q, k, v).keys.density()
        explicit = CachedMask([0], threshold=1e-6).at(step=0, layer=1).predict(q, k, v).keys.density()
    finally:
        monkeypatch.delenv("FGATTN_TUNED_PATH")
        registry.reload()
    assert sparse < 0.5 < dense_ish and explicit == dense_ish


def test_kernel_tuning_keeps_the_calibration_and_merge_too(tmp_path):
    from fgattn_gen.tune.export import previous_entries, tuned_document
    from fgattn_gen.tune.merge import MergeError, merge_documents

    doc = _document()
    path = tmp_path / "tiny.yaml"
    write_tuned(path, doc)
    meta = {**doc["metadata"], "search_space_hash": "other"}  # a new search space: entries go, knobs stay
    previous = previous_entries(path, meta, [])
    assert previous.knobs == doc["predictor_knobs"]
    assert tuned_document(meta, [], previous.knobs)["predictor_knobs"] == doc["predictor_knobs"]
    assert previous_entries(path, {**meta, "model": "other"}, []).knobs is None
    merged = merge_documents([("a", doc), ("b", {**doc, "predictor_knobs": {}})])
    assert merged["predictor_knobs"] == doc["predictor_knobs"]
    changed = copy.deepcopy(doc)
    changed["predictor_knobs"]["default"]["target_error"] = 0.1
    with pytest.raises(MergeError, match="predictor_knobs.default differs"):
        merge_documents([("a", doc), ("b", changed)])


# ------------------------------------------------------------------ the CLI
def test_cli_calibrate_writes_a_valid_file_beside_the_kernel_entries(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    pytest.importorskip("rich")
    from fgattn_gen import cli

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # --calibrate on the CPU runs torch ops
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tuned-interpret" / "interpret" / "wan-1.3b.yaml"
    path.parent.mkdir(parents=True)
    kernel_doc = _document()
    kernel_doc["metadata"]["model"] = "wan-1.3b"
    kernel_doc["predictor_knobs"] = {"cached_exact": {**_document()["predictor_knobs"]["default"], "knob": "threshold",
                                                      "layers": {"*": {"threshold": [0.5] * 4}}}}
    write_tuned(path, kernel_doc)
    assert cli.main(["--model", "wan-1.3b", "--calibrate", "--interpret", "--target-error", "0.1"]) == 0
    data = load_tuned(path)
    section = data["predictor_knobs"]["default"]
    assert section["shape"]["heads"] == 2 and section["target_error"] == 0.1
    assert len(section["layers"]["*"]["threshold_scale"]) == 2
    assert all(0 < x <= section["shape"]["seq_k"] for x in section["layers"]["*"]["threshold_scale"])
    assert data["predictor_knobs"]["cached_exact"] == kernel_doc["predictor_knobs"]["cached_exact"]  # kept
    assert data["metadata"]["search_space_hash"] == "ab"  # the existing file's metadata and entries stay


def test_cli_calibrate_bad_samples_and_unreachable_targets_exit_2(tmp_path, monkeypatch, capsys):
    pytest.importorskip("optuna")
    from fgattn_gen import cli

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--model", "wan-1.3b", "--calibrate", "--interpret", "--samples", str(tmp_path / "none")]) == 2
    assert "--samples" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["--model", "wan-1.3b", "--calibrate", "--interpret", "--samples", str(tmp_path / "empty")]) == 2
    assert "holds no capture files" in capsys.readouterr().err
    assert cli.main(["--model", "wan-1.3b", "--calibrate", "--target-error", "0"]) == 2
    assert "--target-error" in capsys.readouterr().err
    assert not (tmp_path / "tuned-interpret").exists()


def test_capture_files_load_as_samples(tmp_path):
    from fgattn_gen.integrations.capture import load_samples

    (q, k, v), = _samples("smooth", seeds=(0,), seq=256)
    for step in (0, 1):
        torch.save({"q": q[:, :2], "k": k[:, :2], "v": v[:, :2], "layer": 4, "step": step, "branch": 0,
                    "heads": [0, 1], "total_heads": 4}, tmp_path / f"layer004_step{step:03d}_branch0.pt")
    samples, heads, total = load_samples(tmp_path)
    assert list(samples) == [4] and len(samples[4]) == 2 and heads == (0, 1) and total == 4
    assert torch.equal(samples[4][1][0], q[:, :2])
    (tmp_path / "layer005_step000_branch0.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="layer005_step000_branch0.pt is not a capture file"):
        load_samples(tmp_path)


@pytest.mark.parametrize("name", ["hunyuan", "wan"])
def test_capture_saves_chosen_layers_heads_and_steps_and_leaves_the_output_alone(name, tmp_path):
    pytest.importorskip("diffusers")
    from test_diffusers import TEXT, VALID_TEXT, forward, make_inputs, make_model

    from fgattn_gen.integrations.capture import capture, load_samples

    model = make_model(name, "cpu", torch.float16)
    inputs = make_inputs(name, "cpu", torch.float16)
    want = [forward(model, inputs, t) for t in (900.0, 800.0, 700.0)]
    with capture(model, tmp_path, layers=[1], heads=[1], max_steps=2):
        got = [forward(model, inputs, t) for t in (900.0, 800.0, 700.0)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer001_step000_branch0.pt", "layer001_step001_branch0.pt"]
    samples, heads, total = load_samples(tmp_path)
    assert heads == (1,) and total == 2 and list(samples) == [1]
    q, k, v = samples[1][0]
    seq = 192 + (TEXT if name == "hunyuan" else 0)
    assert q.shape == (1, 1, seq, 64) and q.dtype == torch.float16
    assert k.shape[2] == (192 + VALID_TEXT[0] if name == "hunyuan" else seq)  # padded text keys cut
    with pytest.raises(FileExistsError, match="already holds capture files"):
        capture(model, tmp_path)
    with pytest.raises(ValueError, match="layers: the transformer has 2 self-attention layers"):
        capture(model, tmp_path / "other", layers=[5])
