"""CachedMask refresh policies on trajectory data (``ditdata.trajectory``): the adaptive policy refreshes while
the scene drifts and not once it has settled, warm-up and max_age are kept, the fixed schedule is unchanged,
and bad knobs name themselves."""

import math

import pytest
import torch

from fgattn_gen import KeySet, attention
from fgattn_gen.ditdata import DitShape, dit_qkv, trajectory
from fgattn_gen.predictors import AdaptiveRefresh, CachedMask, FixedRefresh

from conftest import TOL

TINY = DitShape("tiny-traj", 2, 8, 16, 8, 2, 64)  # 264 tokens (ragged for block_m = 32), 2 heads
MASK = dict(block_m=32, threshold=0.03)  # an exact mask of ~16 % of the keys on this data
STEPS = 8


def _run(cache, steps, *, layer=0, branch=0):
    """The predictions of one slot over the steps' DitAttention."""
    return [cache.at(step=t, layer=layer, branch=branch).predict(d.q, d.k, d.v) for t, d in enumerate(steps)]


def _refreshes(cache, layer=0, branch=0):
    return [step for step, action in cache.history(layer, branch) if action == "refresh"]


@pytest.fixture(scope="module")
def drifting():
    """The content family settling from noise: consecutive steps' masks differ most early (measured: the mask
    of step 1 keeps 0.95 of the mass on step 2 that it kept on step 1, the mask of step 6 0.995 on step 7)."""
    return list(trajectory(TINY, "content", steps=STEPS, seed=0, dtype=torch.float16))


@pytest.fixture(scope="module")
def frozen():
    return list(trajectory(TINY, "content", steps=STEPS, seed=0, drift=0.0, dtype=torch.float16))


def test_adaptive_refreshes_while_the_scene_drifts(drifting):
    cache = CachedMask(policy=AdaptiveRefresh(refresh_below=0.965, warmup=2, samples=4), **MASK)
    predictions = _run(cache, drifting)
    actions = [a for _, a in cache.history(0)]
    assert actions[:2] == ["dense", "refresh"]
    refreshes = _refreshes(cache)
    assert refreshes[0] == 1 and len(refreshes) >= 2 and max(refreshes) < STEPS // 2 + 1, actions
    for t, (action, p) in enumerate(zip(actions, predictions)):
        assert (p.out is not None) == (action != "reuse")
        if action == "reuse":  # the check's estimate comes with the keys
            assert p.captured_mass.shape == (1, TINY.heads, math.ceil(TINY.seq / 32))
            assert 0.5 < float(p.captured_mass.mean(-1).amin()) <= 1.0


def test_adaptive_settled_scene_refreshes_only_at_warmup_and_max_age(frozen):
    cache = CachedMask(policy=AdaptiveRefresh(refresh_below=0.965, warmup=3, max_age=3, samples=4), **MASK)
    _run(cache, frozen)
    assert cache.history(0) == [(0, "dense"), (1, "dense"), (2, "refresh"), (3, "reuse"), (4, "reuse"),
                                (5, "refresh"), (6, "reuse"), (7, "reuse")]
    without_age = CachedMask(policy=AdaptiveRefresh(refresh_below=0.965, warmup=1, samples=4), **MASK)
    _run(without_age, frozen)
    assert _refreshes(without_age) == [0]
    assert without_age.memory_report() == {"masks": 1, "bytes": without_age.keys(0).nbytes,
                                           "bytes_by_device": {"cpu": without_age.keys(0).nbytes}}


def test_adaptive_outputs(frozen):
    """Warm-up steps give the dense output, reuse steps the kernel's output over the cached keys."""
    d = frozen[0]
    cache = CachedMask(policy=AdaptiveRefresh(refresh_below=0.5, warmup=2, samples=2), **MASK)
    dense = attention(d.q, d.k, d.v, KeySet.full(1, TINY.heads, TINY.seq, TINY.seq, block_m=32), backend="reference")
    atol, rtol = TOL[torch.float16]
    for step in range(3):
        out = attention(d.q, d.k, d.v, predictor=cache.at(step=step, layer=4))
        expected = dense if step < 2 else attention(d.q, d.k, d.v, cache.keys(4))
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    assert [a for _, a in cache.history(4)] == ["dense", "refresh", "reuse"]


def test_adaptive_without_sync_refreshes_one_step_late(frozen):
    """A step that jumps to another scene (other heads): sync=True refreshes at it, sync=False at the next
    call."""
    steps = frozen[:3] + [dit_qkv(TINY, family="content", seed=9, dtype=torch.float16)] * 2
    late = CachedMask(policy=AdaptiveRefresh(refresh_below=0.8, warmup=1, samples=4, sync=False), **MASK)
    now = CachedMask(policy=AdaptiveRefresh(refresh_below=0.8, warmup=1, samples=4), **MASK)
    _run(late, steps)
    _run(now, steps)
    assert _refreshes(now) == [0, 3] and _refreshes(late) == [0, 4]
    assert late.needs_refresh(0, layer=0)  # an earlier step: a new generation


def test_adaptive_without_sync_keeps_a_low_score_whose_copy_is_late(frozen, monkeypatch):
    """sync=False when the host copy of a score is never ready in time (as on a GPU running behind the host):
    the low score of the jump is carried, as a minimum with the later scores, until a copy is read."""
    import fgattn_gen.predictors.cached_mask as cached_mask

    steps = frozen[:3] + [dit_qkv(TINY, family="content", seed=9, dtype=torch.float16)] + frozen[:2]
    late = CachedMask(policy=AdaptiveRefresh(refresh_below=0.8, warmup=1, samples=4, sync=False), **MASK)
    ready = {"now": False}
    real_value = cached_mask._HostScalar.value
    monkeypatch.setattr(cached_mask._HostScalar, "value",
                        lambda self, wait=False: real_value(self, wait) if wait or ready["now"] else None)
    for t, d in enumerate(steps):
        ready["now"] = t == 5  # the copies become readable at the last step only
        late.at(step=t).predict(d.q, d.k, d.v)
    # the jump at step 3 is low, steps 4-5 (back to the scene) are not: the minimum still refreshes at step 5
    assert _refreshes(late) == [0, 5]


def test_adaptive_branches_and_new_generation(frozen):
    shared = CachedMask(policy=AdaptiveRefresh(refresh_below=0.5, warmup=2), share_branches=True, **MASK)
    for step in range(3):
        for branch in (0, 1):
            shared.at(step=step, layer=0, branch=branch).predict(frozen[0].q, frozen[0].k, frozen[0].v)
    assert [a for _, a in shared.history(0)] == ["dense", "dense", "refresh", "reuse", "reuse", "reuse"]
    assert shared.needs_refresh(0, layer=0) and not shared.needs_refresh(3, layer=0)
    shared.at(step=0, layer=0).predict(frozen[0].q, frozen[0].k, frozen[0].v)  # a second generation
    assert shared.history(0) == [(0, "dense")] and shared.keys(0) is None


def test_fixed_schedule_is_unchanged(drifting):
    by_steps, by_policy = CachedMask([0, 3, 6], **MASK), CachedMask(policy=FixedRefresh([0, 3, 6]), **MASK)
    assert by_steps.refresh_steps == by_policy.refresh_steps == frozenset({0, 3, 6})
    for cache in (by_steps, by_policy):
        predictions = _run(cache, drifting)
        assert _refreshes(cache) == [0, 3, 6]
        assert [p.out is not None for p in predictions] == [t in (0, 3, 6) for t in range(STEPS)]
        assert all(p.captured_mass is None for p in predictions)
    assert torch.equal(by_steps.keys(0).bits, by_policy.keys(0).bits)
    assert CachedMask(policy=AdaptiveRefresh(0.9)).refresh_steps is None


@pytest.mark.parametrize("knobs, match", [
    (dict(refresh_below=0), r"^refresh_below: expected a fraction in \(0, 1\]"),
    (dict(refresh_below=1.5), "^refresh_below: "), (dict(refresh_below=float("nan")), "^refresh_below: "),
    (dict(refresh_below=True), "^refresh_below: "),
    (dict(refresh_below=0.9, warmup=-1), "^warmup: expected a number of dense steps >= 0"),
    (dict(refresh_below=0.9, warmup=1.5), "^warmup: "),
    (dict(refresh_below=0.9, max_age=0), "^max_age: expected None or a number of steps >= 1"),
    (dict(refresh_below=0.9, samples=0), "^samples: expected a positive int"),
    (dict(refresh_below=0.9, sync="yes"), "^sync: expected True or False"),
])
def test_bad_adaptive_knobs(knobs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveRefresh(**knobs)


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="^refresh_steps, policy: give refresh_steps"):
        CachedMask()
    with pytest.raises(ValueError, match="^refresh_steps, policy: "):
        CachedMask([0], policy=AdaptiveRefresh(0.9))
    with pytest.raises(TypeError, match="^policy: expected a FixedRefresh or AdaptiveRefresh"):
        CachedMask(policy=0.9)
    with pytest.raises(ValueError, match="^refresh_steps: expected a non-empty collection"):
        FixedRefresh([])
    with pytest.raises(ValueError, match="^step: expected a step number >= 0"):
        CachedMask(policy=AdaptiveRefresh(0.9)).at(step=-1).predict(*(torch.ones(1, 1, 8, 64),) * 3)
