"""``parallel.ulysses_attention`` on the CPU: P processes on the gloo backend, Triton's interpreter, against the
single-process ``attention()`` of the full tensors (same KeySet, same predictor); and ``parallel.ulysses_apply``
with a shard made of two segments (each rank holds its share of the first TAIL-less part and of the last
P * TAIL tokens, as HunyuanVideo's video and text tokens under diffusers).

The workers are this file run as a script (``python test_parallel.py RANK WORLD INIT_FILE OUT_DIR``) with
``TRITON_INTERPRET=1`` in their environment, so the interpreter is chosen before Triton is imported.
"""

from pathlib import Path

import pytest
import torch

import gloo_workers

B, H, S, D = 1, 4, 96, 64
BLOCK_M, BLOCK_N = 16, 1
DTYPE = torch.float16
KNOBS = dict(block_m=BLOCK_M, top_p=0.5, sim_threshold=-1.0)  # gate off: random q would fail it (all keys)
TAIL = 5  # tokens per rank in the second segment


def predictor():
    from fgattn_gen.predictors import make_predictor

    return make_predictor("pooled_top_p", **KNOBS)


def inputs():
    """The full q, k, v ``[B, H, S, D]`` and a random KeySet with clustered query blocks (a random
    ``query_order`` per head), the same in every process."""
    from fgattn_gen import KeySet

    g = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(DTYPE) for _ in range(3))
    mask = torch.rand(B, H, -(-S // BLOCK_M), -(-S // BLOCK_N), generator=g) < 0.4
    order = torch.argsort(torch.rand(B, H, S, generator=g), dim=-1)
    keys = KeySet.from_mask(mask, block_m=BLOCK_M, block_n=BLOCK_N)
    return q, k, v, KeySet(keys.bits, keys.n_kblocks, BLOCK_M, BLOCK_N, query_order=order)


def segment_shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of x ``[B, H, S, D]`` cut into two segments (the first S - P*TAIL tokens and the
    last P*TAIL, each split evenly): its tokens of the first, then its tokens of the second."""
    head = S - world * TAIL
    first = x[:, :, rank * head // world:(rank + 1) * head // world]
    return torch.cat([first, x[:, :, head + rank * TAIL:head + (rank + 1) * TAIL]], dim=2)


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from fgattn_gen import KeySet, attention
    from fgattn_gen.parallel import ulysses_apply, ulysses_attention

    with gloo_workers.process_group(rank, world, init_file):
        q_full, k_full, v_full, keys = inputs()
        shard = slice(rank * S // world, (rank + 1) * S // world)
        q, k, v = (t[:, :, shard] for t in (q_full, k_full, v_full))
        segments = (S // world - TAIL, TAIL)
        rows = slice(rank * H // world, (rank + 1) * H // world)  # this rank's heads
        rank_keys = KeySet(keys.bits[:, rows].contiguous(), keys.n_kblocks, BLOCK_M, BLOCK_N,
                           query_order=keys.query_order[:, rows].contiguous())
        with torch.no_grad():
            out_keys = ulysses_attention(q, k, v, keys)
            out_pred = ulysses_attention(q, k, v, predictor=predictor())
            out_segments = ulysses_apply(*(segment_shard(t, rank, world) for t in (q_full, k_full, v_full)),
                                         lambda *qkv: attention(*qkv, rank_keys), segments=segments)
        try:  # H - 1 heads (3) is not divisible by 2 or 4: every rank raises before any collective
            ulysses_attention(q[:, 1:], k[:, 1:], v[:, 1:], keys)
            error = None
        except ValueError as e:
            error = str(e)
        try:  # segments that do not sum to the shard length: every rank raises before any collective
            ulysses_apply(q, k, v, attention, segments=(TAIL, TAIL))
            segment_error = None
        except ValueError as e:
            segment_error = str(e)
        torch.save(dict(keys=out_keys, predictor=out_pred, segments=out_segments, error=error,
                        segment_error=segment_error), Path(out_dir) / f"rank{rank}.pt")


def run_workers(world: int, tmp_path: Path) -> list[dict]:
    return gloo_workers.run_workers(__file__, world, tmp_path, timeout=120)


@pytest.fixture(scope="module")
def single_process():
    """``attention()`` on the full tensors in this process: with the KeySet, with the predictor."""
    from fgattn_gen import attention
    from fgattn_gen.predictors import pooled_top_p

    q, k, v, keys = inputs()
    assert pooled_top_p(q, k, **KNOBS).density() < 0.7  # the predictor case is sparse, not dense attention
    with torch.no_grad():
        return dict(keys=attention(q, k, v, keys), predictor=attention(q, k, v, predictor=predictor()))


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_matches_single_process(tmp_path, single_process, world):
    results = run_workers(world, tmp_path)
    for case, want in single_process.items():
        got = torch.cat([r[case] for r in results], dim=2)  # the ranks' sequence shards, in rank order
        assert got.shape == want.shape and got.dtype == want.dtype, case
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=f"{case}, P={world}")
        if case == "keys":  # the same kernel on the same rows of the same KeySet: bit-exact
            assert torch.equal(got, want), f"{case}, P={world}: not bit-exact"
            for rank, r in enumerate(results):  # the same rows of the same KeySet with two segments: bit-exact
                assert torch.equal(r["segments"], segment_shard(want, rank, world)), f"segments, P={world}, rank {rank}"
    for r in results:  # H=3 over P ranks: ValueError naming q, raised before any collective
        assert r["error"] is not None and r["error"].startswith("q:") and "H=3" in r["error"], r["error"]
        assert r["segment_error"] is not None and r["segment_error"].startswith("segments:"), r["segment_error"]


if __name__ == "__main__":
    gloo_workers.main(worker)
