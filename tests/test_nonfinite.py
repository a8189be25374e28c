"""NaN / Inf in q, k, v: the fp32 reference and each kernel (Triton: the interpreter on the CPU, compiled on a
GPU; CUDA: on a GPU; fp16 inputs) propagate them the same way over the selected keys, and unselected keys never
reach the output.

Each case poisons one place, runs both, and compares the NaN / +inf / -inf pattern of the outputs and of the
LSEs exactly, the finite values within the fp16 tolerance: a row with a non-finite selected score has a NaN
LSE in both (never -inf, which means "no key": an LSE merge would drop the row).
"""

import pytest
import torch

from conftest import TOL
from fgattn_gen import KeySet, attention, reference_attention

NAN, INF = float("nan"), float("inf")
B, H, SK, D = 1, 1, 45, 64
EMPTY_BLOCK_ROW = -1  # stands for a query row of block 2 (selects no key), whatever the block size
# (backend, block_m): the CUDA kernel's query blocks are multiples of 64
BACKENDS = [pytest.param("triton", 16, id="triton"),
            pytest.param("cuda", 64, id="cuda", marks=pytest.mark.gpu)]


def seq_q(block_m: int) -> int:
    """Three query blocks, the last ragged."""
    return 2 * block_m + 8


def _mask(block_m: int, block_n: int) -> torch.Tensor:
    """Query block 0 selects keys 0-9, block 1 keys 5-19, block 2 none; key blocks cover ``block_n`` keys."""
    nk = -(-SK // block_n)
    keys = torch.arange(nk) * block_n
    mask = torch.zeros(B, H, -(-seq_q(block_m) // block_m), nk, dtype=torch.bool)
    mask[:, :, 0] = keys < 10
    mask[:, :, 1] = (keys >= 5) & (keys < 20)
    return mask


# (name, tensor, index, value): what is poisoned; key 3 is selected by query block 0 only, key 30 by no block
# (block_n: key granularity 1 or 3 alternate over the cases)
CASES = [
    ("k selected row NaN", "k", (0, 0, 3), NAN, 1),
    ("k unselected row NaN", "k", (0, 0, 30), NAN, 3),
    ("k unselected row Inf", "k", (0, 0, 30), INF, 1),
    ("v unselected row NaN", "v", (0, 0, 30), NAN, 1),
    ("v unselected row -Inf", "v", (0, 0, 41), -INF, 3),
    ("v selected element NaN", "v", (0, 0, 3, 5), NAN, 3),
    ("v selected element Inf", "v", (0, 0, 7, 0), INF, 1),
    ("q row NaN", "q", (0, 0, 2), NAN, 3),
    ("q row NaN in an empty query block", "q", (0, 0, EMPTY_BLOCK_ROW), NAN, 1),
    ("k selected row Inf", "k", (0, 0, 3), INF, 3),
    ("k selected element Inf", "k", (0, 0, 3, 0), INF, 1),
    ("k selected element -Inf", "k", (0, 0, 12, 7), -INF, 3),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy in the interpreter
@pytest.mark.parametrize("name, which, index, value, block_n", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend, block_m", BACKENDS)
def test_kernel_and_reference_agree_on_non_finite_inputs(gen, device, backend, block_m, name, which, index, value,
                                                          block_n):
    q, k, v = (torch.randn(B, H, s, D, generator=gen).half() for s in (seq_q(block_m), SK, SK))
    if index[2] == EMPTY_BLOCK_ROW:
        index = (*index[:2], 2 * block_m + 2)
    dict(q=q, k=k, v=v)[which][index] = value
    q, k, v = (t.to(device) for t in (q, k, v))
    keys = KeySet.from_mask(_mask(block_m, block_n).to(device), block_m=block_m, block_n=block_n)
    out, lse = attention(q, k, v, keys, return_lse=True, backend=backend)
    ref, ref_lse = reference_attention(q, k, v, keys, return_lse=True)
    out = out.float()
    for what in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(what(out), what(ref)), f"{what.__name__} pattern differs"
    finite = ref.isfinite()
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(out[finite], ref[finite], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse[ref_lse.isfinite()], ref_lse[ref_lse.isfinite()], atol=2e-3, rtol=2e-3)
    for what in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(what(lse), what(ref_lse)), f"LSE {what.__name__} pattern differs"
    if "unselected" in name or "empty query block" in name:  # never reaches the output
        assert ref.isfinite().all()
        assert (ref[:, :, 2 * block_m:] == 0).all()  # query block 2 selects nothing


def test_reference_no_longer_zeroes_nan_rows():
    """The issue's case: one NaN in a selected k row made all-zero rows (nan_to_num), unlike the kernel."""
    q, k, v = (torch.ones(1, 1, 4, 64) for _ in range(3))
    k[0, 0, 1, 0] = NAN
    keys = KeySet.full(1, 1, 4, 4, block_m=16)
    out = reference_attention(q, k, v, keys)
    assert out.isnan().all()
    v2 = torch.ones(1, 1, 4, 64)
    v2[0, 0, 3] = NAN
    mask = torch.tensor([[[[True, True, True, False]]]])
    assert reference_attention(q, torch.ones(1, 1, 4, 64), v2, KeySet.from_mask(mask, block_m=16)).eq(1).all()
