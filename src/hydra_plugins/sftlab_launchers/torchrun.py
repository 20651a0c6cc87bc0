"""``hydra/launcher=torchrun``: every sweep job a multi-process DDP job on this machine.

Each job runs as its own command in its sweep subdir, one after another:

    torchrun --standalone --nproc-per-node <nproc_per_node> train.py <the job's overrides>
        hydra.mode=RUN hydra.run.dir=<sweep dir>/<job> hydra.sweep.dir=<sweep dir>

torchrun starts the ranks and Lightning joins them (TorchElasticEnvironment); nothing re-runs
the sweep's own command line. That is what breaks the obvious recipe, ``-m trainer=ddp``:
Lightning's DDP launcher starts ranks 1.. by re-running ``sys.argv``, which under ``-m`` is
the whole sweep (each child restarts it; Lightning #15737 was reverted, hydra #2070). And
``strategy=ddp_spawn`` would train in spawned children and hand back only the weights: the
test predictions and confusion matrix a run writes would stay in the children, and every
validate/test call would spawn again.

The job is a sweep job all the same (``SFTLAB_SWEEP_JOB`` is set, see ``sftlab.config``): a
failure is recorded and the sweep goes on, and a re-run with the same ``hydra.sweep.dir``
skips, resumes or starts each job as the other launchers do (``sftlab.sweeps``). The value
returned to the sweeper is read from the job's metrics.json.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# hydra.* overrides of the sweep that the job's own command sets itself
_OWN = ("hydra.mode", "hydra.run.dir", "hydra.sweep.dir")


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int = 1, torchrun_args: Sequence[str] = (),
                 script: str | None = None) -> None:
        self.nproc_per_node = int(nproc_per_node)
        self.torchrun_args = [str(a) for a in torchrun_args or ()]
        self.script = script
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.sftlab_launchers._resume import launch_resuming

        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs, each under torchrun with %d processes",
                 len(job_overrides), self.nproc_per_node)
        return launch_resuming(self, lambda jobs: [self._run(*job) for job in jobs],
                               job_overrides, initial_job_idx)

    def command(self, overrides: Sequence[str], job_dir: Path) -> list[str]:
        """The job's command line: torchrun, the entry script, its overrides, its dir."""
        assert self.config is not None
        script = str(Path(self.script or sys.argv[0]).resolve())
        hydra = [str(o) for o in self.config.hydra.overrides.hydra if not str(o).startswith(_OWN)]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc-per-node={self.nproc_per_node}", *self.torchrun_args, script,
                *[str(o) for o in overrides if not str(o).startswith("hydra.")], *hydra, "hydra.mode=RUN",
                f"hydra.run.dir={_quoted(job_dir)}", f"hydra.sweep.dir={_quoted(self.config.hydra.sweep.dir)}"]

    def _run(self, num: int, overrides: list[str], job_dir: Path) -> JobReturn:
        from sftlab.config import SWEEP_JOB_ENV
        from sftlab.sweeps import read_state

        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        proc = subprocess.run(self.command(overrides, job_dir), env={**os.environ, SWEEP_JOB_ENV: str(num)})
        state = read_state(job_dir)
        if state.status == "interrupted":  # a signal meant for the whole sweep: stop it too
            raise SystemExit(proc.returncode or 1)
        if proc.returncode != 0:
            log.error("Job #%d ended with exit code %d (status: %s); the sweep goes on.",
                      num, proc.returncode, state.status or "no metrics.json")
        ret = JobReturn(overrides=list(overrides), working_dir=os.getcwd(),
                        task_name=str(self.config.hydra.job.name), status=JobStatus.COMPLETED)
        ret.return_value = state.value
        return ret


def _quoted(value) -> str:
    """A value for a Hydra override, quoted when the override grammar needs it."""
    text = str(value)
    if re.fullmatch(r"[\w/.\-:+@]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
