"""``fgattn-tune``: find the fastest correct kernel variant for every attention shape of a model.

Pipeline, one module each:

- ``device``: the GPU (or Triton's CPU interpreter) being tuned for, and its limits.
- ``space``: the catalogue's variants (``fgattn_gen.catalogue``) of one or more backends, filtered by the device
  before sampling.
- ``workload``: the inputs of one (shape, density): the shape actually timed, q/k/v sets, KeySet, reference.
- ``objective``: one Optuna trial = one candidate: correctness gate, then timing; failures are pruned.
- ``cpu_timing``: wall-clock timing for interpreter runs (``fgattn_gen.timing`` needs a GPU).
- ``peers``: dense SDPA and FlexAttention block-sparse times at the same shape (GPU only).
- ``storage``: ``--storage`` URLs and the default resumable journal file.
- ``study``: one Optuna study per (device, model, shape, density): sampler, seeding, budget, resume.
- ``workers``: one tuning subprocess per GPU for ``--gpus``, progress from the shared storage.
- ``export``: finished studies -> the tuned YAML document (``fgattn_gen.tuned``).
- ``report``: rich progress bar and summary tables; ``plot``: search-history PNGs.
- ``options``: the run's settings as parsed by ``fgattn_gen.cli``; ``runner``: the whole run for one model.

Serving (``attention``, the registry, tuned-file loading) imports nothing from here, and nothing here is needed
to serve: optuna, rich and matplotlib are the ``fgattn[tune]`` extra. The CLI sets ``TRITON_INTERPRET`` before
importing this package.
"""
