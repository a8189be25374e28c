"""The search space: every valid variant of one backend for one model layout, filtered before sampling.

A backend's tunable fields and their values are listed in ``TUNABLE``; the other Variant fields (dtype,
head_dim, block_m, block_n) are fixed by the model. Points that ``Variant`` rejects (e.g. tile_m not
dividing block_m) or whose shared memory exceeds the device's opt-in limit are dropped up front, so
the sampler only ever sees valid points.

Optuna's categorical distributions must keep the same choices for a parameter name within a study, so
the space is sampled as a tree (define-by-run, field by field): a field whose valid values depend on
the fields before it gets a name that lists them, e.g. ``num_stages[2,3]`` when tile_n=128 leaves only
two stage counts. When nothing is filtered, the names are plain field names. ``BruteForceSampler``
walks such a tree exhaustively; ``TPESampler(group=True)`` models each branch.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Callable

import optuna

from ..render import render, source_hash
from ..variant import Variant

TUNABLE: dict[str, dict[str, tuple[int, ...]]] = {
    "triton": {"tile_m": (64, 128), "tile_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)},
}


@dataclass(frozen=True)
class SearchSpace:
    """Valid candidate variants of ``backend``; ``fields`` are the tunable Variant fields, in sampling order."""

    backend: str
    fields: tuple[str, ...]
    candidates: tuple[Variant, ...]

    def __len__(self) -> int:
        return len(self.candidates)

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the sorted candidate keys with the source hash of each rendered kernel: changes when
        the valid points or the template change."""
        points = sorted((v.key, source_hash(render(v))) for v in self.candidates)
        return hashlib.sha256(json.dumps(points).encode()).hexdigest()

    @functools.cached_property
    def _by_key(self) -> dict[str, Variant]:
        return {v.key: v for v in self.candidates}

    @property
    def keys(self) -> frozenset[str]:
        """Keys of all candidates."""
        return frozenset(self._by_key)

    def variant(self, key: str) -> Variant:
        """The candidate with this key (KeyError if it is not in the space)."""
        return self._by_key[key]

    def _walk(self, pick: Callable[[str, str, list[int]], int]) -> tuple[Variant, dict[str, int]]:
        remaining = self.candidates
        params: dict[str, int] = {}
        for field in self.fields:
            choices = sorted({getattr(v, field) for v in remaining})
            all_choices = sorted({getattr(v, field) for v in self.candidates})
            name = field if choices == all_choices else f"{field}[{','.join(map(str, choices))}]"
            params[name] = pick(field, name, choices)
            remaining = tuple(v for v in remaining if getattr(v, field) == params[name])
        (variant,) = remaining
        return variant, params

    def suggest(self, trial: optuna.Trial) -> Variant:
        """Sample one candidate through ``trial`` (categorical int parameters, one per tunable field)."""
        return self._walk(lambda field, name, choices: trial.suggest_categorical(name, choices))[0]

    def trial_params(self, variant: Variant) -> dict[str, int]:
        """The Optuna params ``suggest`` records for ``variant`` (for ``Study.enqueue_trial``)."""
        return self._walk(lambda field, name, choices: getattr(variant, field))[1]


def build_space(backend: str, *, dtype: str, head_dim: int, block_m: int, block_n: int,
                smem_limit: int | None) -> SearchSpace:
    """All valid variants of ``backend`` for this layout whose ``smem_bytes()`` fit ``smem_limit``
    (None: no limit, as under the interpreter). Raises ValueError if none is valid."""
    if backend not in TUNABLE:
        raise ValueError(f"backend: no search space for {backend!r}; known: {', '.join(TUNABLE)}")
    fields = tuple(TUNABLE[backend])
    candidates = []
    for values in itertools.product(*TUNABLE[backend].values()):
        try:
            variant = Variant(backend=backend, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
                              **dict(zip(fields, values)))
        except ValueError:  # Variant.problems() is not empty
            continue
        if smem_limit is None or variant.smem_bytes() <= smem_limit:
            candidates.append(variant)
    if not candidates:
        raise ValueError(f"no valid {backend} variant for dtype={dtype}, head_dim={head_dim}, block_m={block_m}, "
                         f"block_n={block_n} within {smem_limit} bytes of shared memory")
    return SearchSpace(backend, fields, tuple(candidates))
