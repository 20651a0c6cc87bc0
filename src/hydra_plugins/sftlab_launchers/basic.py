"""``hydra/launcher=sftlab_basic`` (the default): Hydra's basic launcher (jobs one after
another, in this process) that skips the jobs a re-run sweep finished before."""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn


class SftlabBasicLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.sftlab_launchers._resume import contiguous, launch_resuming

        def run(jobs):
            out: list[JobReturn] = []
            for start, block in contiguous(jobs):
                out.extend(BasicLauncher.launch(self, block, initial_job_idx=start))
            return out

        return launch_resuming(self, run, job_overrides, initial_job_idx)
