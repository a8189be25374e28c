"""fgattn: generate, autotune and serve fine-grained sparse attention kernels for diffusion transformers.

Flow: template (``templates/``) -> Variant -> render/build -> check -> measure -> tuned YAML -> registry
-> ``attention()``.
"""

__version__ = "0.1.0"

from .attention import attention  # noqa: E402
from .keyset import KeySet  # noqa: E402
from .reference import reference_attention  # noqa: E402
from .variant import Variant, default_variant  # noqa: E402

__all__ = ["KeySet", "Variant", "attention", "default_variant", "reference_attention", "__version__"]
