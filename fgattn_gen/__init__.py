"""fgattn: generate, autotune and serve fine-grained sparse attention kernels for diffusion transformers.

Flow: template (``templates/``) -> Variant -> render/build -> check -> measure -> tuned YAML -> registry
-> ``attention()``.

The public names are imported on first use (PEP 562), so ``import fgattn_gen`` does not import Triton:
a caller (``fgattn-tune --interpret``) can still choose Triton's CPU interpreter afterwards.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "attention": ".attention_api",
    "KeySet": ".keyset",
    "reference_attention": ".reference",
    "Variant": ".variant",
    "default_variant": ".variant",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'fgattn_gen' has no attribute {name!r}")
