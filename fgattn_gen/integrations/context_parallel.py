"""diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``) as the
fgattn processors see it: the processor's ``_parallel_config`` -> the Ulysses process group and degree.

Under ``ContextParallelConfig(ulysses_degree=N)`` diffusers' split hooks (the model's ``_cp_plan``, or the
``cp_plan`` passed to ``enable_parallelism``) hand each rank an even shard of the sequence, and the attention
backend is expected to do the Ulysses all-to-all over ``config._ulysses_mesh``'s group; the fgattn processors do
it with ``parallel.ulysses_apply`` and run fgattn on every token of H/N heads. Ring attention
(``ring_degree > 1``) and uneven shards (``ulysses_anything``) are refused with a ValueError naming the option.
"""

from __future__ import annotations


def check_config(parallel_config) -> None:
    """ValueError unless ``parallel_config`` (a diffusers ``ParallelConfig`` or None) is one fgattn runs:
    none, no context parallelism, or Ulysses context parallelism with even shards."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return
    if cp.ring_degree > 1:
        raise ValueError(f"ContextParallelConfig.ring_degree={cp.ring_degree}: the fgattn processors run Ulysses "
                         f"context parallelism only; use ContextParallelConfig(ulysses_degree=N) with ring_degree=1")
    if cp.ulysses_anything:
        raise ValueError("ContextParallelConfig.ulysses_anything=True: the fgattn processors need even sequence "
                         "shards; use ContextParallelConfig(ulysses_degree=N) with a sequence length N divides")


def ulysses_group(parallel_config, heads: int):
    """(process group, degree) of the Ulysses all-to-all of a processor's ``_parallel_config``; (None, 1) when
    it has no context parallelism. ValueError for a config ``check_config`` refuses or a head count the degree
    does not divide."""
    check_config(parallel_config)
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None, 1
    if cp._ulysses_mesh is None:
        raise RuntimeError("ContextParallelConfig: not set up; call transformer.enable_parallelism(config=...)")
    if heads % cp.ulysses_degree:
        raise ValueError(f"ContextParallelConfig.ulysses_degree={cp.ulysses_degree} must divide the attention head "
                         f"count, {heads}")
    return cp._ulysses_mesh.get_group(), cp.ulysses_degree
