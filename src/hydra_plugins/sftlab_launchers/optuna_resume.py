"""``hparams_search=optuna``: hydra-optuna-sweeper whose study survives a killed sweep.

The study lives in ``<sweep dir>/optuna.db`` (``hydra.sweeper.storage``) under a fixed
``study_name``, so re-running the same command with the same ``hydra.sweep.dir`` loads it
(the plugin's ``load_if_exists``) instead of starting over. What the plugin does not do, and
this subclass adds:

- only the trials still missing run: ``n_trials`` minus the trials the study finished;
- a trial that was running when the sweep died (still RUNNING in the study) is marked failed
  and its parameters are asked again first, and that job goes back into its own dir, where it
  resumes from its last checkpoint (``sftlab.sweeps``);
- new trials get job numbers after the existing job dirs (the plugin would number from 0 again
  and land in the finished jobs' dirs).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the sweep extra is not installed: nothing to register
    OptunaSweeper = None

if OptunaSweeper is not None:

    class SftlabOptunaSweeper(OptunaSweeper):
        def sweep(self, arguments: list[str]) -> None:
            impl = self.sweeper
            sweep_dir = Path(str(impl.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)  # before SQLite opens a file in it
            if impl.storage:
                impl.n_trials = _continue_study(impl.storage, impl.study_name, impl.n_trials)
            impl.launcher = _Renumbering(impl.launcher, sweep_dir)
            return impl.sweep(arguments)


def _continue_study(storage: str, study_name: str | None, n_trials: int) -> int:
    """How many trials are left to run; stale RUNNING trials are failed and asked again."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet: a new sweep
        return n_trials
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    stale = [t for t in trials if not t.state.is_finished()]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(t.params))
    left = max(0, n_trials - len(finished))
    log.info("Continuing study %r: %d trials finished, %d interrupted (asked again), %d to run",
             study.study_name, len(finished), len(stale), left)
    return left


class _Renumbering:
    """The sweeper's launcher, with job numbers taken from the sweep dir.

    A job whose overrides are those of an unfinished job dir goes back into that dir (it
    resumes); any other job gets the next number after every existing job dir.
    """

    def __init__(self, launcher, sweep_dir: Path) -> None:
        self.launcher, self.sweep_dir = launcher, sweep_dir
        self.taken: set[int] = set()

    def __getattr__(self, name: str):
        return getattr(self.launcher, name)

    def launch(self, job_overrides, initial_job_idx: int):
        from hydra_plugins.sftlab_launchers._resume import contiguous

        numbers = [self._number(list(o)) for o in job_overrides]
        returns = {}
        jobs = sorted(((n, list(o), None) for n, o in zip(numbers, job_overrides, strict=True)),
                      key=lambda job: job[0])
        for start, block in contiguous(jobs):
            for i, ret in enumerate(self.launcher.launch(block, initial_job_idx=start)):
                returns[start + i] = ret
        return [returns[n] for n in numbers]

    def _number(self, overrides: list[str]) -> int:
        import yaml

        from sftlab.sweeps import SKIP, decide, job_identity, read_state

        existing = {int(p.name): p for p in self.sweep_dir.iterdir() if p.name.isdigit()}
        want = job_identity(overrides)
        for num, path in sorted(existing.items()):
            saved = path / ".hydra" / "overrides.yaml"
            if num in self.taken or not saved.is_file():
                continue
            if job_identity(yaml.safe_load(saved.read_text(encoding="utf-8")) or []) == want and \
                    decide(read_state(path)) != SKIP:
                self.taken.add(num)
                return num
        num = max([*existing, *self.taken], default=-1) + 1
        self.taken.add(num)
        return num
