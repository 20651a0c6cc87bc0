"""What a run prints for people: the parts table at fit start and the final metrics table.

rich renders both (the progress bar is rich too); on a non-terminal it falls back to plain
text, so logs stay readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def fmt(value: Any, decimals: int = 4) -> str:
    """The one way sftlab shows a number to people (tables, model cards, reports).

    Floats with ``decimals`` places (4 by default: accuracies differ in the third), tiny ones in
    3 significant digits (an LR of 2e-05, not 0.0000); integers with thousands separators
    (parameter counts); None and NaN as an empty cell; anything else as its text.
    """
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 1e-2 else f"{value:.{decimals}f}"
    if isinstance(value, int):
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
        table.add_row(*(fmt(v) for v in row.values()))
    Console(stderr=False).print(table)


def print_metrics_table(metrics: Mapping[str, Any], title: str = "results") -> None:
    """Validation and test metrics side by side (acc, f1_macro, loss; entity f1, precision,
    recall for token classification)."""
    from rich.console import Console
    from rich.table import Table

    splits = [s for s in ("val", "test") if any(k.startswith(f"{s}/") for k in metrics)]
    if not splits:  # a run without validation and test (a throughput benchmark): nothing to show
        return
    table = Table(title=title)
    table.add_column("metric")
    for s in splits:
        table.add_column(s, justify="right")
    for name in ("f1", "precision", "recall", "acc", "f1_macro", "loss"):
        if any(f"{s}/{name}" in metrics for s in splits):
            table.add_row(name, *(fmt(metrics.get(f"{s}/{name}", "")) for s in splits))
    Console().print(table)
