"""What a run prints for people: the parts table at fit start and the final metrics table.

rich renders both (the progress bar is rich too); on a non-terminal it falls back to plain
text, so logs stay readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1e-2 else f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_parts_table(rows: Iterable[Mapping[str, Any]], title: str = "parts") -> None:
    """One row per model part: name, #params, trainable, LR (from ``Strategy.describe``)."""
    from rich.console import Console
    from rich.table import Table

    rows = list(rows)
    if not rows:
        return
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col), justify="right" if col != "part" else "left")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    Console(stderr=False).print(table)


def print_metrics_table(metrics: Mapping[str, Any], title: str = "results") -> None:
    """Validation and test metrics side by side (acc, f1_macro, loss)."""
    from rich.console import Console
    from rich.table import Table

    splits = [s for s in ("val", "test") if any(k.startswith(f"{s}/") for k in metrics)]
    if not splits:  # a run without validation and test (a throughput benchmark): nothing to show
        return
    table = Table(title=title)
    table.add_column("metric")
    for s in splits:
        table.add_column(s, justify="right")
    for name in ("acc", "f1_macro", "loss"):
        if any(f"{s}/{name}" in metrics for s in splits):
            table.add_row(name, *(_fmt(metrics.get(f"{s}/{name}", "")) for s in splits))
    Console().print(table)
