"""Clustered query blocks (``KeySet.query_order``) and the stats of a call (``return_stats``): the permuted
path equals attention over the gathered rows scattered back, and the fp32 reference of the same function."""

import pytest
import torch

from conftest import TOL, LSE_TOL, make_block_mask, make_qkv
from fgattn_gen import KeySet, attention, reference_attention
from fgattn_gen.reference import element_mask


def _order(gen, b, h, seq, device):
    return torch.stack([torch.randperm(seq, generator=gen) for _ in range(b * h)]).view(b, h, seq).to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_q, seq_k, block_m, block_n", [(83, 77, 16, 1), (130, 61, 64, 3)])
def test_permuted_blocks_match_gathered_attention(gen, device, poisoned, dtype, seq_q, seq_k, block_m, block_n):
    q, k, v = make_qkv(gen, 2, 2, seq_q, seq_k, 64, dtype, device)
    mask = make_block_mask(gen, 2, 2, -(-seq_q // block_m), -(-seq_k // block_n), density=0.4, device=device)
    order = _order(gen, 2, 2, seq_q, device)
    plain = KeySet.from_mask(mask, block_m=block_m, block_n=block_n)
    keys = KeySet(plain.bits, plain.n_kblocks, block_m, block_n, query_order=order)
    out, lse = attention(q, k, v, keys, return_lse=True)
    # independently: attend the gathered rows with the unpermuted KeySet, then put each row back
    gathered = q.gather(2, order[..., None].expand(-1, -1, -1, 64))
    want_g, want_lse_g = reference_attention(gathered, k, v, plain, return_lse=True)
    inverse = order.argsort(-1)
    want = want_g.gather(2, inverse[..., None].expand(-1, -1, -1, 64))
    want_lse = want_lse_g.gather(2, inverse)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    finite = want_lse.isfinite()
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=LSE_TOL[0], rtol=LSE_TOL[1])
    assert (lse[~finite] == float("-inf")).all()
    # the reference of the permuted KeySet is the same function
    torch.testing.assert_close(reference_attention(q, k, v, keys), want, atol=1e-5, rtol=1e-5)


def test_element_mask_follows_the_order(gen):
    mask = make_block_mask(gen, 1, 1, 3, 10, density=0.5)
    order = torch.tensor([[[4, 0, 7, 1, 2, 6, 5, 3, 8]]])
    keys = KeySet.from_mask(mask, block_m=3)
    ordered = KeySet(keys.bits, keys.n_kblocks, 3, 1, query_order=order)
    em = element_mask(ordered, 9, 10)
    for position, query in enumerate(order[0, 0].tolist()):
        assert torch.equal(em[0, 0, query], mask[0, 0, position // 3])


def test_bad_query_order(gen, device):
    q, k, v = make_qkv(gen, 1, 1, 40, 40, 64, torch.float16, device)
    keys = KeySet.full(1, 1, 40, 40, block_m=16, device=device)
    twice = torch.zeros(1, 1, 40, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="^query_order: each"):
        attention(q, k, v, KeySet(keys.bits, keys.n_kblocks, 16, 1, query_order=twice))
    with pytest.raises(ValueError, match="^KeySet: query_order must be an int64"):
        KeySet(keys.bits, keys.n_kblocks, 16, 1, query_order=twice.int())
    with pytest.raises(ValueError, match="^KeySet: query_order has 50 queries"):
        KeySet(keys.bits, keys.n_kblocks, 16, 1, query_order=torch.arange(50, device=device).view(1, 1, 50))


@pytest.mark.parametrize("seq_q, seq_k, block_m, block_n", [(83, 77, 16, 1), (70, 61, 32, 4)])
def test_stats_density(gen, device, seq_q, seq_k, block_m, block_n):
    """``return_stats``: density is the fraction of scores computed (ragged blocks exact); no mass estimate
    without a predictor."""
    q, k, v = make_qkv(gen, 2, 3, seq_q, seq_k, 64, torch.float16, device)
    mask = make_block_mask(gen, 2, 3, -(-seq_q // block_m), -(-seq_k // block_n), density=0.3, device=device)
    mask[..., -1] = True  # the ragged last key block counts only its real keys
    keys = KeySet.from_mask(mask, block_m=block_m, block_n=block_n)
    out, lse, stats = attention(q, k, v, keys, return_lse=True, return_stats=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert isinstance(stats.density, float)
    assert stats.density == pytest.approx(element_mask(keys, seq_q, seq_k).float().mean().item(), rel=1e-6)
    assert stats.captured_mass is None
    out2, stats2 = attention(q, k, v, keys, return_stats=True)
    assert stats2.density == stats.density


def test_permutation_check_is_free_for_cluster_orders(gen, monkeypatch):
    """A cluster_order result is a permutation by construction: attention() does not sort it again (no host
    sync); an order changed in place after that is checked again."""
    from fgattn_gen import query_order
    from fgattn_gen.predictors import cluster_order
    q = torch.randn(1, 2, 70, 64, generator=gen).to(torch.float16)
    order = cluster_order(q, tokens_per_cluster=16)
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **kw: sorts.append(1) or real_sort(self, *a, **kw))
    query_order.check_permutation(order)
    assert sorts == []
    order[0, 0, :2] = order[0, 0, :2].flip(0)  # still a permutation, but changed: checked once more
    query_order.check_permutation(order)
    query_order.check_permutation(order)
    assert sorts == [1]
    order[0, 0, 0] = order[0, 0, 1]
    with pytest.raises(ValueError, match="^query_order: each"):
        query_order.check_permutation(order)
