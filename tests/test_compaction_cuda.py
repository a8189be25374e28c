"""The CUDA compaction kernel (GPU path) against a slow torch version of the same rule."""

import pytest
import torch

from fgattn_gen import KeySet, compaction


def _expected(mask: torch.Tensor, row: int, block_n: int, seq_k: int):
    sel = mask[row].nonzero().flatten()
    n_keys = len(sel) * block_n - int(mask[row, -1]) * (mask.shape[-1] * block_n - seq_k)
    return sel, n_keys


@pytest.mark.gpu
@pytest.mark.parametrize("n_kblocks,block_n,seq_k,density", [
    (1, 1, 1, 0.5), (31, 1, 31, 0.9), (33, 4, 130, 0.3), (1000, 1, 1000, 0.05), (3713, 1, 3713, 1.0),
    (5000, 1, 5000, 0.0), (70, 128, 8900, 0.6),
])
def test_cuda_compaction_matches_torch(n_kblocks, block_n, seq_k, density):
    gen = torch.Generator(device="cuda").manual_seed(n_kblocks)
    mask = torch.rand(2, 3, 5, n_kblocks, device="cuda", generator=gen) < density
    mask[0, 0, 0, : n_kblocks // 2] = True  # a dense run
    keys = KeySet.from_mask(mask, block_m=64, block_n=block_n)
    keys.bits.view(-1)[-1] |= (-(2 ** 31)) if n_kblocks % 32 else 0  # stray padding bits must be ignored
    for bh_start, n_bh in ((0, 6), (2, 3)):
        idx, n_keys = compaction.compact(keys, bh_start, n_bh, seq_k)
        flat = mask.flatten(0, 1)
        for i in range(n_bh):
            for qb in range(5):
                sel, expect = _expected(flat[bh_start + i], qb, block_n, seq_k)
                assert torch.equal(idx[i, qb, : len(sel)].long(), sel)
                assert n_keys[i, qb].item() == expect
