"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, with sweeps that resume.

submitit submits the sweep as one job array, each job ``nodes × tasks_per_node`` srun tasks;
every task runs the job (Hydra's ``run_job``, then ``train.main``), Lightning's
SLURMEnvironment joins the tasks into one DDP world instead of starting processes, and the
sweeper gets task 0's return value. On top of the plugin: a re-run with the same
``hydra.sweep.dir`` does not submit the jobs that finished (``_resume``), and the others keep
their job numbers (hence their dirs) in one array. Requeue on the time limit is submitit's
(``sftlab.cluster``: one mechanism, and why).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the slurm extra is not installed: nothing to register
    SlurmLauncher = None

if SlurmLauncher is not None:

    class SftlabSlurmLauncher(SlurmLauncher):
        def launch(self, job_overrides, initial_job_idx):
            from hydra_plugins.sftlab_launchers._resume import launch_resuming

            return launch_resuming(self, self._submit, job_overrides, initial_job_idx)

        def executor(self):
            """The submitit executor with this launcher's parameters (as the plugin builds it)."""
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
            from omegaconf import OmegaConf

            init_keys = {"max_num_timeout", "submitit_folder"}
            executor = submitit.AutoExecutor(
                cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]}
                if "max_num_timeout" in self.params else {})
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                          for k, v in self.params.items() if k not in init_keys})
            return executor

        def _submit(self, jobs):
            """One array of the jobs to run, each with its own number; task 0's returns."""
            from hydra.core.singleton import Singleton
            from hydra.core.utils import filter_overrides

            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
            params = []
            for num, overrides, _ in jobs:
                log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
                params.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}",
                               Singleton.get_state()))
            submitted = self.executor().map_array(self, *zip(*params, strict=True))
            return [job.results()[0] for job in submitted]
