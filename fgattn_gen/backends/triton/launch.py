"""Launch a Triton variant: render it once to ``<cache>/triton/<key>-<hash>.py`` (atomic rename, so
concurrent processes never see a partial file), import it, then per compaction head chunk run the
gather-load kernel. Triton compiles the module on first launch and caches the binary itself.

A cached file is used only if its bytes hash to the ``<hash>`` in its name (the hash of the freshly rendered
source); a file that was edited, appended to or truncated is rendered again and rewritten, with one warning.
The module is compiled from the verified bytes (no bytecode cache beside it), so what runs is what was checked.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path
from types import ModuleType

import torch
import triton

from ... import compaction
from ...environment import cache_dir, interpreting, write_atomic
from ...keyset import KeySet
from ...render import render, source_hash
from ...variant import Variant

_LOG2E = 1.4426950408889634


def _verified_source(variant: Variant, interpret: bool) -> tuple[Path, bytes]:
    """The cache file of ``variant`` and its verified bytes (rendered and rewritten when missing or when its
    bytes do not hash to the hash in its name)."""
    source = render(variant, interpret=interpret)
    digest = source_hash(source)
    path = cache_dir() / variant.backend / f"{variant.key}-{digest}.py"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    if data is not None and hashlib.sha256(data).hexdigest()[:16] == digest:
        return path, data
    if data is not None:
        warnings.warn(f"fgattn: cached kernel source {path} does not hash to {digest} (edited, truncated or "
                      f"corrupt); rendering it again", RuntimeWarning, stacklevel=3)
    data = source.encode()
    write_atomic(path, data)
    return path, data


def source_path(variant: Variant, *, interpret: bool = False) -> Path:
    """Render ``variant`` and make sure its verified source is on disk; returns the file."""
    return _verified_source(variant, interpret)[0]


@functools.cache
def load(variant: Variant, *, interpret: bool = False) -> ModuleType:
    """The imported module of a Triton variant (``module.kernel`` plus its pinned constants), once per process."""
    path, data = _verified_source(variant, interpret)
    module = ModuleType(f"fgattn_variant_{path.stem.replace('-', '_')}")
    module.__file__ = str(path)  # Triton reads the kernel's source through it (inspect.getsource)
    exec(compile(data, str(path), "exec"), module.__dict__)
    return module


def run(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: KeySet, scale: float,
        out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Write ``out`` ``[B, H, Sq, D]`` (and ``lse`` fp32 ``[B, H, Sq]`` if given) for validated inputs.

    The index workspace is built and consumed in chunks of heads (``compaction.heads_per_chunk``), so
    its memory stays bounded for any sequence length and density. No host synchronisation.
    """
    module = load(variant, interpret=interpreting())
    b, h, sq, _ = q.shape
    n_mtiles = triton.cdiv(sq, variant.tile_m)
    n_bh = b * h
    chunk = compaction.heads_per_chunk(keys)
    lse_arg = lse if lse is not None else out  # unused pointer when WRITE_LSE is False
    for bh_start in range(0, n_bh, chunk):
        n = min(chunk, n_bh - bh_start)
        idx, n_keys = compaction.compact(keys, bh_start, n, k.shape[2])
        module.kernel[(n_mtiles, n)](
            q, k, v, out, lse_arg, idx, n_keys,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            h, sq, keys.shape[2], idx.shape[-1], bh_start, scale * _LOG2E,
            WRITE_LSE=lse is not None,
            num_warps=module.NUM_WARPS, num_stages=module.NUM_STAGES,
        )
