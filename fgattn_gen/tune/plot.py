"""Search-history PNGs (``--plot``): Optuna's optimization-history plot of each study, through matplotlib.

matplotlib is optional (``pip install fgattn[plot]``); ``require_matplotlib`` tells the CLI before any work."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import optuna


def require_matplotlib() -> None:
    """Raise ImportError with an install hint when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or pip install 'fgattn[plot]')")


def save_history(study: optuna.Study, path: Path, title: str) -> None:
    """Write the objective value (ms) of each complete trial and the best so far to a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name="median ms")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
