"""Shared fixtures and helpers for the fgattn test suite.

Without CUDA, Triton kernels run in Triton's CPU interpreter. ``@triton.jit`` decides at decoration
time whether to interpret, so ``TRITON_INTERPRET=1`` must be in the environment before ``triton`` or
``fgattn_gen`` (which decorates kernels at import) is imported: hence the first lines below.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import hashlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# (dtype, atol, rtol) of a kernel's output against the fp32 reference, like Liger-Kernel's lists.
# bf16 has 8 mantissa bits: rounding alone costs up to |x| * 2**-9 (~6e-3 at |x| = 3), and on the GPU
# the softmax probabilities are rounded to bf16 before the PV dot. fp16 has 11 bits, 8x tighter.
# ``test_attention.py::test_tolerances_catch_real_bugs`` checks that these still catch small mistakes
# (one dropped key block, a 5 % wrong scale).
TOLERANCES = [
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 5e-3, 5e-3),
]
TOL = {dtype: (atol, rtol) for dtype, atol, rtol in TOLERANCES}
# LSE is computed in fp32 from the same rounded inputs by both sides.
LSE_TOL = (2e-3, 2e-3)


def pytest_configure(config):
    # Triton's interpreter (triton/runtime/interpreter.py) trips a NumPy deprecation on every scalar index.
    config.addinivalue_line(
        "filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning:triton.*")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


class _PoisonTorch:
    """Stands in for ``torch`` inside ``fgattn_gen.ops``: the buffers it allocates start as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


@pytest.fixture
def poisoned(monkeypatch):
    """attention() has no ``out=``: poison the output / LSE buffers it allocates, so that any element the
    kernel fails to write shows up as NaN."""
    import importlib

    monkeypatch.setattr(importlib.import_module("fgattn_gen.ops"), "torch", _PoisonTorch())


def compact_reference(mask: torch.Tensor, block_n: int, seq_k: int):
    """Vectorised torch version of ``compaction.compact`` for a whole bool block mask ``[B, H, nq, nk]``.

    Returns ``(order, counts, n_keys)``: ``order[..., :counts]`` are the selected key blocks in ascending
    order (``[B*H, nq, nk]``), ``n_keys`` the selected keys with the ragged last key block clipped to Sk.
    """
    b, h, nq, nk = mask.shape
    flat = mask.reshape(b * h, nq, nk)
    order = torch.argsort((~flat).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    counts = flat.sum(-1, dtype=torch.int32)
    overhang = nk * block_n - seq_k
    n_keys = counts * block_n - flat[..., -1].to(torch.int32) * overhang
    return order, counts, n_keys


def assert_compaction_matches(idx: torch.Tensor, n_keys: torch.Tensor, mask: torch.Tensor, block_n: int,
                              seq_k: int, bh_start: int = 0) -> None:
    """``idx`` / ``n_keys`` from ``compaction.compact(keys, bh_start, len(idx), seq_k)`` against the mask."""
    order, counts, ref_n_keys = compact_reference(mask, block_n, seq_k)
    rows = slice(bh_start, bh_start + idx.shape[0])
    order, counts, ref_n_keys = order[rows], counts[rows], ref_n_keys[rows]
    assert torch.equal(n_keys.cpu(), ref_n_keys.cpu()), "n_keys"
    valid = torch.arange(idx.shape[-1], device=counts.device) < counts[..., None]
    assert torch.equal(idx.cpu()[valid.cpu()], order.cpu()[valid.cpu()]), "sorted selected key blocks"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's node id: fresh inputs per test, reproducible per test."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def make_qkv(gen: torch.Generator, batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int,
             dtype: torch.dtype, device="cpu", *, layout: str = "contiguous"):
    """Random q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]`` from ``randn`` (never zeros).

    layouts (the last dim is always contiguous):
        ``contiguous``: dense ``[B, H, S, D]``.
        ``bshd``: stored as ``[B, S, H, D]`` and returned transposed (as from a fused qkv projection).
        ``sliced``: views into a wider buffer ``[B, H, S + 3, D + 64]`` (padded rows and head dim).
    """
    def one(seq: int) -> torch.Tensor:
        if layout == "contiguous":
            return torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype=dtype, device=device)
        if layout == "bshd":
            base = torch.randn(batch, seq, heads, head_dim, generator=gen).to(dtype=dtype, device=device)
            t = base.transpose(1, 2)
        elif layout == "sliced":
            base = torch.randn(batch, heads, seq + 3, head_dim + 64, generator=gen).to(dtype=dtype, device=device)
            t = base[:, :, 2:seq + 2, 32:32 + head_dim]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        assert t.stride(-1) == 1
        assert not t.is_contiguous() or (heads == 1 and layout == "bshd") or seq == 1
        return t

    return one(seq_q), one(seq_k), one(seq_k)


def make_block_mask(gen: torch.Generator, batch: int, heads: int, n_qblocks: int, n_kblocks: int,
                    kind: str = "random", *, density: float = 0.5, device="cpu") -> torch.Tensor:
    """A bool block mask ``[B, H, n_qblocks, n_kblocks]``.

    kinds:
        ``random``: each pair selected with probability ``density``.
        ``full`` / ``empty``: all True / all False.
        ``band``: a local window around the diagonal (query block i, scaled to the key axis).
        ``some_empty``: random with ``density``, then every third query block (and the last) emptied.
        ``first_last``: only the first and the last key block (exercises the ragged last key block).
    """
    shape = (batch, heads, n_qblocks, n_kblocks)
    if kind == "random":
        mask = torch.rand(shape, generator=gen) < density
    elif kind == "full":
        mask = torch.ones(shape, dtype=torch.bool)
    elif kind == "empty":
        mask = torch.zeros(shape, dtype=torch.bool)
    elif kind == "band":
        centre = (torch.arange(n_qblocks) + 0.5) * n_kblocks / n_qblocks
        half = max(1.0, 0.15 * n_kblocks)
        dist = (torch.arange(n_kblocks)[None, :] + 0.5 - centre[:, None]).abs()
        mask = (dist <= half).expand(shape).clone()
    elif kind == "some_empty":
        mask = torch.rand(shape, generator=gen) < density
        mask[:, :, ::3] = False
        mask[:, :, -1] = False
    elif kind == "first_last":
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[..., 0] = True
        mask[..., -1] = True
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask.to(device)


def empty_query_rows(mask: torch.Tensor, block_m: int, seq_q: int) -> torch.Tensor:
    """bool ``[B, H, Sq]``: query rows whose query block selects no key block."""
    return (~mask.any(-1)).repeat_interleave(block_m, dim=2)[:, :, :seq_q]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def unwritable_dir(tmp_path) -> "os.PathLike":
    """A directory path nothing can be written under: a read-only folder, or (as root, who writes through
    read-only modes) a path below a regular file."""
    from pathlib import Path

    if os.geteuid() == 0:
        blocker = Path(tmp_path) / "a-file"
        blocker.write_text("not a folder\n")
        return blocker / "cache"
    folder = Path(tmp_path) / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder
