"""The search space: every valid variant of one backend for one model layout, filtered before sampling.

A backend's tunable fields and their values are listed in ``TUNABLE``; the other Variant fields (dtype,
head_dim, block_m, block_n) are fixed by the model. Points that ``Variant`` rejects (e.g. tile_m not
dividing block_m) or whose shared memory exceeds the device's opt-in limit are dropped up front, so
the sampler only ever sees valid points. ``space_hash`` identifies the layout's space (valid points and
their rendered sources) independently of the device, for the tuned file's metadata and study names.

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
from typing import TYPE_CHECKING, Callable

from ..render import render, source_hash
from ..variant import Variant

if TYPE_CHECKING:  # the runtime registry hashes spaces without importing the tuner's optuna
    import optuna


class EmptySpaceError(ValueError):
    """No tunable point is valid for a layout (e.g. no tile_m divides the model's block_m)."""


TUNABLE: dict[str, dict[str, tuple[int, ...]]] = {
    "triton": {"tile_m": (64, 128), "tile_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)},
}


@dataclass(frozen=True)
class SearchSpace:
    """Valid candidate variants of ``backend``; ``fields`` are the tunable Variant fields, in sampling order;
    ``hash`` is ``space_hash`` of the layout."""

    backend: str
    fields: tuple[str, ...]
    candidates: tuple[Variant, ...]
    hash: str

    def __len__(self) -> int:
        return len(self.candidates)

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


def _layout_variants(backend: str, *, dtype: str, head_dim: int, block_m: int, block_n: int) -> list[Variant]:
    """Every ``TUNABLE`` point of ``backend`` that ``Variant`` accepts for this layout."""
    if backend not in TUNABLE:
        raise ValueError(f"backend: no search space for {backend!r}; known: {', '.join(TUNABLE)}")
    variants = []
    for values in itertools.product(*TUNABLE[backend].values()):
        try:
            variants.append(Variant(backend=backend, dtype=dtype, head_dim=head_dim, block_m=block_m,
                                    block_n=block_n, **dict(zip(TUNABLE[backend], values))))
        except ValueError:  # Variant.problems() is not empty
            continue
    return variants


def _hash(variants: list[Variant]) -> str:
    points = sorted((v.key, source_hash(render(v))) for v in variants)
    return hashlib.sha256(json.dumps(points).encode()).hexdigest()


def space_hash(backend: str, *, dtype: str, head_dim: int, block_m: int, block_n: int) -> str:
    """sha256 of the sorted keys of the layout's valid variants, each with the source hash of its rendered
    kernel. It changes when the template, the tunable values or the validity rules change, and is the same
    on every device: the shared-memory filter of ``build_space`` is not part of it."""
    return _hash(_layout_variants(backend, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n))


def build_space(backend: str, *, dtype: str, head_dim: int, block_m: int, block_n: int,
                smem_limit: int | None) -> SearchSpace:
    """All valid variants of ``backend`` for this layout whose ``smem_bytes()`` fit ``smem_limit``
    (None: no limit, as under the interpreter). Raises EmptySpaceError if none is valid."""
    variants = _layout_variants(backend, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n)
    candidates = [v for v in variants if smem_limit is None or v.smem_bytes() <= smem_limit]
    if not candidates:
        limit = "" if smem_limit is None else f" within {smem_limit} bytes of shared memory"
        raise EmptySpaceError(f"no valid {backend} variant for dtype={dtype}, head_dim={head_dim}, block_m={block_m}, "
                              f"block_n={block_n}{limit} (tunable values: {TUNABLE[backend]})")
    return SearchSpace(backend, tuple(TUNABLE[backend]), tuple(candidates), _hash(variants))
