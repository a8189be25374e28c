"""What every kernel backend states about itself (``BackendSpec``): its template, its tunable parameters
and their values, its own validity rules, the shared memory a variant needs, the defaults served without
tuning, and the files its kernels are made of. Pure rules: no torch device, Triton or cuda-python is
touched, so the registry and the tuner can ask without loading a kernel.

The launch side of a backend (render context, build, load, run) is ``backends/<name>/launch.py``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path


class BackendSpec(ABC):
    """One kernel family. Subclasses set the attributes and implement the abstract methods.

    Attributes:
        name: the backend's name, the first field of every variant key (``"triton"``, ``"cuda"``).
        template: the kernel template, relative to the template root.
        source_suffix: suffix of a rendered source (``registry/<variant-key><suffix>``).
        head_dims: head dims the kernel is written for.
        tunable: tunable Variant fields -> values the tuner searches, in sampling order.
        block_m_multiple: a KeySet ``block_m`` the backend serves is a multiple of this.
    """

    name: str
    template: str
    source_suffix: str
    head_dims: tuple[int, ...]
    tunable: dict[str, tuple[int, ...]]
    block_m_multiple: int

    def problems(self, variant) -> list[str]:
        """The backend's own reasons why ``variant`` (valid by the generic rules) is invalid."""
        return []

    @abstractmethod
    def smem_bytes(self, variant) -> int:
        """Shared memory one block of ``variant`` needs."""

    @abstractmethod
    def default_tiles(self, *, head_dim: int, block_m: int) -> list[dict[str, int]]:
        """Tile parameters (tile_m, tile_n, num_warps, num_stages) served without tuning, best first; the
        first whose shared memory fits the device is served."""

    def render_context(self, variant, *, interpret: bool) -> dict:
        """Template variables of ``variant`` besides its fields and key (override when there are any)."""
        return {}

    def supports(self, sm: tuple[int, int] | None) -> bool:
        """Whether the backend runs on a GPU of compute capability ``sm`` (None: Triton's interpreter)."""
        return True

    def template_files(self, root: Path) -> list[Path]:
        """Every file a rendered kernel of this backend is made of: the template and, for sources that
        ``#include "..."`` headers under ``root/<name>/include``, those headers (transitively)."""
        include_root = root / self.name / "include"
        files, todo = [], [root / self.template]
        while todo:
            path = todo.pop()
            if path in files:
                continue
            files.append(path)
            for name in re.findall(r'^\s*#include\s+"([^"]+)"', path.read_text(), re.MULTILINE):
                if (include_root / name).is_file():
                    todo.append(include_root / name)
        return sorted(files)
