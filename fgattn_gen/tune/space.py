"""The search space: the catalogue's valid variants (``fgattn_gen.catalogue``) of one or more backends for
one model layout, filtered by the device before sampling.

A backend's tunable fields and their values are its ``BackendSpec.tunable``; with several backends,
``backend`` is sampled first and the other fields follow within it. The other Variant fields (dtype,
head_dim, block_m, block_n) are fixed by the model. Points that ``Variant`` rejects (e.g. tile_m not
dividing block_m) or whose shared memory exceeds the device's opt-in limit are dropped up front, so
the sampler only ever sees valid points. ``catalogue.space_hash`` identifies the layout's space
independently of the device, for the tuned file's metadata and study names.

Optuna's categorical distributions must keep the same choices for a parameter name within a study, so
the space is sampled as a tree (define-by-run, field by field): a field whose valid values depend on
the fields before it gets a name that lists them, e.g. ``num_stages[2,3]`` when tile_n=128 leaves only
two stage counts. When nothing is filtered, the names are plain field names. ``BruteForceSampler``
walks such a tree exhaustively; ``TPESampler(group=True)`` models each branch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..backends import spec
from ..catalogue import backend_names, layout_variants, space_hash
from ..variant import Variant

if TYPE_CHECKING:
    import optuna


class EmptySpaceError(ValueError):
    """No tunable point is valid for a layout (e.g. no tile_m divides the model's block_m)."""


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


def build_space(backends: str | tuple[str, ...], *, dtype: str, head_dim: int, block_m: int, block_n: int,
                smem_limit: int | None) -> SearchSpace:
    """All valid variants of ``backends`` (one name or several) for this layout whose ``smem_bytes()`` fit
    ``smem_limit`` (None: no limit, as under the interpreter). Raises EmptySpaceError if none is valid."""
    names = backend_names(backends)
    layout = dict(dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n)
    variants = layout_variants(names, **layout)
    candidates = [v for v in variants if smem_limit is None or v.smem_bytes() <= smem_limit]
    if not candidates:
        limit = "" if smem_limit is None else f" within {smem_limit} bytes of shared memory"
        raise EmptySpaceError(f"no valid {'/'.join(names)} variant for dtype={dtype}, head_dim={head_dim}, "
                              f"block_m={block_m}, block_n={block_n}{limit} "
                              f"(tunable values: {[spec(b).tunable for b in names]})")
    fields = tuple(dict.fromkeys(f for b in names for f in spec(b).tunable))
    if len({v.backend for v in candidates}) > 1:
        fields = ("backend", *fields)
    return SearchSpace(names, fields, tuple(candidates), space_hash(names, **layout))
