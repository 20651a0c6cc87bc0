"""What every sftlab launcher does before starting jobs: skip the finished ones.

A re-run sweep hands a launcher all its jobs again. Each job's dir is computed as Hydra would
(``hydra.sweep.dir`` / ``hydra.sweep.subdir`` of the job's own config, with its number) and
read (``sftlab.sweeps.plan``): a completed job (or a failed one, unless
``sweep.rerun_failed=true``) is not started; one line says so, and the sweeper gets the job's
value back as if it had run. The others are started by the launcher with their own numbers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# (job number, its overrides, its dir)
Job = tuple[int, list[str], Path]


def job_config(launcher, overrides: Sequence[str], num: int) -> DictConfig:
    """The job's composed config, numbered, as the launcher would run it."""
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
    return cfg


def job_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def launch_resuming(launcher, run_jobs: Callable[[list[Job]], list[JobReturn]],
                    job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Skip what finished, ``run_jobs`` the rest; the returns in the sweeper's order."""
    from sftlab.sweeps import SKIP, plan, skipped_line

    rerun = bool(OmegaConf.select(launcher.config, "sweep.rerun_failed", default=False))
    returns: dict[int, JobReturn] = {}
    todo: list[Job] = []
    for i, overrides in enumerate(job_overrides):
        num = initial_job_idx + i
        cfg = job_config(launcher, overrides, num)
        folder = job_dir(cfg)
        action, state = plan(folder, list(cfg.hydra.overrides.task), rerun)
        if action == SKIP:
            log.info(skipped_line(num, state))
            ret = JobReturn(overrides=list(overrides), working_dir=os.getcwd(),
                            task_name=str(cfg.hydra.job.name), status=JobStatus.COMPLETED)
            ret.return_value = state.value
            returns[num] = ret
        else:
            todo.append((num, list(overrides), folder))
    if todo:
        for (num, _, _), ret in zip(todo, run_jobs(todo), strict=True):
            returns[num] = ret
    return [returns[initial_job_idx + i] for i in range(len(job_overrides))]


def contiguous(jobs: list[Job]) -> list[tuple[int, list[list[str]]]]:
    """Jobs as (first number, overrides) blocks of consecutive numbers, for launchers that
    number the jobs they are given from a start index."""
    blocks: list[tuple[int, list[list[str]]]] = []
    for num, overrides, _ in jobs:
        if blocks and blocks[-1][0] + len(blocks[-1][1]) == num:
            blocks[-1][1].append(overrides)
        else:
            blocks.append((num, [overrides]))
    return blocks
