"""Predictor benchmark: output error vs key density of the training-free predictors on DiT-like attention,
beside the same predictors at 128 x 128 block granularity, and their overhead against dense SDPA (cuDNN).

    PYTHONPATH=. python bench/bench_predictors.py --name predictors_h100          # GPU, a few minutes
    PYTHONPATH=. python bench/bench_predictors.py --name predictors_cpu --cpu     # CPU smoke run (interpreter)

Accuracy: DiT-like q/k/v (``fgattn_gen.ditdata``: HunyuanVideo-like 24 heads x D=128 and CogVideoX-like
48 heads x D=64 grids), one call per ``--seeds`` value (default 0; the generator runs on the benchmark's
device, so a seed's tensors differ between CPU and GPU). Each predictor configuration predicts a KeySet for
the whole call; its density is that of the whole KeySet; its error is measured on a slice of
``--eval-blocks`` query blocks of 128 rows spread over the sequence (all heads): sparse
``fgattn_gen.attention`` (bf16 kernel) against the dense fp32 ``reference_attention``:
rel_l2 = |out - ref| / |ref| over the slice, cos = mean over query rows of the cosine similarity. Pooled
curves keep the text tokens (``keep_keys``), and the main ones are also run without (``no-text``); an oracle
16 x 1 KeySet (true probabilities and values, ``oracle_keys``) approximates the best any M x 1 mask does.

Timing (``--timing-shape``, default S = 32,760, H = 24, D = 128): medians of ``triton.testing.do_bench``
for dense ``sdpa`` through cuDNN and each predictor call, in the same run; each row's ratio is to the dense
time measured just before it (the card's clocks drift as it warms over the run); the rows of the default
pooled call and the default refresh alternate dense and predictor ``BAR_ROUNDS`` times (medians), and the
checks hold the default pooled call's host-enqueue and CUDA-graph times; with --cpu, one wall-clock call per
row on a tiny shape (it only exercises the code).

Writes ``bench/results/<name>.json`` (rows as ``{"predictor", "granularity", "density", "rel_l2", "cos",
...}``), ``<name>.md`` and ``<name>.png`` (error vs density; needs matplotlib).
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # before Triton is imported: @triton.jit decides at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchlib import RESULTS, header_lines, run_info, timer, write_results  # noqa: E402
from fgattn_gen import KeySet, attention, reference_attention  # noqa: E402
from fgattn_gen.baselines import sdpa  # noqa: E402
from fgattn_gen.ditdata import SHAPES, dit_qkv  # noqa: E402
from fgattn_gen.predictors import exact_mask, pooled_top_p  # noqa: E402
from fgattn_gen.predictors.block_stats import block_stat  # noqa: E402
from fgattn_gen.predictors.dense import dense_attention_with_lse  # noqa: E402
from fgattn_gen.predictors.pooling import group_mean_and_similarity, pooled_scores  # noqa: E402
from fgattn_gen.predictors.top_p_search import top_p_words  # noqa: E402

EVAL_BLOCK = 128
TARGET_DENSITIES = (0.1, 0.2, 0.3, 0.5)

# Knob sweeps: (GPU, --cpu)
POOLED_TOP_P = ((0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995), (0.5, 0.9, 0.99))
POOLS = ((16, 32, 64, 128), (16, 128))
GATES = ((-1.0, 0.6), (-1.0, 0.6))
POOLED_THRESHOLDS = ((0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256), (1, 8, 64))  # x 1/(key groups)
FINE_POOLED = (((64, 16), (32, 16), (16, 16), (16, 8), (16, 4), (16, 2)), ((32, 16),))  # (block_m, pool), finer M x 1
# (block_m, block_n, pool) of the threshold-rule curves with query_variance
VARIANCE_POOLED = (((16, 1, 16), (16, 1, 4), (16, 1, 2), (128, 128, 128)), ((32, 1, 16),))
EXACT_FINE = (((64, 1, "64x1"), (32, 1, "32x1"), (16, 1, "16x1")), ((64, 1, "64x1"),))  # exact-mask M x 1
EXACT_THRESHOLDS = ((0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), (0.5, 4, 32))  # x 1/Sk
BLOCK_THRESHOLDS = ((1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), (4, 64, 512))  # x 1/Sk, 128x128 masks
EXACT_TOP_P = ((0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995), (0.7, 0.95))
ORACLE_BLOCK_M = 16  # the finest kernel query block
BAR_ROUNDS = 7  # alternating dense / predictor timings of the default pooled call and the default refresh
ORACLE_DENSITIES = ((0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6), (0.1, 0.3, 0.5))


# ---------------------------------------------------------------------------------------- accuracy
class Evaluator:
    """Error of a KeySet's sparse output on a fixed slice of query blocks against the dense fp32 output."""

    def __init__(self, q, k, v, n_blocks: int):
        seq = q.shape[2]
        total = -(-seq // EVAL_BLOCK)
        blocks = sorted({round(x) for x in np.linspace(0, total - 1, min(n_blocks, total))})
        self.rows = torch.cat([torch.arange(b * EVAL_BLOCK, min((b + 1) * EVAL_BLOCK, seq)) for b in blocks])
        self.rows = self.rows.to(q.device)
        self.q, self.k, self.v = q[:, :, self.rows].contiguous(), k, v
        b, h = q.shape[:2]
        full = KeySet.full(b, h, len(self.rows), seq, block_m=EVAL_BLOCK, device=q.device)
        self.ref = reference_attention(self.q, k, v, full)

    def __call__(self, keys: KeySet) -> dict:
        starts = self.rows[:: keys.block_m] // keys.block_m  # the slice is whole 128-row blocks
        sub = KeySet(keys.bits[:, :, starts].contiguous(), keys.n_kblocks, keys.block_m, keys.block_n)
        out = attention(self.q, self.k, self.v, sub).float()
        rel_l2 = ((out - self.ref).norm() / self.ref.norm()).item()
        cos = torch.nn.functional.cosine_similarity(out, self.ref, dim=-1).mean().item()
        return dict(density=keys.density(), rel_l2=rel_l2, cos=cos)


def accuracy_rows(shape_name: str, device: str, n_blocks: int, sweep: int, log, seed: int = 0) -> list[dict]:
    data = dit_qkv(shape_name, dtype=torch.bfloat16, device=device, seed=seed)
    q, k, v = data.q, data.k, data.v
    shape = data.shape
    seq = shape.seq
    text = [shape.text_range] if shape.text_tokens else None
    evaluate = Evaluator(q, k, v, n_blocks)
    base = dict(shape=shape_name, seed=seed, heads=shape.heads, head_dim=shape.head_dim, seq=seq,
                eval_rows=len(evaluate.rows))
    rows = []

    def record(predictor, granularity, curve, knobs, predict):
        """Run ``predict() -> KeySet`` and evaluate it; a failing configuration is logged and skipped."""
        try:
            row = dict(predictor=predictor, granularity=granularity, curve=curve, knobs=knobs, **base,
                       **evaluate(predict()))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other configurations
            log(f"{shape_name:14s} s{seed} {curve:44s} {json.dumps(knobs):40s} FAILED {type(exc).__name__}: "
                f"{str(exc)[:300]}")
            return
        rows.append(row)
        log(f"{shape_name:14s} s{seed} {curve:44s} {json.dumps(knobs):40s} density {row['density']:.3f} "
            f"rel_l2 {row['rel_l2']:.4f} cos {row['cos']:.5f}")

    for gate in GATES[sweep]:
        gate_name = "off" if gate == -1.0 else gate
        for top_p in POOLED_TOP_P[sweep]:
            for pool in POOLS[sweep]:
                record("pooled_top_p", "128x1", f"pooled_top_p 128x1 pool={pool} gate={gate_name}",
                       dict(top_p=top_p, pool=pool, sim_threshold=gate),
                       lambda: pooled_top_p(q, k, top_p=top_p, pool=pool, sim_threshold=gate, keep_keys=text))
            record("pooled_top_p", "128x128", f"pooled_top_p 128x128 gate={gate_name}",
                   dict(top_p=top_p, pool=128, sim_threshold=gate),
                   lambda: pooled_top_p(q, k, top_p=top_p, block_n=128, sim_threshold=gate, keep_keys=text))
    for top_p in POOLED_TOP_P[sweep]:
        for block_m, pool in FINE_POOLED[sweep]:
            record("pooled_top_p", f"{block_m}x1", f"pooled_top_p {block_m}x1 pool={pool} gate=off",
                   dict(top_p=top_p, pool=pool, sim_threshold=-1.0),
                   lambda: pooled_top_p(q, k, block_m=block_m, top_p=top_p, pool=pool, sim_threshold=-1.0,
                                        keep_keys=text))
        record("pooled_top_p", "128x4", "pooled_top_p 128x4 pool=16 gate=off",
               dict(top_p=top_p, pool=16, sim_threshold=-1.0),
               lambda: pooled_top_p(q, k, block_n=4, top_p=top_p, pool=16, sim_threshold=-1.0, keep_keys=text))
    # the threshold rule (one cut on every pooled probability), M x 1 and 128 x 128 alike
    n_kblocks128 = -(-seq // 128)
    for t in POOLED_THRESHOLDS[sweep]:
        for block_m, pool in ((128, 16), *FINE_POOLED[sweep]):
            record("pooled_top_p", f"{block_m}x1", f"pooled_top_p {block_m}x1 pool={pool} threshold",
                   dict(threshold_x_uniform=t, pool=pool, sim_threshold=-1.0),
                   lambda: pooled_top_p(q, k, block_m=block_m, threshold=min(1.0, t / seq), pool=pool,
                                        sim_threshold=-1.0, keep_keys=text))
    # keep_keys is a knob: forcing the text tokens in spends density on them; both settings, both granularities
    for keep, suffix in ((text, ""), (None, " no-text")) if text else ((None, ""),):
        for t in POOLED_THRESHOLDS[sweep]:
            record("pooled_top_p", "128x128", f"pooled_top_p 128x128 threshold{suffix}",
                   dict(threshold_x_uniform=t, pool=128, sim_threshold=-1.0, text=keep is not None),
                   lambda: pooled_top_p(q, k, block_n=128, threshold=min(1.0, t / n_kblocks128),
                                        sim_threshold=-1.0, keep_keys=keep))
            for block_m, block_n, pool in VARIANCE_POOLED[sweep]:  # the second-order term (query_variance)
                granularity = f"{block_m}x{block_n}"
                groups = -(-seq // block_n)
                record("pooled_top_p", granularity,
                       f"pooled_top_p {granularity} pool={pool} threshold variance{suffix}",
                       dict(threshold_x_uniform=t, pool=pool, sim_threshold=-1.0, query_variance=True,
                            text=keep is not None),
                       lambda: pooled_top_p(q, k, block_m=block_m, block_n=block_n, threshold=min(1.0, t / groups),
                                            pool=pool, sim_threshold=-1.0, keep_keys=keep, query_variance=True))
        if suffix:
            for top_p in POOLED_TOP_P[sweep]:
                record("pooled_top_p", "128x128", f"pooled_top_p 128x128 gate=off{suffix}",
                       dict(top_p=top_p, pool=128, sim_threshold=-1.0, text=False),
                       lambda: pooled_top_p(q, k, top_p=top_p, block_n=128, sim_threshold=-1.0))

    precisions = ("exact", "fp8") if torch.cuda.is_available() else ("exact",)
    for block_m, block_n, granularity, thresholds in ((128, 1, "128x1", EXACT_THRESHOLDS),
                                                      *((*fine, EXACT_THRESHOLDS) for fine in EXACT_FINE[sweep]),
                                                      (128, 128, "128x128", BLOCK_THRESHOLDS)):
        for precision in precisions if granularity == "128x1" else ("exact",):
            suffix = "" if precision == "exact" else " fp8"
            for t in thresholds[sweep]:
                record("exact_mask", granularity, f"exact_mask {granularity} threshold{suffix}",
                       dict(threshold_x_sk=t, score_precision=precision),
                       lambda: exact_mask(q, k, v, block_m=block_m, block_n=block_n, threshold=min(1.0, t / seq),
                                          score_precision=precision)[1])
            if block_m < 128:
                continue
            for top_p in EXACT_TOP_P[sweep]:
                record("exact_mask", granularity, f"exact_mask {granularity} top_p{suffix}",
                       dict(top_p=top_p, score_precision=precision),
                       lambda: exact_mask(q, k, v, block_m=block_m, block_n=block_n, top_p=top_p,
                                          score_precision=precision)[1])
    for density in ORACLE_DENSITIES[sweep]:
        record("oracle", f"{ORACLE_BLOCK_M}x1", f"oracle {ORACLE_BLOCK_M}x1", dict(target_density=density),
               lambda: oracle_keys(q, k, v, ORACLE_BLOCK_M, density))
    return rows


def oracle_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, density: float) -> KeySet:
    """An M x 1 KeySet no predictor of q and k can beat by much: it knows the true probabilities and values.

    First-order error model: dropping key j moves row i's output by about ``p_ij (v_j - o_i)``; with
    independent contributions a block's squared error is the sum over its rows and dropped keys of
    ``p_ij^2 |v_j - o_i|^2``, so keeping the (block, key) pairs with the largest sums, one cut over every
    head (at ``density`` of a 4M-entry sample), is the model's greedy optimum. q, k, v ``[1, H, S, D]``.
    """
    _, h, seq, _ = q.shape
    nq = -(-seq // block_m)
    weight = torch.empty(h, nq, seq, device=q.device)
    for hi in range(h):  # one head's fp32 [S, S] at a time
        qh, kh, vh = (x[0, hi].float() for x in (q, k, v))
        p = torch.softmax(qh @ kh.T * q.shape[-1] ** -0.5, -1)
        o = p @ vh
        p2 = p * p
        w = p2 * (vh * vh).sum(-1) - 2 * p2 * (o @ vh.T) + p2 * (o * o).sum(-1)[:, None]
        weight[hi] = torch.nn.functional.pad(w, (0, 0, 0, nq * block_m - seq)).view(nq, block_m, seq).sum(1)
    flat = weight.flatten()
    picks = torch.randint(0, flat.numel(), (min(flat.numel(), 4_000_000),), device=q.device,
                          generator=torch.Generator(q.device).manual_seed(0))
    sample = flat[picks].sort().values
    cut = sample[min(len(sample) - 1, int(len(sample) * (1 - density)))]
    return KeySet.from_mask((weight > cut)[None], block_m=block_m, block_n=1)


def error_at(points: list[tuple[float, float]], density: float) -> float:
    """rel_l2 of a curve at ``density``: log-linear interpolation; nan outside the measured range."""
    points = sorted(points)
    xs = [d for d, _ in points]
    if not xs or density < xs[0] or density > xs[-1]:
        return float("nan")
    return math.exp(np.interp(density, xs, [math.log(max(e, 1e-7)) for _, e in points]))


# (label, M x 1 predictors, 128 x 128 predictors, whether the 128 x 128 side is limited to the top-p rule)
COMPARISONS = (
    ("pooled M x 1 / pooled 128x128 top-p", ("pooled_top_p",), ("pooled_top_p",), True),  # SpargeAttn's rule
    ("exact M x 1 / exact 128x128", ("exact_mask",), ("exact_mask",), False),
    ("pooled M x 1 / pooled 128x128 any rule", ("pooled_top_p",), ("pooled_top_p",), False),
    ("best M x 1 / best 128x128", ("pooled_top_p", "exact_mask"), ("pooled_top_p", "exact_mask"), False),
    ("oracle 16x1 / best 128x128", ("oracle",), ("pooled_top_p", "exact_mask"), False),
)


def is_side(granularity: str, fine: bool) -> bool:
    """Whether a curve's granularity (``"16x1"``, ``"128x128"``, ...) is on the M x 1 side (``fine``) or the
    128 x 128 side of the comparisons (other block shapes, e.g. 128x4, are on neither)."""
    return granularity.endswith("x1") if fine else granularity == "128x128"


def summarize(rows: list[dict]) -> list[dict]:
    """Per shape, data seed and target density: every curve's interpolated error; for each of
    ``COMPARISONS`` the best M x 1 curve (block_n = 1) over the best 128 x 128 curve."""
    out = []
    for shape, seed in dict.fromkeys((r["shape"], r["seed"]) for r in rows):
        curves: dict[str, dict] = {}
        for r in rows:
            if (r["shape"], r["seed"]) == (shape, seed):
                c = curves.setdefault(r["curve"], dict(predictor=r["predictor"], granularity=r["granularity"],
                                                       points=[]))
                c["points"].append((r["density"], r["rel_l2"]))
        for density in TARGET_DENSITIES:
            errors = {name: error_at(c["points"], density) for name, c in curves.items()}

            def best(predictors, fine, top_p_only=False):
                cands = [(e, n) for n, e in errors.items() if not math.isnan(e)
                         and curves[n]["predictor"] in predictors
                         and is_side(curves[n]["granularity"], fine)
                         and not (top_p_only and "threshold" in n)]
                return min(cands) if cands else (float("nan"), None)

            comparisons = {}
            for label, fine_preds, block_preds, top_p_only in COMPARISONS:
                (fe, fn), (be, bn) = best(fine_preds, True), best(block_preds, False, top_p_only)
                comparisons[label] = dict(ratio=fe / be if be == be and fe == fe else float("nan"),
                                          fine=fn, fine_rel_l2=fe, block=bn, block_rel_l2=be)
            out.append(dict(shape=shape, seed=seed, density=density, errors=errors, comparisons=comparisons))
    return out


# ---------------------------------------------------------------------------------------- timing
def timing_rows(shape_name: str, device: str, cpu: bool, log) -> tuple[list[dict], dict]:
    data = dit_qkv(shape_name, dtype=torch.bfloat16, device=device, seed=1)
    q, k, v = data.q, data.k, data.v
    b, h, seq, d = q.shape
    scale = d ** -0.5
    measure = timer(cpu)
    rows = []
    base = dict(shape=[b, h, seq, seq, d])
    impl = "kernels"

    if cpu:
        dense_name, dense_fn = "dense math (cpu)", lambda: dense_attention_with_lse(q, k, v, scale)
    else:
        dense_name, dense_fn = "sdpa-cudnn", lambda: sdpa(q, k, v, "cudnn")
    dense_ms = measure(dense_fn)
    rows.append(dict(what=dense_name, **base, ms=dense_ms, vs_dense=1.0))
    log(f"timing {dense_name:64s} {dense_ms:9.3f} ms")

    def record(what, fn, rounds=1, **extra):
        """Times ``fn`` right after the dense baseline (GPU): a long run warms the card and lowers its clocks,
        so each ratio compares two timings taken under the same conditions. ``rounds`` > 1 alternates dense
        and ``fn`` that many times and keeps the medians (ms, dense ms, ratio): the rows that carry a bar."""
        rounds = 1 if cpu else rounds  # the CPU smoke run's wall-clock calls are no performance numbers
        try:
            pairs = []
            for _ in range(rounds):
                adjacent = dense_ms if cpu else measure(dense_fn)
                if not cpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    start = torch.cuda.memory_allocated()
                pairs.append((measure(fn), adjacent))
                if not cpu:
                    extra["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - start) / 2 ** 20
        except Exception as exc:  # noqa: BLE001 - a failing configuration is reported, the run goes on
            log(f"timing {what:64s} FAILED {type(exc).__name__}: {str(exc)[:300]}")
            rows.append(dict(what=what, **base, failed=f"{type(exc).__name__}: {str(exc)[:300]}"))
            return
        ms, adjacent = (statistics.median(x) for x in zip(*pairs))
        ratio = statistics.median(a / b for a, b in pairs)
        if rounds > 1:
            extra["rounds"] = rounds
        rows.append(dict(what=what, **base, ms=ms, dense_ms=adjacent, vs_dense=ratio, **extra))
        log(f"timing {what:64s} {ms:9.3f} ms  {100 * ratio:7.2f} % of {dense_name} "
            f"({adjacent:.3f} ms just before{f', median of {rounds} rounds' if rounds > 1 else ''})")

    if not cpu:
        record("sdpa-flash", lambda: sdpa(q, k, v, "flash"))
    for dense_backend in ("cudnn", "flash") if not cpu else ("math",):
        record(f"dense + LSE ({dense_backend})",
               lambda: dense_attention_with_lse(q, k, v, scale, backend=dense_backend))

    # pooled top-p: the whole predictor, then its parts on all heads at once
    for pool in (16, 32, 64, 128):
        record(f"pooled_top_p 128x1 pool={pool} (top_p 0.9, gate 0.6)", lambda: pooled_top_p(q, k, pool=pool),
               rounds=BAR_ROUNDS if pool == 128 else 1, predictor="pooled_top_p", granularity="128x1", pool=pool)
    record("pooled_top_p 128x128 (top_p 0.9, gate 0.6)", lambda: pooled_top_p(q, k, block_n=128),
           predictor="pooled_top_p", granularity="128x128", pool=128)
    record("pooled_top_p 128x4 pool=16 (top_p 0.9, gate 0.6)", lambda: pooled_top_p(q, k, pool=16, block_n=4),
           predictor="pooled_top_p", granularity="128x4", pool=16)
    # the most accurate M x 1 settings of the accuracy benchmark (16 x 1, threshold rule near density 0.1)
    for block_m, pool, variance in ((128, 16, False), (16, 16, False), (16, 16, True), (16, 4, True),
                                    (16, 2, True)):
        record(f"pooled_top_p {block_m}x1 pool={pool} threshold 1/Sk" + (", query_variance" if variance else ""),
               lambda: pooled_top_p(q, k, block_m=block_m, pool=pool, threshold=1 / seq, sim_threshold=-1.0,
                                    query_variance=variance),
               predictor="pooled_top_p", granularity=f"{block_m}x1", pool=pool)
    for pool in (32, 64):
        record(f"pooled_top_p 128x1 pool={pool}, search_iters=8",
               lambda: pooled_top_p(q, k, pool=pool, search_iters=8),
               predictor="pooled_top_p", granularity="128x1", pool=pool)
    n_qblocks = -(-seq // 128)
    for pool in (16, 128):
        q_mean, _ = group_mean_and_similarity(q[0], pool, impl=impl)
        record(f"  part: pooling + similarity, pool={pool}",
               lambda: group_mean_and_similarity(q[0], pool, impl=impl))
        record(f"  part: pooled scores (bmm, fp32 out), pool={pool}",
               lambda: pooled_scores(q_mean, k[0], scale, q.dtype))
        scores = pooled_scores(q_mean, k[0], scale, q.dtype)
        for warps in (None,) if cpu or pool == 16 else (None, 8, 32):
            kernel = "CUDA kernel" if warps is None and not cpu else f"Triton num_warps={warps or 'default'}"
            record(f"  part: top-p search + bits, pool={pool}, {kernel}",
                   lambda: top_p_words(scores, 0.9, rows_per_block=128 // pool, n_blocks=n_qblocks, iters=14,
                                       impl=impl, num_warps=warps))

    # exact mask refresh pass, then its statistics pass alone under a few launch configurations
    for precision in ("exact", "fp8"):
        for rule_name, rule in (("threshold 0.5/Sk", {}), ("top_p 0.9", dict(top_p=0.9))):
            record(f"exact_mask refresh 128x1 {rule_name} ({precision})",
                   lambda: exact_mask(q, k, v, score_precision=precision, **rule),
                   rounds=BAR_ROUNDS if (precision, rule) == ("fp8", {}) else 1,
                   predictor="exact_mask", granularity="128x1", score_precision=precision)
    for block_m in (64, 16):
        record(f"exact_mask refresh {block_m}x1 threshold 0.5/Sk (fp8)",
               lambda: exact_mask(q, k, v, block_m=block_m, score_precision="fp8"),
               predictor="exact_mask", granularity=f"{block_m}x1", score_precision="fp8")
    _, lse = dense_attention_with_lse(q, k, v, scale)
    launches = ({},) if cpu else ({}, {"pair": True}, {"num_stages": 2}, {"num_stages": 4}, {"tile_n": 64},
                                  {"tile_n": 128}, {"num_warps": 4}, {"num_warps": 8})
    for precision, mode in (("fp8", "words"), ("exact", "words"), ("fp8", "mean")):
        for launch in launches if mode == "words" else ({}, {"pair": True}):
            record(f"  part: statistics pass, {mode}, {precision}, launch {json.dumps(launch)}",
                   lambda: block_stat(q[0], k[0], lse[0], block_m=128, scale=scale, mode=mode, precision=precision,
                                      threshold=0.5 / seq, impl=impl, launch=launch))

    # checks beside the timings: LSE of the dense pass, fp8 vs exact masks
    rows_ref = min(seq, 1024)
    ref_lse = torch.logsumexp(q[0, :2, :rows_ref].float() @ k[0, :2].float().transpose(-1, -2) * scale, -1)
    checks = dict(lse_max_abs_err=(lse[0, :2, :rows_ref] - ref_lse).abs().max().item())
    for rule_name, rule in (("threshold", {}), ("top_p", dict(top_p=0.9))):
        exact = exact_mask(q, k, v, score_precision="exact", **rule)[1]
        fp8 = exact_mask(q, k, v, score_precision="fp8", **rule)[1]
        differ = (exact.to_mask() != fp8.to_mask()).float().mean().item()
        checks[f"fp8_vs_exact_{rule_name}"] = dict(density_exact=exact.density(), density_fp8=fp8.density(),
                                                    fraction_of_bits_differing=differ)
    if not cpu:
        checks["pooled_top_p_default_call"] = host_and_graph_ms(lambda: pooled_top_p(q, k))
    log(f"checks {json.dumps(checks)}")
    return rows, checks


def host_and_graph_ms(fn, calls: int = 20) -> dict:
    """Host time to enqueue one call of ``fn`` (queued behind a GPU sleep, so the host never waits for the
    GPU) and the median replay time of ``fn`` captured in a CUDA graph (GPU time without launch gaps; the
    benchmark's ``timer`` settings): an eager timing near the graph's means the call is GPU-bound."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # about a second of GPU time at Hopper clocks
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm the allocator's pools on a side stream before capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return dict(host_ms=host_ms, graph_ms=timer(False)(graph.replay))


# ---------------------------------------------------------------------------------------- report
PANELS = {"pooled_top_p": ("pooled_top_p", "oracle"), "exact_mask": ("exact_mask", "oracle")}  # plot rows
# always drawn: the defaults, SpargeAttn's rule at 128 x 128, the exact-mask refresh
REFERENCE_CURVES = ("pooled_top_p 128x1 pool=128 gate=0.6", "pooled_top_p 128x128 gate=off",
                    "exact_mask 128x1 threshold fp8")


def plotted_curves(summary: list[dict], shape: str, seed: int, predictors: tuple[str, ...]) -> set[str]:
    """The curves one panel draws: for each target density and each of ``predictors`` the best M x 1 and
    the best 128 x 128 curve, plus its ``REFERENCE_CURVES`` (every curve stays in the JSON and the tables)."""
    keep = {n for n in REFERENCE_CURVES if n.split()[0] in predictors}
    for s in summary:
        if (s["shape"], s["seed"]) != (shape, seed):
            continue
        for predictor in predictors:
            for fine in (True, False):
                cands = [(e, n) for n, e in s["errors"].items() if e == e and n.split()[0] == predictor
                         and is_side(n.split()[1], fine)]
                if cands:
                    keep.add(min(cands)[1])
    return keep


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seed = result["accuracy"][0]["seed"]  # the first data seed's curves
    shapes = list(dict.fromkeys(r["shape"] for r in result["accuracy"]))
    fig, axes = plt.subplots(2, len(shapes), figsize=(7 * len(shapes), 10), squeeze=False)
    for col, shape in enumerate(shapes):
        for row, predictor in enumerate(("pooled_top_p", "exact_mask")):
            ax = axes[row][col]
            curves = {}
            shown = plotted_curves(result["summary"], shape, seed, PANELS[predictor])
            for r in result["accuracy"]:
                if (r["shape"], r["seed"]) == (shape, seed) and r["curve"] in shown:
                    curves.setdefault(r["curve"], []).append((r["density"], max(r["rel_l2"], 1e-5)))
            for name, pts in sorted(curves.items()):
                pts.sort()
                style = {"128x128": "--", "128x4": "-.", "128x1": "-"}.get(name.split()[1], ":")  # finer M: dotted
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".",
                        label=name.removeprefix(predictor + " "))
            ax.set_xscale("linear")
            ax.set_yscale("log")
            ax.set_xlim(0, 1)
            ax.set_xlabel("key density of the KeySet")
            ax.set_ylabel("relative L2 error vs dense fp32")
            ax.set_title(f"{predictor} on {shape}, data seed {seed}: best curves and defaults")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.suptitle(f"{result['name']}: {result['device']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(result: dict) -> str:
    lines = [*header_lines(result),
             "Error = sparse `attention()` output (bf16 kernel) vs dense fp32 `reference_attention` on a slice "
             "of query blocks (all heads); density = whole KeySet. Errors at a target density are log-linear "
             "interpolations along each curve (blank: outside the curve's range). Pooled curves keep the text "
             "tokens of joint attention (`keep_keys`) unless marked no-text. The oracle curve knows the true "
             "probabilities and values (`oracle_keys`): about the best any 16 x 1 KeySet does. Plot: "
             + f"`{result['name']}.png`.", ""]
    summary = result["summary"]
    seeds = list(dict.fromkeys(s["seed"] for s in summary))
    lines += ["## Best M x 1 / best 128 x 128 at equal density, per data seed", "",
              "| shape | comparison | density | " + " | ".join(f"seed {seed}" for seed in seeds) + " | worst |",
              "|---|---|---|" + "---|" * (len(seeds) + 1)]
    for shape in dict.fromkeys(s["shape"] for s in summary):
        for label in summary[0]["comparisons"]:
            for density in TARGET_DENSITIES:
                ratios = [s["comparisons"][label]["ratio"] for seed in seeds for s in summary
                          if (s["shape"], s["seed"], s["density"]) == (shape, seed, density)]
                worst = max(ratios) if all(r == r for r in ratios) else float("nan")
                lines.append(f"| {shape} | {label} | {density} | " + " | ".join(f"{r:.2f}" for r in ratios)
                             + f" | {worst:.2f} |")
    lines.append("")
    for shape, seed in dict.fromkeys((s["shape"], s["seed"]) for s in summary):
        per = [s for s in summary if (s["shape"], s["seed"]) == (shape, seed)]
        lines += [f"## {shape}, seed {seed}: best M x 1 vs best 128 x 128 at equal density", "",
                  "| density | comparison | ratio | M x 1 curve (rel_l2) | 128 x 128 curve (rel_l2) |",
                  "|---|---|---|---|---|"]
        for s in per:
            for label, c in s["comparisons"].items():
                lines.append(f"| {s['density']} | {label} | {c['ratio']:.2f} | {c['fine']} ({c['fine_rel_l2']:.4f}) "
                             f"| {c['block']} ({c['block_rel_l2']:.4f}) |")
        lines += ["", f"### {shape}, seed {seed}: rel_l2 of every curve at the target densities", "",
                  "| curve | " + " | ".join(str(d) for d in TARGET_DENSITIES) + " |",
                  "|---|" + "---|" * len(TARGET_DENSITIES)]
        for name in per[0]["errors"]:
            cells = [f"{s['errors'][name]:.4f}" if s["errors"][name] == s["errors"][name] else "" for s in per]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["timing"]:
        lines += ["## Overhead", "",
                  "% of dense: against the dense time measured just before the row; rows with rounds alternate "
                  "dense and the row that many times (medians of the times and of the ratios).", "",
                  "| what | shape [B,H,Sq,Sk,D] | ms | dense ms | % of dense | extra peak MiB |",
                  "|---|---|---|---|---|---|"]
        for r in result["timing"]:
            mib = f"{r['peak_extra_mib']:.0f}" if "peak_extra_mib" in r else ""
            if "failed" in r:
                lines.append(f"| {r['what']} | {r['shape']} | failed: {r['failed'][:80]} | | | |")
            else:
                what = r["what"] + (f" ({r['rounds']} rounds)" if "rounds" in r else "")
                lines.append(f"| {what} | {r['shape']} | {r['ms']:.3f} | {r.get('dense_ms', r['ms']):.3f} | "
                             f"{100 * r['vs_dense']:.2f} | {mib} |")
        lines += ["", "Checks: `" + json.dumps(result["checks"]) + "`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="predictors")
    parser.add_argument("--cpu", action="store_true", help="CPU with Triton's interpreter, tiny shapes")
    parser.add_argument("--shapes", nargs="+", help="accuracy shapes (fgattn_gen.ditdata.SHAPES)")
    parser.add_argument("--timing-shape", help="shape of the overhead measurements")
    parser.add_argument("--eval-blocks", type=int, default=16, help="128-row query blocks in the error slice")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the DiT-like data")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench_predictors: no CUDA GPU; use --cpu for the interpreter smoke run", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    shapes = args.shapes or (["hunyuan-cpu", "cogvideox-cpu"] if args.cpu else ["hunyuan-14k", "cogvideox-10k"])
    timing_shape = args.timing_shape or ("hunyuan-cpu" if args.cpu else "hunyuan-32k")
    for name in (*shapes, timing_shape):
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; known: {sorted(SHAPES)}")

    def log(msg):
        print(msg, flush=True)

    started = time.time()
    accuracy = []
    for seed in args.seeds:
        for shape in shapes:
            accuracy += accuracy_rows(shape, device, args.eval_blocks, 1 if args.cpu else 0, log, seed=seed)
            log(f"[{time.time() - started:.0f} s] accuracy done for {shape}, seed {seed}")
    timing, checks = ([], {}) if args.skip_timing else timing_rows(timing_shape, device, args.cpu, log)
    result = dict(
        name=args.name, **run_info(args.cpu),
        wall_s=round(time.time() - started, 1), accuracy=accuracy, summary=summarize(accuracy), timing=timing,
        checks=checks,
    )
    write_results(args.name, result, markdown(result))
    if not plot(result, RESULTS / f"{args.name}.png"):
        log("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
