"""Sweep report: one table and two charts instead of clicking through a dozen runs.

    python -m sftlab.report outputs/train/multirun/<time>      (or: make report DIR=...)

Reads every job dir of a Hydra multirun (``<sweep>/<n>/`` with ``.hydra/``), its
``metrics.json`` (absent or ``status: failed`` for jobs that broke) and its config choices,
and writes into ``<sweep>/report/``:

- ``results.csv``  one row per job: strategy, lr, overrides, val/test acc and F1, trainable
  params, train time, peak memory, status (failed jobs included, with their error);
- ``results.md``   the best job, the same table in Markdown, a strategy × lr grid of val
  accuracy (for grid sweeps; an optuna sweep's continuous LRs would make one column per job),
  and the optuna sweeper's best trial when the sweep has ``optimization_results.yaml``;
- ``val_acc_vs_lr.png``  val accuracy against LR (log x), one line per strategy;
- ``params_vs_acc.png``  trainable parameters (log x) against val accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from sftlab.console import fmt

COLUMNS = [
    "job", "strategy", "lr", "status", "val/acc", "val/f1_macro", "test/acc", "test/f1_macro",
    "trainable_params", "train_time_s", "train_samples_per_s", "peak_rss_mb", "overrides", "error",
]


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job of the sweep: a folder holding ``.hydra/overrides.yaml``, sorted by job number."""
    jobs = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    jobs = [j for j in jobs if j != sweep_dir and "report" not in j.parts]

    def key(p: Path):
        rel = p.relative_to(sweep_dir).parts[0]
        return (0, int(rel)) if rel.isdigit() else (1, rel)

    return sorted(set(jobs), key=key)


def read_job(job: Path, sweep_dir: Path) -> dict[str, Any]:
    overrides = _load_yaml(job / ".hydra" / "overrides.yaml") or []
    hydra_cfg = _load_yaml(job / ".hydra" / "hydra.yaml") or {}
    config = _load_yaml(job / ".hydra" / "config.yaml") or {}
    choices = (hydra_cfg.get("hydra", {}).get("runtime", {}) or {}).get("choices", {}) or {}
    metrics_path = job / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    row: dict[str, Any] = {
        "job": str(job.relative_to(sweep_dir)),
        "strategy": choices.get("strategy") or metrics.get("strategy", ""),
        "lr": (config.get("optimizer") or {}).get("lr"),
        "status": metrics.get("status", "failed" if not metrics else "completed"),
        "overrides": " ".join(map(str, overrides)),
        "error": metrics.get("error", "" if metrics else "no metrics.json (the job died)"),
    }
    for col in COLUMNS:
        if col not in row:
            row[col] = metrics.get(col)
    return row


#: columns shown with one decimal (seconds, throughput, MB): 4 would be noise
_ONE_DECIMAL = ("train_time_s", "train_samples_per_s", "peak_rss_mb")


def _fmt(v: Any, col: str = "") -> str:
    """A markdown table cell: :func:`sftlab.console.fmt`, with ``|`` escaped."""
    return fmt(v, 1 if col in _ONE_DECIMAL else 4).replace("|", "\\|")


#: more distinct LRs than this and the strategy × lr grid is skipped (a Bayesian sweep)
MAX_GRID_LRS = 8


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed job with the highest val/acc (what a sweeper maximises), ties: first job."""
    done = [r for r in rows if r["status"] == "completed" and _finite(r.get("val/acc"))]
    return max(done, key=lambda r: float(r["val/acc"])) if done else None


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def write_tables(rows: list[dict[str, Any]], out: Path, sweep_dir: Path | None = None) -> None:
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in COLUMNS if c not in ("overrides", "error")]
    lines = ["# Sweep report", "", f"{len(rows)} jobs, {sum(r['status'] == 'completed' for r in rows)} completed.", ""]
    best = best_row(rows)
    if best is not None:
        lines += [f"Best val/acc: job {best['job']} ({best['strategy']}, lr {_fmt(_num(best['lr']))}): "
                  f"val/acc {_fmt(best['val/acc'])}, test/acc {_fmt(best.get('test/acc'))}.", ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r[c], c) for c in shown) + " |" for r in rows]
    strategies = sorted({r["strategy"] for r in rows})
    lrs = sorted({float(r["lr"]) for r in rows if _finite(r["lr"])})
    if strategies and lrs and len(lrs) <= MAX_GRID_LRS:
        lines += ["", "## val/acc: strategy × lr", "",
                  "| strategy | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for s in strategies:
            cells = []
            for lr in lrs:
                hit = [r for r in rows if r["strategy"] == s and _finite(r["lr"]) and float(r["lr"]) == lr]
                cells.append(_fmt(hit[0]["val/acc"]) if hit and hit[0]["status"] == "completed"
                             else (str(hit[0]["status"]) if hit else ""))
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    optuna = _load_yaml(sweep_dir / "optimization_results.yaml") if sweep_dir is not None else None
    if optuna and "best_params" in optuna:
        params = " ".join(f"{k}={v}" for k, v in optuna["best_params"].items())
        lines += ["", "## Optuna", "", f"Best trial ({optuna.get('name', 'optuna')} sweeper, "
                  f"optimization_results.yaml): `{params}` → {_fmt(_num(optuna.get('best_value')))}"]
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        lines += ["", "## Failed jobs", ""] + [f"- job {r['job']} ({r['overrides']}): {r['error']}" for r in failed]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _num(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def write_charts(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "completed" and r.get("val/acc") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({r["strategy"] for r in done}):
        pts = sorted((float(r["lr"]), float(r["val/acc"])) for r in done if r["strategy"] == s and r["lr"])
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=s)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("val accuracy")
    ax.set_title("val accuracy vs learning rate")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_acc_vs_lr.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    labelled: list[tuple[float, float, str]] = []
    for s in sorted({r["strategy"] for r in done}):
        pts = [(float(r["trainable_params"]), float(r["val/acc"]), r["lr"]) for r in done
               if r["strategy"] == s and r.get("trainable_params")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=s)
            # which LR each point is (strategies that train the same parameters share an x);
            # one label for points that coincide, e.g. full and discriminative at one LR
            for x, y, lr in pts:
                if not _finite(lr):
                    continue
                text = _short_lr(float(lr))
                if any(t == text and abs(math.log10(x / lx)) < 0.05 and abs(y - ly) < 0.02
                       for lx, ly, t in labelled):
                    continue
                labelled.append((x, y, text))
                ax.annotate(text, (x, y), xytext=(4, 2), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("val accuracy")
    ax.set_title("trainable parameters vs accuracy (labels: lr)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "params_vs_acc.png", dpi=100)
    plt.close(fig)


def _short_lr(lr: float) -> str:
    """1e-04 -> "1e-4", 2.5e-05 -> "2.5e-5", 0.003 -> "0.003": chart labels, not table cells."""
    if lr >= 1e-3:
        return f"{lr:.2g}"
    mant, exp = f"{lr:.1e}".split("e")
    return f"{mant.removesuffix('.0')}e{int(exp)}"


def report(sweep_dir: str | Path) -> Path:
    """Write ``<sweep_dir>/report/`` and return its path."""
    from sftlab.errors import ConfigError

    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise ConfigError(f"{str(sweep)!r} is not a directory; give a multirun dir, e.g. outputs/train/multirun/<time>.")
    jobs = job_dirs(sweep)
    if not jobs:
        raise ConfigError(f"No sweep jobs (folders with .hydra/) under {str(sweep)!r}; is it a multirun dir?")
    rows = [read_job(j, sweep) for j in jobs]
    out = sweep / "report"
    out.mkdir(exist_ok=True)
    write_tables(rows, out, sweep)
    write_charts(rows, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from sftlab.errors import SftlabError

    parser = argparse.ArgumentParser(prog="python -m sftlab.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun dir (outputs/<task>/multirun/<time>)")
    args = parser.parse_args(argv)
    try:
        out = report(args.sweep_dir)
    except SftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text())
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
