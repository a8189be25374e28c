"""fgattn: generate, autotune and serve fine-grained sparse attention kernels for diffusion transformers.

Flow: template (``templates/``) -> Variant (``backends``, ``catalogue``) -> render/build -> check -> measure
(``tune``, ``fgattn-tune``) -> tuned YAML (``tuned``) -> registry (``registry``) -> ``attention()``.

The public names and modules are imported on first use (PEP 562): ``import fgattn_gen`` imports neither
torch nor Triton, so a caller (``fgattn-tune --interpret``) can still choose Triton's CPU interpreter, and
``fgattn_gen.predictors``, ``fgattn_gen.registry``, ``fgattn_gen.integrations`` resolve as attributes.
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
_MODULES = ("backends", "catalogue", "ditdata", "integrations", "parallel", "predictors", "registry", "tune", "tuned")
__all__ = [*_EXPORTS, *_MODULES, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fgattn_gen' has no attribute {name!r}")
