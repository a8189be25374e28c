"""Terminal output of a tuning run: the rich progress bar over trials and one summary table per shape."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..models import ModelSpec
from .peers import PEERS


def progress_bar(console) -> Progress:
    """A progress bar of finished trials (use as a context manager)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("trials"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_tables(model: ModelSpec, entries: list[dict], failures: dict[tuple[str, float], str]) -> list[Table]:
    """One table per shape of ``model``: a row per density with the best variant, its time and the peers.

    ``entries`` are tuned-file entries of this run; ``failures`` maps (shape label, density) to why it has
    no entry (every variant pruned)."""
    tables = []
    for shape in model.shapes:
        rows = [e for e in entries if e["label"] == shape.name]
        failed = {d: why for (label, d), why in failures.items() if label == shape.name}
        if not rows and not failed:
            continue
        timed = f", timed with {rows[0]['measured']['heads']} heads x {rows[0]['measured']['seq_q']} tokens" if rows else ""
        table = Table(title=f"{model.name} {shape.name}: heads={model.heads}, seq={shape.seq}, "
                            f"head_dim={model.head_dim}{timed}")
        for column in ("density", "best variant", "ms", "p20-p80", "trials (pruned)", *PEERS, "vs sdpa-cudnn"):
            table.add_column(column, justify="left" if column == "best variant" else "right")
        for entry in sorted(rows, key=lambda e: -e["density"]):
            best, peers = entry["best"], entry.get("baselines", {})
            dense = peers.get("sdpa-cudnn")
            table.add_row(f"{entry['density']:g}", best["key"], _ms(best["ms"]),
                          f"{best['ms_p20']:.3f}-{best['ms_p80']:.3f}", f"{entry['n_trials']} ({entry['n_pruned']})",
                          *(_ms(peers.get(p)) for p in PEERS), f"{dense / best['ms']:.2f}x" if dense else "-")
        for density, why in sorted(failed.items(), key=lambda kv: -kv[0]):
            table.add_row(f"{density:g}", f"[red]no correct variant: {why}", "-", "-", "-", *("-" for _ in PEERS), "-")
        tables.append(table)
    return tables
