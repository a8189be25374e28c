"""The search space: every valid variant of one or more backends for one model layout, filtered before
sampling.

A backend's tunable fields and their values are listed in ``TUNABLE``; with several backends, ``backend``
is sampled first and the other fields follow within it. The other Variant fields (dtype,
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

from ..render import cuda_headers, render, source_hash
from ..variant import Variant

if TYPE_CHECKING:  # the runtime registry hashes spaces without importing the tuner's optuna
    import optuna


class EmptySpaceError(ValueError):
    """No tunable point is valid for a layout (e.g. no tile_m divides the model's block_m)."""


TUNABLE: dict[str, dict[str, tuple[int, ...]]] = {
    "triton": {"tile_m": (64, 128), "tile_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)},
    # CUDA: 16 query rows per (consumer) warp, so tile_m = 16 * num_warps (Variant rejects the other pairs)
    "cuda": {"tile_m": (64, 128), "tile_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)},
}


@dataclass(frozen=True)
class SearchSpace:
    """Valid candidate variants of ``backends``; ``fields`` are the tunable Variant fields, in sampling
    order (``backend`` first when there are several); ``hash`` is ``space_hash`` of the layout."""

    backends: tuple[str, ...]
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

    def _walk(self, pick: Callable[[str, str, list], int | str]) -> tuple[Variant, dict[str, int | str]]:
        remaining = self.candidates
        params: dict[str, int | str] = {}
        for field in self.fields:
            choices = sorted({getattr(v, field) for v in remaining})
            all_choices = sorted({getattr(v, field) for v in self.candidates})
            name = field if choices == all_choices else f"{field}[{','.join(map(str, choices))}]"
            params[name] = pick(field, name, choices)
            remaining = tuple(v for v in remaining if getattr(v, field) == params[name])
        (variant,) = remaining
        return variant, params

    def suggest(self, trial: optuna.Trial) -> Variant:
        """Sample one candidate through ``trial`` (categorical parameters, one per tunable field)."""
        return self._walk(lambda field, name, choices: trial.suggest_categorical(name, choices))[0]

    def trial_params(self, variant: Variant) -> dict[str, int | str]:
        """The Optuna params ``suggest`` records for ``variant`` (for ``Study.enqueue_trial``)."""
        return self._walk(lambda field, name, choices: getattr(variant, field))[1]


def _backends(backends: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = (backends,) if isinstance(backends, str) else tuple(dict.fromkeys(backends))
    unknown = [b for b in names if b not in TUNABLE]
    if not names or unknown:
        raise ValueError(f"backend: no search space for {unknown or names!r}; known: {', '.join(TUNABLE)}")
    return names


def _layout_variants(backends: tuple[str, ...], *, dtype: str, head_dim: int, block_m: int,
                     block_n: int) -> list[Variant]:
    """Every ``TUNABLE`` point of ``backends`` that ``Variant`` accepts for this layout."""
    variants = []
    for backend in backends:
        for values in itertools.product(*TUNABLE[backend].values()):
            try:
                variants.append(Variant(backend=backend, dtype=dtype, head_dim=head_dim, block_m=block_m,
                                        block_n=block_n, **dict(zip(TUNABLE[backend], values))))
            except ValueError:  # Variant.problems() is not empty
                continue
    return variants


def _hash(variants: list[Variant]) -> str:
    points = sorted((v.key, source_hash(render(v))) for v in variants)
    if any(v.backend == "cuda" for v in variants):  # the CUDA sources include these
        points.append(("cuda headers", source_hash(json.dumps(cuda_headers()))))
    return hashlib.sha256(json.dumps(points).encode()).hexdigest()


def space_hash(backends: str | tuple[str, ...], *, dtype: str, head_dim: int, block_m: int, block_n: int) -> str:
    """sha256 of the sorted keys of the layout's valid variants (of every backend in ``backends``), each with
    the source hash of its rendered kernel. It changes when a template, the tunable values or the validity
    rules change, and is the same on every device: the shared-memory filter of ``build_space`` is not part
    of it."""
    return _hash(_layout_variants(_backends(backends), dtype=dtype, head_dim=head_dim, block_m=block_m,
                                  block_n=block_n))


def build_space(backends: str | tuple[str, ...], *, dtype: str, head_dim: int, block_m: int, block_n: int,
                smem_limit: int | None) -> SearchSpace:
    """All valid variants of ``backends`` (one name or several) for this layout whose ``smem_bytes()`` fit
    ``smem_limit`` (None: no limit, as under the interpreter). Raises EmptySpaceError if none is valid."""
    names = _backends(backends)
    variants = _layout_variants(names, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n)
    candidates = [v for v in variants if smem_limit is None or v.smem_bytes() <= smem_limit]
    if not candidates:
        limit = "" if smem_limit is None else f" within {smem_limit} bytes of shared memory"
        raise EmptySpaceError(f"no valid {'/'.join(names)} variant for dtype={dtype}, head_dim={head_dim}, "
                              f"block_m={block_m}, block_n={block_n}{limit} "
                              f"(tunable values: {[TUNABLE[b] for b in names]})")
    fields = tuple(dict.fromkeys(f for b in names for f in TUNABLE[b]))
    if len({v.backend for v in candidates}) > 1:
        fields = ("backend", *fields)
    return SearchSpace(names, fields, tuple(candidates), _hash(variants))
