"""KeySet (packed bitmask) and the compaction of a KeySet into sorted key-block index lists."""

import pytest
import torch

from conftest import LSE_TOL, TOL, assert_compaction_matches, ceil_div, make_block_mask, make_qkv
from fgattn_gen import KeySet, attention, compaction, reference_attention

ODD_KBLOCKS = [1, 7, 31, 32, 33, 64, 100]


# ---------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("n_kblocks", ODD_KBLOCKS)
@pytest.mark.parametrize("kind", ["random", "full", "empty", "band", "some_empty", "first_last"])
def test_round_trip(gen, n_kblocks, kind):
    mask = make_block_mask(gen, 2, 3, 5, n_kblocks, kind, density=0.4)
    keys = KeySet.from_mask(mask, block_m=16, block_n=3)
    assert keys.shape == (2, 3, 5, n_kblocks)
    assert keys.bits.dtype == torch.int32 and keys.bits.is_contiguous()
    assert keys.bits.shape == (2, 3, 5, ceil_div(n_kblocks, 32))
    assert keys.n_kblocks == n_kblocks and keys.block_m == 16 and keys.block_n == 3
    out = keys.to_mask()
    assert out.dtype == torch.bool
    assert torch.equal(out, mask)


@pytest.mark.parametrize("n_kblocks", ODD_KBLOCKS)
def test_density_counts_nbytes(gen, n_kblocks):
    mask = make_block_mask(gen, 2, 2, 3, n_kblocks, "random", density=0.3)
    keys = KeySet.from_mask(mask, block_m=32)
    assert keys.density() == mask.sum().item() / mask.numel()  # exact
    assert keys.density() == pytest.approx(mask.float().mean().item(), rel=1e-6)
    counts = keys.counts()
    assert counts.dtype == torch.int32 and counts.shape == (2, 2, 3)
    assert torch.equal(counts, mask.sum(-1, dtype=torch.int32))
    assert keys.nbytes == 2 * 2 * 3 * ceil_div(n_kblocks, 32) * 4


def test_bit_layout_and_padding():
    """Bit j of word w <=> key block 32*w + j; padding bits past the last key block are zero; bit 31 works."""
    n_kblocks = 70
    mask = torch.zeros(1, 1, 1, n_kblocks, dtype=torch.bool)
    mask[..., [0, 5, 31, 32, 63, 69]] = True
    keys = KeySet.from_mask(mask, block_m=16)
    words = keys.bits[0, 0, 0].tolist()
    expected = [(1 << 0) | (1 << 5) | (1 << 31), (1 << 0) | (1 << 31), 1 << 5]
    expected = [w - (1 << 32) if w >= 1 << 31 else w for w in expected]  # as int32
    assert words == expected
    full = KeySet.from_mask(torch.ones(1, 1, 1, n_kblocks, dtype=torch.bool), block_m=16)
    assert full.bits[0, 0, 0, -1].item() == (1 << (n_kblocks - 64)) - 1  # no padding bits
    assert full.counts().item() == n_kblocks


@pytest.mark.parametrize("seq_q, seq_k, block_m, block_n", [(1, 1, 16, 1), (100, 77, 32, 3), (129, 1025, 64, 1),
                                                            (17, 300, 16, 128)])
def test_full(seq_q, seq_k, block_m, block_n):
    keys = KeySet.full(2, 3, seq_q, seq_k, block_m=block_m, block_n=block_n)
    nq, nk = ceil_div(seq_q, block_m), ceil_div(seq_k, block_n)
    assert keys.shape == (2, 3, nq, nk)
    assert (keys.block_m, keys.block_n) == (block_m, block_n)
    assert keys.density() == 1.0
    assert torch.equal(keys.counts(), torch.full((2, 3, nq), nk, dtype=torch.int32))
    assert keys.to_mask().all()
    assert keys.device == torch.device("cpu")
    keys.check_compatible(2, 3, seq_q, seq_k, torch.device("cpu"))


def test_from_mask_non_contiguous_mask(gen):
    mask = make_block_mask(gen, 3, 2, 40, 5, "random").transpose(-1, -2)  # [3, 2, 5, 40], non-contiguous
    keys = KeySet.from_mask(mask, block_m=16)
    assert torch.equal(keys.to_mask(), mask)


def test_to_device_keeps_layout(gen):
    mask = make_block_mask(gen, 1, 2, 3, 45, "random")
    keys = KeySet.from_mask(mask, block_m=16, block_n=2).to("cpu")
    assert (keys.n_kblocks, keys.block_m, keys.block_n) == (45, 16, 2)
    assert torch.equal(keys.to_mask(), mask)


# ---------------------------------------------------------------------------------------- bad input
def test_from_mask_rejects_bad_masks():
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        KeySet.from_mask(torch.ones(1, 1, 2, 3, dtype=torch.int32), block_m=16)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        KeySet.from_mask(torch.ones(1, 2, 3, dtype=torch.bool), block_m=16)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        KeySet.from_mask([[[[True]]]], block_m=16)
    with pytest.raises(ValueError, match="at least one query and key block"):
        KeySet.from_mask(torch.ones(1, 1, 2, 0, dtype=torch.bool), block_m=16)
    with pytest.raises(ValueError, match="at least one query and key block"):
        KeySet.from_mask(torch.ones(1, 1, 0, 3, dtype=torch.bool), block_m=16)


@pytest.mark.parametrize("field, value", [("block_m", 0), ("block_m", -16), ("block_n", 0), ("block_n", -1),
                                          ("block_m", 16.0), ("block_n", True), ("n_kblocks", 0)])
def test_constructor_rejects_bad_sizes(field, value):
    kwargs = dict(bits=torch.zeros(1, 1, 2, 1, dtype=torch.int32), n_kblocks=5, block_m=16, block_n=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        KeySet(**kwargs)


def test_from_mask_rejects_bad_block_sizes():
    mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_m"):
        KeySet.from_mask(mask, block_m=0)
    with pytest.raises(ValueError, match="block_n"):
        KeySet.from_mask(mask, block_m=16, block_n=0)


def test_constructor_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits must be an int32"):
        KeySet(torch.zeros(1, 1, 2, 1, dtype=torch.int64), n_kblocks=5, block_m=16)
    with pytest.raises(ValueError, match="bits must be an int32"):
        KeySet(torch.zeros(1, 2, 1, dtype=torch.int32), n_kblocks=5, block_m=16)
    with pytest.raises(ValueError, match="bits must be contiguous"):
        KeySet(torch.zeros(1, 1, 2, 4, dtype=torch.int32)[..., ::2], n_kblocks=33, block_m=16)
    with pytest.raises(ValueError, match="words per row"):
        KeySet(torch.zeros(1, 1, 2, 1, dtype=torch.int32), n_kblocks=33, block_m=16)
    with pytest.raises(ValueError, match="words per row"):
        KeySet(torch.zeros(1, 1, 2, 2, dtype=torch.int32), n_kblocks=32, block_m=16)


def test_constructor_rejects_non_tensor_bits():
    with pytest.raises((TypeError, ValueError), match="bits"):
        KeySet(bits=[[[[1]]]], n_kblocks=5, block_m=16)


def _all_ones_keyset():
    """Every bit set, 64 bits per row for 33 key blocks: the padding bits are not zero. The encoding says
    padding bits are zero; a KeySet built directly from such words must act as if they were."""
    return KeySet(torch.full((1, 1, 2, 2), -1, dtype=torch.int32), n_kblocks=33, block_m=16)


def test_padding_bits_ignored_by_compaction(device):
    keys = _all_ones_keyset().to(device)
    assert keys.to_mask().all()
    idx, n_keys = compaction.compact(keys, 0, 1, 33)
    assert n_keys[0].tolist() == [33, 33]
    assert idx[0, 0].tolist() == list(range(33))


def test_padding_bits_ignored_by_counts_and_density():
    keys = _all_ones_keyset()
    assert keys.counts()[0, 0].tolist() == [33, 33]
    assert keys.density() == 1.0


@pytest.mark.parametrize("bad", [(3, 4, 100, 50), (2, 5, 100, 50), (2, 4, 150, 50), (2, 4, 100, 90),
                                 (2, 4, 16, 50), (2, 4, 100, 47)])
def test_check_compatible_names_keys(bad):
    keys = KeySet.full(2, 4, 100, 50, block_m=32, block_n=3)  # [2, 4, 4, 17]
    keys.check_compatible(2, 4, 100, 50, torch.device("cpu"))
    keys.check_compatible(2, 4, 97, 49, torch.device("cpu"))  # same block counts: fine
    with pytest.raises(ValueError, match=r"^keys: .*does not match"):
        keys.check_compatible(*bad, torch.device("cpu"))


def test_check_compatible_device():
    keys = KeySet.full(1, 1, 16, 16, block_m=16)
    with pytest.raises(ValueError, match=r"^keys: KeySet is on cpu but q is on meta"):
        keys.check_compatible(1, 1, 16, 16, torch.device("meta"))


# ---------------------------------------------------------------------------------------- compaction
def slow_compact(mask: torch.Tensor, block_n: int, seq_k: int):
    """Pure-python index lists and key counts of a bool block mask [B, H, nq, nk]."""
    b, h, nq, nk = mask.shape
    flat = mask.reshape(b * h * nq, nk).tolist()
    rows, n_keys = [], []
    for bh in range(b * h):
        for i in range(nq):
            sel = [j for j in range(nk) if flat[bh * nq + i][j]]
            rows.append(sel)
            n_keys.append(sum(min(block_n, seq_k - j * block_n) for j in sel))
    return rows, n_keys


@pytest.mark.parametrize("seq_k, block_n", [(1, 1), (31, 1), (33, 1), (100, 1), (100, 3), (95, 32),
                                            (1100, 1), (2083, 2), (5, 16), (129, 128)])
@pytest.mark.parametrize("kind", ["random", "some_empty", "first_last", "full"])
def test_compact_matches_python(gen, device, seq_k, block_n, kind):
    b, h, nq = 2, 2, 3
    nk = ceil_div(seq_k, block_n)
    mask = make_block_mask(gen, b, h, nq, nk, kind, density=0.3, device=device)
    keys = KeySet.from_mask(mask, block_m=16, block_n=block_n)
    rows, n_keys = slow_compact(mask, block_n, seq_k)
    for bh_start, n_bh in [(0, b * h), (1, 2), (3, 1)]:
        idx, nkeys = compaction.compact(keys, bh_start, n_bh, seq_k)
        assert idx.dtype == torch.int32 and idx.shape == (n_bh, nq, nk)
        assert nkeys.dtype == torch.int32 and nkeys.shape == (n_bh, nq)
        for local in range(n_bh):
            for i in range(nq):
                r = (bh_start + local) * nq + i
                assert idx[local, i, :len(rows[r])].tolist() == rows[r], (bh_start, local, i)
                assert nkeys[local, i].item() == n_keys[r], (bh_start, local, i)


@pytest.mark.parametrize("chunk_words, step_words", [(1, 1), (2, 1), (4, 2), (2, 4), (8, 8), (32, 16)])
@pytest.mark.parametrize("seq_k, block_n", [(33, 1), (1100, 1), (700, 3), (95, 32)])
def test_compact_small_chunks(gen, device, monkeypatch, chunk_words, step_words, seq_k, block_n):
    """The Triton (interpreter) compaction splits a row into chunks of _CHUNK_WORDS bitmask words, ranked
    by a first pass and expanded _STEP_WORDS words at a time by a second; the defaults make one chunk for
    up to 8192 key blocks, so shrink them to run many chunks and steps per row on small inputs."""
    monkeypatch.setattr(compaction, "_CHUNK_WORDS", chunk_words)
    monkeypatch.setattr(compaction, "_STEP_WORDS", step_words)
    b, h, nq = 1, 3, 2
    nk = ceil_div(seq_k, block_n)
    mask = make_block_mask(gen, b, h, nq, nk, "some_empty", density=0.4, device=device)
    mask[0, 1, 1] = True  # a full row too
    keys = KeySet.from_mask(mask, block_m=16, block_n=block_n)
    for bh_start, n_bh in [(0, 3), (1, 2)]:
        idx, n_keys = compaction.compact(keys, bh_start, n_bh, seq_k)
        assert_compaction_matches(idx, n_keys, mask, block_n, seq_k, bh_start)


def test_compact_ragged_last_block_counts(device):
    """n_keys = count * block_n, minus the overhang only when the ragged last key block is selected."""
    seq_k, block_n = 10, 4  # key blocks [0..3], [4..7], [8, 9]: overhang 2
    mask = torch.tensor([[True, False, False], [True, False, True], [False, False, True], [True, True, True]])
    keys = KeySet.from_mask(mask[None, None].to(device), block_m=16, block_n=block_n)
    idx, n_keys = compaction.compact(keys, 0, 1, seq_k)
    assert n_keys[0].tolist() == [4, 6, 2, 10]
    assert idx[0, 3].tolist() == [0, 1, 2]
    assert idx[0, 1, :2].tolist() == [0, 2]


def test_heads_per_chunk(monkeypatch):
    keys = KeySet.full(2, 3, 160, 100, block_m=16)  # per (b, h): 10 * 100 * 4 B = 4000 B
    monkeypatch.delenv("FGATTN_INDEX_WORKSPACE_MB", raising=False)
    assert compaction.workspace_budget(keys.device) == compaction.workspace_budget() == 1024 << 20
    assert compaction.heads_per_chunk(keys) == 6
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "0")
    assert compaction.heads_per_chunk(keys) == 1
    for fits, chunk in ((5, 3), (4, 3), (3, 3), (2, 2)):  # the fewest chunks, of equal size: 3 + 3, not 4 + 2
        monkeypatch.setattr(compaction, "workspace_budget", lambda device=None, fits=fits: 4000 * fits + 3999)
        assert compaction.heads_per_chunk(keys) == chunk, fits


def test_workspace_budget_on_a_gpu(monkeypatch):
    """Without the variable: 1/8 of the GPU's memory, at least 1 GiB; the variable wins everywhere."""
    monkeypatch.delenv("FGATTN_INDEX_WORKSPACE_MB", raising=False)
    cuda = torch.device("cuda", 0)
    for memory, budget in ((141 << 30, (141 << 30) // 8), (80 << 30, 10 << 30), (4 << 30, 1 << 30)):
        monkeypatch.setattr(compaction, "cuda_total_memory", lambda index, memory=memory: memory)
        assert compaction.workspace_budget(cuda) == budget
    assert compaction.workspace_budget(torch.device("cpu")) == 1 << 30
    monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "3")
    assert compaction.workspace_budget(cuda) == compaction.workspace_budget() == 3 << 20
    # HunyuanVideo 720p (24 heads, 931 query blocks x 119,056 keys of int32) fits one launch on an H200's budget
    assert 24 * 931 * 119_056 * 4 <= (141 << 30) // 8


@pytest.mark.parametrize("budget", ["env0", "two_per_chunk"])
def test_attention_across_head_chunks(gen, device, monkeypatch, budget):
    """A tiny index workspace splits the (batch, head) axis into chunks; results must not change."""
    b, h, sq, sk, d, block_m, block_n = 3, 1, 45, 70, 64, 16, 3
    dtype = torch.float16
    if budget == "env0":
        monkeypatch.setenv("FGATTN_INDEX_WORKSPACE_MB", "0")
        expected_chunk = 1
    else:
        per_bh = ceil_div(sq, block_m) * ceil_div(sk, block_n) * 4
        monkeypatch.setattr(compaction, "workspace_budget", lambda device=None: 2 * per_bh)
        expected_chunk = 2  # chunks of 2 and 1 (b * h = 3)
    q, k, v = make_qkv(gen, b, h, sq, sk, d, dtype, device, layout="bshd")
    mask = make_block_mask(gen, b, h, ceil_div(sq, block_m), ceil_div(sk, block_n), "some_empty", density=0.5,
                           device=device)
    mask[0, 0, 1] = True
    keys = KeySet.from_mask(mask, block_m=block_m, block_n=block_n)
    assert compaction.heads_per_chunk(keys) == expected_chunk

    calls = []
    real_compact = compaction.compact

    def counting_compact(keys_, bh_start, n_bh, *args, **kwargs):
        calls.append((bh_start, n_bh))
        return real_compact(keys_, bh_start, n_bh, *args, **kwargs)

    monkeypatch.setattr(compaction, "compact", counting_compact)
    out, lse = attention(q, k, v, keys, return_lse=True)
    assert calls == ([(0, 1), (1, 1), (2, 1)] if expected_chunk == 1 else [(0, 2), (2, 1)])
    ref, ref_lse = reference_attention(q, k, v, keys, return_lse=True)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
