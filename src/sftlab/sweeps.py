"""Sweeps that resume: what a sweep job's dir says about the job, and what to do with it.

Re-running a multirun with the same ``hydra.sweep.dir`` continues it. For each job:

- ``status: completed`` in its metrics.json: **skip** it; the sweeper still gets the job's
  value back (:func:`objective`, the number ``train.main`` returns), so Optuna and the report
  see every job;
- a checkpoint and no completed or failed record (``status: interrupted``, or killed without
  any record, by SIGKILL or a lost node): **resume** it in place from its newest checkpoint
  (the ``resume=`` machinery of :mod:`sftlab.runs`);
- ``status: failed``: skipped too (its value is NaN, as when it failed), unless
  ``sweep.rerun_failed=true``: then the failed attempt is moved into ``failed_attempts/<n>/``
  and the job **starts** again in its dir;
- anything else (a dir from a job killed before its first checkpoint, or no dir): **start**.

Two places ask: the launchers (``hydra_plugins/sftlab_launchers``), before a job is started,
so that a finished job's dir is not touched at all (Hydra rewrites ``.hydra/`` of every job it
starts); and the job itself (``sftlab.train.prepare_run``), for launchers that start every job
anyway (submitit on SLURM, a requeued SLURM job). The decision reads only metrics.json and
the checkpoints, never config.yaml: under DDP every rank decides on its own before the ranks
meet, and rank 0 may already have written a new config.yaml when another rank looks.

A job dir that holds a run of *other* overrides (another grid run into the same sweep dir)
is refused with one sentence, never skipped with another job's result.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlab.errors import ConfigError

log = logging.getLogger(__name__)

SKIP, RESUME, START = "skip", "resume", "start"

# overrides that say how to run the sweep, not what a job is: ignored when matching a job
_HOW_KEYS = ("sweep.",)


@dataclass(frozen=True)
class JobState:
    """A sweep job's dir as a re-run finds it."""

    path: Path
    status: str | None  # metrics.json's status; None without a readable metrics.json
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None  # the newest complete checkpoint, if any

    @property
    def value(self) -> float:
        return objective(self.metrics)


def objective(metrics: dict[str, Any]) -> float:
    """The number a sweep job returns to the sweeper (what Optuna maximises): the validation
    value of the task's main metric (``val/acc``; ``val/f1`` for NER)."""
    try:
        return float(metrics.get(f"val/{metrics.get('main_metric', 'acc')}", math.nan))
    except (TypeError, ValueError):
        return math.nan


def read_state(job_dir: Path) -> JobState:
    from omegaconf import OmegaConf

    from sftlab.runs import last_checkpoint

    job_dir = Path(job_dir)
    try:
        metrics = json.loads((job_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    try:  # where its checkpoints are (a run may have moved them); the default otherwise
        cfg = OmegaConf.load(job_dir / "config.yaml")
    except (OSError, ValueError):
        cfg = OmegaConf.create({})
    ckpt = last_checkpoint(cfg, job_dir)
    return JobState(job_dir, metrics.get("status"), metrics, ckpt if ckpt.is_file() else None)


def decide(state: JobState, rerun_failed: bool = False) -> str:
    if state.status == "completed":
        return SKIP
    if state.status == "failed":
        return START if rerun_failed else SKIP
    if state.checkpoint is not None:
        return RESUME
    return START


def plan(job_dir: Path, overrides: list[str], rerun_failed: bool = False) -> tuple[str, JobState]:
    """What a launcher does with the job ``overrides`` whose dir is ``job_dir``.

    Refuses a dir that holds a job of other overrides (``.hydra/overrides.yaml``), so that a
    different grid run into the same sweep dir cannot pick up another job's result.
    """
    state = read_state(job_dir)
    saved = job_dir / ".hydra" / "overrides.yaml"
    if saved.is_file():
        import yaml

        before = job_identity(yaml.safe_load(saved.read_text(encoding="utf-8")) or [])
        now = job_identity(overrides)
        if before != now:
            raise ConfigError(
                f"{job_dir} holds a sweep job with other overrides ({' '.join(before)}) than this "
                f"one ({' '.join(now)}); re-run the command that started this sweep to resume it, "
                "or give a new hydra.sweep.dir."
            )
    return decide(state, rerun_failed), state


def job_identity(overrides: list[str]) -> list[str]:
    """What makes a job this job: its overrides, sorted, without the ones that say how to sweep."""
    return sorted(str(o) for o in overrides if not str(o).lstrip("+~").startswith(_HOW_KEYS))


def skipped_line(num: int | str, state: JobState) -> str:
    """The one line a re-run prints for a job it does not run."""
    why = "completed" if state.status == "completed" else f"{state.status} (sweep.rerun_failed=true reruns it)"
    metric = f"val/{state.metrics.get('main_metric', 'acc')}"
    return f"skipped #{num}: {why}, {metric} {state.value:.4f}: {state.path}"


def set_failed_attempt_aside(job_dir: Path) -> Path:
    """Move a failed attempt's results into ``failed_attempts/<n>/``; ``.hydra/`` and logs stay."""
    keep = {".hydra", "failed_attempts"}
    root = job_dir / "failed_attempts"
    n = len(list(root.iterdir())) if root.is_dir() else 0
    dest = root / str(n)
    dest.mkdir(parents=True)
    for p in list(job_dir.iterdir()):
        if p.name not in keep and p.suffix != ".log":
            shutil.move(str(p), dest / p.name)
    log.info("Rerunning failed sweep job %s (the failed attempt is in %s)", job_dir, dest)
    return dest


class JobDone(Exception):  # noqa: N818  (not an error: the job's result is already on disk)
    """Raised by the pipeline for a sweep job that completed before; ``value`` is its result."""

    def __init__(self, state: JobState) -> None:
        super().__init__(skipped_line(state.path.name, state))
        self.state = state
