"""Render a variant's kernel template (``BackendSpec.template`` under the template root) with Jinja2's
StrictUndefined: every parameter is pinned in the source. The CUDA headers the sources include are
handed to NVRTC by name (``cuda_headers``)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jinja2

from .backends import spec
from .environment import templates_dir
from .variant import Variant


@functools.cache
def _environment(root: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )


def render(variant: Variant, *, interpret: bool = False) -> str:
    """Source text of ``variant`` (Triton Python or CUDA C++). ``interpret`` renders the Triton-interpreter
    form (fp32 dots)."""
    backend = spec(variant.backend)
    template = _environment(templates_dir()).get_template(backend.template)
    return template.render(**variant.params, key=variant.key, **backend.render_context(variant, interpret=interpret))


def cuda_headers() -> tuple[tuple[str, str], ...]:
    """``(include name, text)`` of every CUDA kernel header under ``templates/cuda/include``."""
    root = templates_dir() / "cuda" / "include"
    return tuple((p.relative_to(root).as_posix(), p.read_text()) for p in sorted(root.rglob("*.cuh")))


def source_hash(source: str) -> str:
    """First 16 hex digits of the sha256 of ``source``."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]
