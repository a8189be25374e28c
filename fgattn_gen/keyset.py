"""The sparse key layout: which keys each block of queries attends to.

Encoding: a packed bitmask, one bit per (query block, key block) pair.

    bits : int32 [B, H, n_qblocks, n_words],  n_words = ceil(n_kblocks / 32)
    bit j of word w of row (b, h, i)  <=>  key block 32*w + j is selected for query block i

A query block holds ``block_m`` consecutive queries, a key block ``block_n`` consecutive keys
(``block_n = 1`` is the M x 1 slice of the paper; ``block_n = 128`` is ordinary block sparsity).
Padding bits past the last key block are zero.

Why a bitmask: at HunyuanVideo 720p (B=1, H=24, 118,800 tokens, block_m=128, block_n=1) it takes
24 * 929 * 3713 * 4 B = 0.33 GiB at any density, where int32 index lists would take ~4 GiB at 30 %
density. The kernels need index lists; ``fgattn_gen.compaction`` builds them on the GPU per call,
in head chunks under a workspace budget (see there).

Every method runs as tensor ops on the mask's device with no host synchronisation, except
``density()`` and ``nbytes``, which return Python numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _describe(x) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _popcount32(words: torch.Tensor) -> torch.Tensor:
    """Per-element bit count of an int32 tensor (SWAR; no lookup table, no host sync)."""
    x = words - ((words >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@dataclass(frozen=True)
class KeySet:
    """Selected key blocks per (batch, head, query block), as a packed bitmask.

    Attributes:
        bits: int32 ``[B, H, n_qblocks, ceil(n_kblocks / 32)]``, contiguous.
        n_kblocks: number of key blocks, ``ceil(Sk / block_n)``.
        block_m: queries per query block.
        block_n: keys per key block (key granularity).
        density_hint: the fraction of selected pairs when the maker knows it without a host sync (a Python
            float in (0, 1]), else None; ``attention`` passes it to the registry lookup.
        query_order: None (query block i holds queries ``i*block_m .. (i+1)*block_m - 1``), or int64
            ``[B, H, Sq]``, a permutation of each head's queries: query block i holds the queries
            ``query_order[b, h, i*block_m : (i+1)*block_m]`` (clustered query blocks). ``attention`` gathers
            those q rows and scatters the output rows back.
    """

    bits: torch.Tensor
    n_kblocks: int
    block_m: int
    block_n: int = 1
    density_hint: float | None = None
    query_order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "n_kblocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KeySet: {name} must be a positive int, got {value!r}")
        if not isinstance(self.bits, torch.Tensor) or self.bits.dtype != torch.int32 or self.bits.dim() != 4:
            raise ValueError(
                f"KeySet: bits must be an int32 tensor [B, H, n_qblocks, n_words], "
                f"got {_describe(self.bits)}"
            )
        if self.density_hint is not None and not (isinstance(self.density_hint, float)
                                                  and 0 < self.density_hint <= 1):
            raise ValueError(f"KeySet: density_hint must be a float in (0, 1] or None, got {self.density_hint!r}")
        if self.query_order is not None:
            order = self.query_order
            if not isinstance(order, torch.Tensor) or order.dtype != torch.int64 or order.dim() != 3 \
                    or order.shape[:2] != self.bits.shape[:2] or order.device != self.bits.device:
                raise ValueError(f"KeySet: query_order must be an int64 tensor [B, H, Sq] with B, H = "
                                 f"{tuple(self.bits.shape[:2])} on {self.bits.device}, got {_describe(order)}")
            if _ceil_div(order.shape[2], self.block_m) != self.bits.shape[2]:
                raise ValueError(f"KeySet: query_order has {order.shape[2]} queries, which make "
                                 f"{_ceil_div(order.shape[2], self.block_m)} query blocks of {self.block_m}, but "
                                 f"bits has {self.bits.shape[2]}")
        if self.bits.numel() == 0:
            raise ValueError(f"KeySet: bits must have at least one batch, head and query block, got shape "
                             f"{tuple(self.bits.shape)}")
        if not self.bits.is_contiguous():
            raise ValueError("KeySet: bits must be contiguous")
        if self.bits.shape[-1] != _ceil_div(self.n_kblocks, 32):
            raise ValueError(
                f"KeySet: bits has {self.bits.shape[-1]} words per row, "
                f"expected ceil(n_kblocks / 32) = {_ceil_div(self.n_kblocks, 32)}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mask(cls, mask: torch.Tensor, *, block_m: int, block_n: int = 1) -> "KeySet":
        """Pack a boolean block mask.

        Args:
            mask: bool ``[B, H, ceil(Sq / block_m), ceil(Sk / block_n)]``; True = computed.
            block_m: queries per query block.
            block_n: keys per key block.
        Returns:
            KeySet on ``mask.device``.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            got = f"{mask.dtype} of rank {mask.dim()}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"KeySet.from_mask: mask must be a bool tensor [B, H, n_qblocks, n_kblocks], got {got}")
        n_kblocks = mask.shape[-1]
        if n_kblocks < 1 or mask.shape[-2] < 1:
            raise ValueError(f"KeySet.from_mask: mask must have at least one query and key block, got {tuple(mask.shape)}")
        n_words = _ceil_div(n_kblocks, 32)
        padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, n_words * 32 - n_kblocks))
        weights = (1 << torch.arange(8, dtype=torch.int32, device=mask.device)).to(torch.uint8)  # no host copy
        packed = (padded.view(*mask.shape[:3], n_words * 4, 8) * weights).sum(-1, dtype=torch.uint8)
        bits = packed.view(torch.int32).contiguous()  # little-endian: byte 0 holds key blocks 0..7
        return cls(bits=bits, n_kblocks=n_kblocks, block_m=block_m, block_n=block_n)

    @classmethod
    def full(cls, batch: int, heads: int, seq_q: int, seq_k: int, *, block_m: int, block_n: int = 1,
             device: torch.device | str | None = None) -> "KeySet":
        """Every key selected for every query block (dense attention)."""
        mask = torch.ones(batch, heads, _ceil_div(seq_q, block_m), _ceil_div(seq_k, block_n),
                          dtype=torch.bool, device=device)
        return cls.from_mask(mask, block_m=block_m, block_n=block_n)

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, n_qblocks, n_kblocks)``: the shape of ``to_mask()``."""
        b, h, nq, _ = self.bits.shape
        return b, h, nq, self.n_kblocks

    @property
    def device(self) -> torch.device:
        return self.bits.device

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size()

    def to_mask(self) -> torch.Tensor:
        """Unpack to bool ``[B, H, n_qblocks, n_kblocks]``."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self.device)
        bytes_ = self.bits.view(torch.uint8)
        unpacked = (bytes_.unsqueeze(-1) >> shifts) & 1
        return unpacked.flatten(-2)[..., : self.n_kblocks].bool()

    def counts(self) -> torch.Tensor:
        """int32 ``[B, H, n_qblocks]``: selected key blocks per query block (padding bits ignored)."""
        used = self.n_kblocks - 32 * (self.bits.shape[-1] - 1)  # bits of the last word that name key blocks
        last_word_mask = -1 if used == 32 else (1 << used) - 1
        words = torch.cat([self.bits[..., :-1], self.bits[..., -1:] & last_word_mask], dim=-1)
        return _popcount32(words).sum(-1, dtype=torch.int32)

    def density(self) -> float:
        """Fraction of (query block, key block) pairs selected, in [0, 1] (synchronises)."""
        b, h, nq, nk = self.shape
        return float(self.counts().sum(dtype=torch.int64)) / (b * h * nq * nk)

    def to(self, device: torch.device | str) -> "KeySet":
        order = None if self.query_order is None else self.query_order.to(device)
        return KeySet(self.bits.to(device), self.n_kblocks, self.block_m, self.block_n, self.density_hint, order)

    def check_compatible(self, batch: int, heads: int, seq_q: int, seq_k: int, device: torch.device) -> None:
        """Raise ValueError naming ``keys`` if this layout does not fit q ``[B, H, Sq, D]`` / k ``[B, H, Sk, D]``."""
        expected = (batch, heads, _ceil_div(seq_q, self.block_m), _ceil_div(seq_k, self.block_n))
        if self.shape != expected:
            raise ValueError(
                f"keys: KeySet of shape {self.shape} (block_m={self.block_m}, block_n={self.block_n}) does not match "
                f"q/k with B={batch}, H={heads}, Sq={seq_q}, Sk={seq_k}; expected "
                f"[B, H, ceil(Sq/block_m), ceil(Sk/block_n)] = {expected}"
            )
        if self.device != device:
            raise ValueError(f"keys: KeySet is on {self.device} but q is on {device}")
        if self.query_order is not None and self.query_order.shape[2] != seq_q:
            raise ValueError(f"keys: query_order orders {self.query_order.shape[2]} queries, q has Sq={seq_q}")
