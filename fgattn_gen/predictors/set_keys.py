"""``SetKeys``: a KeySet that does not depend on q/k (every key, or a synthetic local mask of a density)."""

from __future__ import annotations

import torch

from ..keyset import KeySet
from ..synthetic import local_block_mask
from .base import Prediction, Predictor


class SetKeys(Predictor):
    """A KeySet that does not depend on q/k: every key (``density=None``) or a synthetic local mask of
    ``density``; built once per shape and device."""

    def __init__(self, *, density: float | None = None, seed: int = 0, block_m: int = 128, block_n: int = 1,
                 keep_keys: tuple[int, int] | None = None, scale: float | None = None):
        if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                    or not 0 < density <= 1):
            raise ValueError(f"density: fixed_density needs a key density in (0, 1], got {density!r}")
        self.density, self.seed, self.block_m, self.block_n, self.keep = density, seed, block_m, block_n, keep_keys
        self._built: dict[tuple, KeySet] = {}

    def predict(self, q, k, v) -> Prediction:
        b, h, seq_q, _ = q.shape
        seq_k = k.shape[2]
        slot = (b, h, seq_q, seq_k, q.device)
        if slot not in self._built:
            self._built[slot] = self._build(b, h, seq_q, seq_k, q.device)
        return Prediction(self._built[slot])

    def _build(self, b: int, h: int, seq_q: int, seq_k: int, device: torch.device) -> KeySet:
        if self.density is None:
            return KeySet.full(b, h, seq_q, seq_k, block_m=self.block_m, block_n=self.block_n, device=device)
        n_qblocks, n_kblocks = -(-seq_q // self.block_m), -(-seq_k // self.block_n)
        bits = []
        for head in range(h):
            mask = local_block_mask(b, 1, n_qblocks, n_kblocks, self.density, seed=self.seed + head, device=device)
            if self.keep is not None:
                mask[..., self.keep[0] // self.block_n:-(-self.keep[1] // self.block_n)] = True
            bits.append(KeySet.from_mask(mask, block_m=self.block_m, block_n=self.block_n).bits)
        return KeySet(torch.cat(bits, 1), n_kblocks, self.block_m, self.block_n)
