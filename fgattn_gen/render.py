"""Render kernel templates (``templates/``) for a variant with Jinja2's StrictUndefined: the Triton module or
the CUDA translation unit (plus the CUDA headers it includes, passed to NVRTC by name)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import jinja2

from .variant import Variant

_TL_DTYPES = {"bf16": "tl.bfloat16", "fp16": "tl.float16"}
_TEMPLATES = {"triton": "triton/gather_attention.py.j2", "cuda": "cuda/gather_attention.cu.j2"}


_CHECKOUT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def templates_dir() -> Path:
    """The template root: ``$FGATTN_TEMPLATES`` or the checkout's ``templates/``."""
    override = os.environ.get("FGATTN_TEMPLATES")
    return Path(override) if override else _CHECKOUT_TEMPLATES


@functools.cache
def _environment(root: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )


def render(variant: Variant, *, interpret: bool = False) -> str:
    """Source text of ``variant``: Triton Python, or CUDA C++ (its headers: ``cuda_headers``).
    ``interpret`` renders the Triton-interpreter form (fp32 dots)."""
    template = _environment(templates_dir()).get_template(_TEMPLATES[variant.backend])
    if variant.backend == "cuda":
        return template.render(**variant.params, key=variant.key, smem_bytes=variant.smem_bytes())
    return template.render(
        **variant.params, key=variant.key, tl_dtype=_TL_DTYPES[variant.dtype], dot_fp32=interpret,
    )


def cuda_headers() -> tuple[tuple[str, str], ...]:
    """``(include name, text)`` of every CUDA kernel header under ``templates/cuda/include``."""
    root = templates_dir() / "cuda" / "include"
    return tuple((p.relative_to(root).as_posix(), p.read_text()) for p in sorted(root.rglob("*.cuh")))


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]
