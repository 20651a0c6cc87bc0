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
- ``params_vs_acc.png``  trainable parameters (log x) against val accuracy;

and, for studies (strategies × learning rates × seeds; ``hparams_search=study``), the seed
aggregation of :mod:`sftlab.report.study`:

- ``cells.csv``  one row per (strategy, lr): completed ``n``, ``failed``, and per metric the
  mean, std and 95% CI over seeds, mean train time, trainable params, peak RSS;
- ``strategies.csv``  each strategy at the LR it chooses on mean validation, its test mean and
  CI, and the paired difference with ``full`` (same seeds) with a verdict;
- ``val_vs_lr.png``, ``cost_accuracy.png``  (error bars; the Pareto front);
- ``README.md``  the tables, the charts and one recommendation;
- a W&B run (``job_type: report``) in the jobs' group with the tables and charts, when the
  jobs logged to W&B (offline files under ``report/wandb/`` without credentials).

A sweep still running reports the jobs that are there; failed and unfinished jobs are counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sftlab.report.charts import write_charts, write_study_charts
from sftlab.report.jobs import COLUMNS, job_dirs, read_job
from sftlab.report.study import write_study
from sftlab.report.tables import write_tables

__all__ = ["COLUMNS", "job_dirs", "main", "read_job", "report"]


def report(sweep_dir: str | Path, wandb: str = "auto") -> Path:
    """Write ``<sweep_dir>/report/`` and return its path.

    ``wandb``: ``auto`` logs the study to W&B when the jobs logged there (their group), ``on``
    always (project sftlab, the sweep dir's group when the jobs had none), ``off`` never.
    """
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
    study = write_study(rows, out)
    write_study_charts(study, out)
    if wandb != "off":
        from sftlab.report.wandb_log import log_study, wandb_settings

        settings = wandb_settings(jobs, sweep)
        if settings is None and wandb == "on":
            settings = {"project": "sftlab", "entity": None, "group": f"train-{sweep.name}"}
        if settings is not None:
            log_study(study, out, settings)
    return out


def main(argv: list[str] | None = None) -> int:
    from sftlab.errors import SftlabError

    parser = argparse.ArgumentParser(prog="python -m sftlab.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun dir (outputs/<task>/multirun/<time>)")
    parser.add_argument("--wandb", choices=("auto", "on", "off"), default="auto",
                        help="log the study to W&B: auto = when the jobs logged there (their group)")
    args = parser.parse_args(argv)
    try:
        out = report(args.sweep_dir, wandb=args.wandb)
    except SftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text())
    print(f"report written to {out}")
    return 0

