"""The sweep's job table: ``results.csv`` (every job) and ``results.md`` (best job, grid, failures)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from sftlab.console import fmt
from sftlab.report.jobs import COLUMNS, load_yaml

#: columns shown with one decimal (seconds, throughput, MB): 4 would be noise
_ONE_DECIMAL = ("train_time_s", "train_samples_per_s", "peak_rss_mb")


def _fmt(v: Any, col: str = "") -> str:
    """A markdown table cell: :func:`sftlab.console.fmt`, with ``|`` escaped."""
    return fmt(v, 1 if col in _ONE_DECIMAL else 4).replace("|", "\\|")


#: more distinct LRs than this and the strategy × lr grid is skipped (a Bayesian sweep)
MAX_GRID_LRS = 8


def main_key(rows: list[dict[str, Any]]) -> str:
    """``val/<the task's main metric>``: val/acc, or val/f1 for token classification."""
    from sftlab.report.study import main_metric

    return f"val/{main_metric(rows)}"


def _get(row: dict[str, Any], key: str) -> Any:
    return row.get(key, (row.get("metrics") or {}).get(key))


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed job with the best main metric (what a sweeper maximises), ties: first job."""
    key = main_key(rows)
    done = [r for r in rows if r["status"] == "completed" and _finite(_get(r, key))]
    return max(done, key=lambda r: float(_get(r, key))) if done else None


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def write_tables(rows: list[dict[str, Any]], out: Path, sweep_dir: Path | None = None) -> None:
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in COLUMNS if c not in ("overrides", "error")]
    lines = ["# Sweep report", "", f"{len(rows)} jobs, {sum(r['status'] == 'completed' for r in rows)} completed.", ""]
    best = best_row(rows)
    key = main_key(rows)
    test_key = "test/" + key.split("/", 1)[1]
    if best is not None:
        lines += [f"Best {key}: job {best['job']} ({best['strategy']}, lr {_fmt(_num(best['lr']))}): "
                  f"{key} {_fmt(_get(best, key))}, {test_key} {_fmt(_get(best, test_key))}.", ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r[c], c) for c in shown) + " |" for r in rows]
    strategies = sorted({r["strategy"] for r in rows})
    lrs = sorted({float(r["lr"]) for r in rows if _finite(r["lr"])})
    if strategies and lrs and len(lrs) <= MAX_GRID_LRS:
        lines += ["", f"## {key}: strategy × lr", "",
                  "| strategy | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for s in strategies:
            cells = []
            for lr in lrs:
                hit = [r for r in rows if r["strategy"] == s and _finite(r["lr"]) and float(r["lr"]) == lr]
                cells.append(_fmt(_get(hit[0], key)) if hit and hit[0]["status"] == "completed"
                             else (str(hit[0]["status"]) if hit else ""))
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    optuna = load_yaml(sweep_dir / "optimization_results.yaml") if sweep_dir is not None else None
    if optuna and "best_params" in optuna:
        params = " ".join(f"{k}={v}" for k, v in optuna["best_params"].items())
        lines += ["", "## Optuna", "", f"Best trial ({optuna.get('name', 'optuna')} sweeper, "
                  f"optimization_results.yaml): `{params}` → {_fmt(_num(optuna.get('best_value')))}"]
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        lines += ["", "## Failed or unfinished jobs", ""] + [
            f"- job {r['job']} ({r['overrides']}): {r['status']}: {r['error']}" for r in failed]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _num(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


