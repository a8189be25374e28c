"""Terminal output of a tuning run: the rich progress bar over trials and one summary table per shape."""

from __future__ import annotations

import os

from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..models import ModelSpec
from .peers import PEERS
from .space import SearchSpace


def progress_bar(console) -> Progress:
    """A progress bar of finished trials (use as a context manager)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("trials"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _layout_prefix(space: SearchSpace) -> str:
    """The leading ``_``-separated key fields all candidates share (``triton_bf16_d128_qb128_kg1_``)."""
    prefix = os.path.commonprefix(sorted(space.keys))
    return prefix[: prefix.rfind("_") + 1] if len(space) > 1 else ""


def summary_tables(model: ModelSpec, space: SearchSpace, entries: list[dict],
                   failures: dict[tuple[str, float], str]) -> list[Table]:
    """One table per shape of ``model``: a row per density with the best variant, its time and the peers.

    ``entries`` are tuned-file entries of this run; ``failures`` maps (shape label, density) to why it has
    no entry (every variant pruned). Variant keys are shown without the layout fields all candidates share."""
    prefix = _layout_prefix(space)
    peers = [p for p in PEERS if any(p in e.get("baselines", {}) for e in entries)]
    tables = []
    for shape in model.shapes:
        rows = sorted((e for e in entries if e["label"] == shape.name), key=lambda e: -e["density"])
        failed = sorted(((d, why) for (label, d), why in failures.items() if label == shape.name), reverse=True)
        if not rows and not failed:
            continue
        timed = f"; timed: {rows[0]['measured']['heads']} heads x {rows[0]['measured']['seq_q']}" if rows else ""
        table = Table(title=f"{model.name} {shape.name}: {model.heads} heads x {shape.seq} tokens{timed}",
                      caption=f"variants: {prefix}<shown>" if prefix else None, box=box.SIMPLE_HEAD)
        for column in ("density", "best variant", "ms", "p20-p80", "trials", "pruned", *peers):
            table.add_column(column, justify="left" if column == "best variant" else "right")
        if "sdpa-cudnn" in peers:
            table.add_column("vs sdpa", justify="right")
        for entry in rows:
            best, times = entry["best"], entry.get("baselines", {})
            cells = [f"{entry['density']:g}", best["key"][len(prefix):], f"{best['ms']:.3f}",
                     f"{best['ms_p20']:.3f}-{best['ms_p80']:.3f}", str(entry["n_trials"]), str(entry["n_pruned"]),
                     *(f"{times[p]:.3f}" if p in times else "-" for p in peers)]
            if "sdpa-cudnn" in peers:
                cells.append(f"{times['sdpa-cudnn'] / best['ms']:.2f}x" if "sdpa-cudnn" in times else "-")
            table.add_row(*cells)
        for density, why in failed:
            table.add_row(f"{density:g}", f"[red]no correct variant: {why}[/red]",
                          *("-" for _ in range(len(table.columns) - 2)))
        tables.append(table)
    return tables
