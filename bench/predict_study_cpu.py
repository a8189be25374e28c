"""CPU study: output error of key predictors at matched density on every ``ditdata`` family (issue 13).

    PYTHONPATH=. python bench/predict_study_cpu.py [--shape study-cpu] [--seeds 0] [--families ...]

Writes a Markdown report to stdout (progress to stderr). For each family of ``fgattn_gen.ditdata`` on a small
CPU shape (default ``study-cpu``: 4 x 18 x 32 video + 13 text = 2,317 tokens, 6 heads, D = 64, bf16 inputs):

- ``exact``: the exact mask's threshold rule (a key is kept for a 128-query block when its softmax
  probability exceeds t for some row of the block; ``predictors.exact_mask``'s rule), computed from the fp32
  probabilities; t is the quantile of that statistic that gives the target density exactly.
- ``pooled_top_p`` (the library, torch backend) at its defaults (top-p 0.9, pool 128, gate 0.6) and with
  the threshold rule ``threshold = c / S`` at pool 128 / 32 / 16 (default gate); c is bisected until the
  KeySet's density is within 0.003 of the target.
- ``pooled defaults + widen``: ``widen_to_mass(min_mass=0.95 / 0.9, samples=8)`` applied to the defaults.
- candidates of a new default, each a per (block, key) statistic thresholded at one t (quantile-matched):
  ``sampled8+pool32``: the max over 8 stratified rows of each block of their exact probabilities (the rows of
  ``captured_mass``), or the pooled probability of the block's 32-query groups (pool 32);
  ``qclustersN+...``: the queries of each head clustered by k-means (K = S / N centroids, strided
  initialisation, 3 Lloyd steps); a block keeps the keys whose probability under the softmax of a centroid
  exceeds t for some centroid that one of its queries belongs to (wherever the centroid's other members
  are), or of one of its 8 sampled rows (``sampled8``) or of its 16-query pooled groups (``pool16``).

rel_l2 = |out - dense| / |dense| over all heads and rows, both from ``fgattn_gen.reference_attention`` in
fp32 (out with the KeySet). ratio = rel_l2 / the exact mask's rel_l2 at the same density (for the rows
whose density is not matched, the exact mask at the KeySet's own density).

Predictor cost, in multiply-adds per head relative to q k^T of dense attention (S^2 D): pooled pool p:
1/p; sampled rows: s / block_m (8/128 = 1/16); k-means with K = S / N: (steps + 1) K / S for the assignments
plus K / S for the centroids' scores = 5 / N (N = 16: 0.31, N = 32: 0.16, N = 64: 0.08), before any saving
(k-means on a subsample of the queries, fewer steps). The exact mask needs the full S^2 D product (plus the
dense pass).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from fgattn_gen import KeySet, reference_attention
from fgattn_gen.ditdata import FAMILIES, SHAPES, dit_qkv
from fgattn_gen.predictors import pooled_top_p, widen_to_mass
from fgattn_gen.predictors.captured_mass import sample_rows

BLOCK_M = 128
TARGETS = (0.1, 0.2, 0.3)
SAMPLES = 8
KMEANS_STEPS = 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def block_pad(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``[H, S, ...]`` -> ``[H, n_blocks, BLOCK_M, ...]`` (zero rows past S)."""
    pad = n_blocks * BLOCK_M - x.shape[1]
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)).unflatten(1, (n_blocks, BLOCK_M))


class Study:
    """One family's data, its dense output and the statistics of the threshold-rule predictors."""

    def __init__(self, shape: str, family: str, seed: int):
        data = dit_qkv(shape, family=family, seed=seed, dtype=torch.bfloat16)
        self.q, self.k, self.v = data.q, data.k, data.v
        _, self.h, self.seq, self.d = self.q.shape
        self.scale = self.d ** -0.5
        self.n_blocks = -(-self.seq // BLOCK_M)
        self.dense = reference_attention(self.q, self.k, self.v, self.keyset(None))
        qf, kf = self.q[0].float(), self.k[0].float()
        probs = torch.softmax(qf @ kf.transpose(1, 2) * self.scale, -1)  # [H, S, S]
        self.stats = {"exact": block_pad(probs, self.n_blocks).amax(2)}  # [H, nq, S] max over the block's rows
        rows, _ = sample_rows(self.seq, BLOCK_M, SAMPLES, self.q.device)
        sampled = probs[:, rows.flatten()].unflatten(1, rows.shape).amax(2)  # [H, nq, S]
        pool32, pool16 = self.pooled_stat(qf, kf, 32), self.pooled_stat(qf, kf, 16)
        self.stats["sampled8+pool32"] = torch.maximum(sampled, pool32)
        for tokens in (64, 32, 16):
            clusters = self.cluster_stat(qf, kf, tokens)
            self.stats[f"qclusters{tokens}+sampled8"] = torch.maximum(clusters, sampled)
            self.stats[f"qclusters{tokens}+pool16"] = torch.maximum(clusters, pool16)
        del probs

    def keyset(self, mask: torch.Tensor | None) -> KeySet:
        if mask is None:
            return KeySet.full(1, self.h, self.seq, self.seq, block_m=BLOCK_M)
        return KeySet.from_mask(mask[None], block_m=BLOCK_M)

    def pooled_stat(self, qf: torch.Tensor, kf: torch.Tensor, pool: int) -> torch.Tensor:
        """[H, nq, S]: max over the block's pooled groups of softmax(scale q̄ . K)."""
        groups = block_pad(qf, self.n_blocks).unflatten(2, (BLOCK_M // pool, pool))  # [H, nq, g, pool, D]
        counts = block_pad(torch.ones(self.h, self.seq, 1), self.n_blocks).unflatten(2, (BLOCK_M // pool, pool))
        mean = groups.sum(3) / counts.sum(3).clamp_min(1)  # [H, nq, g, D]
        probs = torch.softmax(torch.einsum("hngd,hkd->hngk", mean, kf) * self.scale, -1)
        probs = probs.masked_fill(counts.sum(3) == 0, 0.0)  # groups past the last row
        return probs.amax(2)

    def cluster_stat(self, qf: torch.Tensor, kf: torch.Tensor, tokens: int) -> torch.Tensor:
        """[H, nq, S]: max over the centroids of the block's queries of the centroid's softmax over the keys
        (k-means with S / tokens centroids)."""
        n_clusters = max(2, self.seq // tokens)
        centroids = qf[:, torch.arange(n_clusters) * self.seq // n_clusters]  # strided initialisation
        for _ in range(KMEANS_STEPS + 1):
            assign = (qf @ centroids.transpose(1, 2) - 0.5 * centroids.square().sum(-1)[:, None]).argmax(-1)
            onehot = torch.nn.functional.one_hot(assign, n_clusters).float()  # [H, S, K]
            count = onehot.sum(1)[..., None]
            centroids = torch.where(count > 0, onehot.transpose(1, 2) @ qf / count.clamp_min(1), centroids)
        # each centroid is the mean of its members under the last assignment (onehot)
        probs = torch.softmax(centroids @ kf.transpose(1, 2) * self.scale, -1)  # [H, K, S]
        present = block_pad(onehot, self.n_blocks).amax(2)  # [H, nq, K]
        return (present[..., None] * probs[:, None]).amax(2)  # [H, nq, S]

    def at_density(self, name: str, density: float) -> torch.Tensor:
        stat = self.stats[name].flatten()
        cut = stat.kthvalue(max(1, int(round(stat.numel() * (1 - density))))).values
        return self.stats[name] > cut

    def error(self, keys: KeySet) -> float:
        out = reference_attention(self.q, self.k, self.v, keys)
        return ((out - self.dense).norm() / self.dense.norm()).item()

    def exact_error(self, density: float) -> float:
        return self.error(self.keyset(self.at_density("exact", density)))

    def pooled_at(self, density: float, pool: int) -> KeySet | None:
        """pooled_top_p with threshold c / S bisected to ``density`` (None if out of reach)."""
        def call(c):
            return pooled_top_p(self.q, self.k, pool=pool, threshold=min(1.0, c / self.seq), impl="torch")

        lo, hi = math.log(0.01), math.log(self.seq)
        if call(math.exp(hi)).density() > density + 0.003 or call(math.exp(lo)).density() < density - 0.003:
            return None
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            keys = call(math.exp(mid))
            if abs(keys.density() - density) <= 0.003:
                return keys
            lo, hi = (mid, hi) if keys.density() > density else (lo, mid)
        return keys


def run_family(shape: str, family: str, seed: int) -> tuple[list[dict], list[dict]]:
    t0 = time.time()
    study = Study(shape, family, seed)
    matched, points = [], []
    exact = {d: study.exact_error(d) for d in TARGETS}
    matched.append(dict(method="exact mask (threshold rule)", cost="1 (+dense)",
                        errors={d: exact[d] for d in TARGETS}))
    for pool in (128, 32, 16):
        errors = {}
        for d in TARGETS:
            keys = study.pooled_at(d, pool)
            errors[d] = None if keys is None else study.error(keys)
        matched.append(dict(method=f"pooled_top_p threshold=c/S, pool {pool}", cost=f"1/{pool}", errors=errors))
    candidates = [("sampled8+pool32", "0.09")]
    for tokens in (64, 32, 16):
        cluster_cost = 5 / tokens
        candidates += [(f"qclusters{tokens}+sampled8", f"{cluster_cost + 1 / 16:.2f}"),
                       (f"qclusters{tokens}+pool16", f"{cluster_cost + 1 / 16:.2f}")]
    for name, cost in candidates:
        errors = {d: study.error(study.keyset(study.at_density(name, d))) for d in TARGETS}
        matched.append(dict(method=f"candidate {name}", cost=cost, errors=errors))
    for row in matched:
        row["ratios"] = {d: None if e is None else e / exact[d] for d, e in row["errors"].items()}
    defaults = pooled_top_p(study.q, study.k, impl="torch")
    point_methods = [("pooled_top_p defaults", defaults)]
    for target in (0.95, 0.9):
        point_methods.append((f"pooled defaults + widen_to_mass({target})",
                              widen_to_mass(study.q, study.k, defaults, min_mass=target)))
    for name, keys in point_methods:
        density = keys.density()
        err, ex = study.error(keys), study.exact_error(density)
        points.append(dict(method=name, density=density, rel_l2=err, exact=ex, ratio=err / ex))
    log(f"{family}: {time.time() - t0:.0f} s")
    return matched, points


def fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="study-cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    print(f"# Predictor study on the CPU: {args.shape} ({shape.seq} tokens, {shape.heads} heads, "
          f"D={shape.head_dim}, bf16 inputs, block_m={BLOCK_M}, block_n=1), seeds {args.seeds}\n")
    print(f"torch {torch.__version__}; error = rel_l2 vs dense fp32 (reference_attention); "
          "ratio = rel_l2 / exact mask's rel_l2 at the same density; cost = predictor multiply-adds / S^2 D.\n")
    summary: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        print(f"## Matched density, seed {seed}\n")
        print("| family | method | cost | " + " | ".join(f"d={d} rel_l2 (ratio)" for d in TARGETS) + " |")
        print("|---|---|---|" + "---|" * len(TARGETS))
        point_rows = []
        for family in args.families:
            matched, points = run_family(args.shape, family, seed)
            for row in matched:
                cells = [f"{fmt(row['errors'][d])} ({fmt(row['ratios'][d], 2)}x)" if row["errors"][d] is not None
                         else "n/a" for d in TARGETS]
                print(f"| {family} | {row['method']} | {row['cost']} | " + " | ".join(cells) + " |")
                ratios = [r for r in row["ratios"].values() if r is not None]
                summary.setdefault(row["method"], {}).setdefault(family, []).extend(ratios)
            point_rows += [(family, p) for p in points]
        print(f"\n## Point settings, seed {seed}\n")
        print("| family | method | density | rel_l2 | exact mask at that density | ratio |")
        print("|---|---|---|---|---|---|")
        for family, p in point_rows:
            print(f"| {family} | {p['method']} | {p['density']:.3f} | {p['rel_l2']:.3f} | {p['exact']:.3f} | "
                  f"{p['ratio']:.2f}x |")
        print()
    print("## Worst ratio to the exact mask over densities 0.1-0.3 (and seeds), per family\n")
    methods = [m for m in summary if not m.startswith("exact")]
    print("| method | " + " | ".join(args.families) + " | worst |")
    print("|---|" + "---|" * (len(args.families) + 1))
    for m in methods:
        worst = [max(summary[m].get(f, []), default=None) for f in args.families]
        known = [w for w in worst if w is not None]
        print(f"| {m} | " + " | ".join(fmt(w, 2) for w in worst) + f" | {fmt(max(known, default=None), 2)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
