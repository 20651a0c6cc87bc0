"""Run directories: each run owns one, a resumed run continues in its own, no secret lands in one.

Ownership. Hydra gives every run a fresh dir (time stamp + pid + random suffix, see
``conf/hydra/default.yaml``), but ``hydra.run.dir=<dir>`` can point a new run at an old one. A
new run refuses a dir that already holds a run (``config.yaml``, ``metrics.json`` or
``checkpoints/``), so nothing of an earlier run is overwritten, and a failure is recorded only in
a dir its run owns.

Resume in place. ``python train.py resume=<run dir>`` continues that run in its own dir from
``checkpoints/last.ckpt``, with the config it was started with (``<run dir>/config.yaml``, the
resolved config train.py writes). Hydra creates a fresh dir before any of our code runs, and
pointing Hydra at the old dir instead would overwrite ``<run dir>/.hydra/`` (the original
overrides, which sweep reports read) with ``resume=...``. So the fresh dir is used for nothing:
the log handler moves to ``<run dir>/<task>.log`` (appending) and the fresh dir, which then holds
only Hydra's bookkeeping, is deleted. A W&B run continues under the id the first start wrote
into ``config.yaml`` (``logger.wandb.id``, with ``resume: allow``), and the CSV log keeps the
rows logged before the checkpoint (:func:`keep_csv_history`).

Interrupted. A run stopped by SIGTERM/SIGINT ends with :class:`RunInterrupted` (raised by
``sftlab.callbacks.CrashSafeCheckpoint`` after it saved ``last.ckpt``); train.py records
``status: interrupted`` and the resume command in the run's metrics.json.

Secrets. API keys and tokens belong in the environment (``WANDB_API_KEY``, ``HF_TOKEN``) or in
``~/.netrc``. If one is given on the command line anyway, or interpolated into the config, it
is kept out of everything a run writes: keys that name a credential are dropped from the saved
and logged config (``sftlab.secrets``), and the *values* of such keys and of such
environment variables are masked wherever else they appear (Hydra's ``.hydra/*.yaml`` copies of
the command line, other config strings).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sftlab.errors import ConfigError

log = logging.getLogger(__name__)

# what marks a finished run and what holds a run's results
_RUN_MARKERS = ("config.yaml", "metrics.json", "checkpoints")


def is_rank_zero() -> bool:
    """Whether this process is rank 0, from the variables launchers set (no torch import).

    Rank 0 is started by the user; DDP launches the other ranks with RANK/LOCAL_RANK set, the
    same variables Lightning reads.
    """
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value) == 0
            except ValueError:
                continue
    return True


def holds_run(path: Path) -> bool:
    return any((path / m).exists() for m in _RUN_MARKERS)


def claim_run_dir(path: Path) -> Path:
    """The dir for a new run; refuses one that already holds another run's results."""
    if holds_run(path):
        raise ConfigError(
            f"{str(path)!r} already holds a run (its {', '.join(m for m in _RUN_MARKERS if (path / m).exists())}); "
            f"continue it with resume={path} or leave hydra.run.dir unset for a new dir."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunInterrupted(SystemExit):
    """SIGTERM/SIGINT stopped training after saving ``checkpoint``; the exit code is 128 + signal.

    A ``SystemExit`` on purpose: nothing between the training loop and the interpreter (Hydra's
    job runner, a sweep) may swallow it as an ordinary failure, and the shell sees the usual
    "killed by signal" code (143 for SIGTERM, 130 for Ctrl+C).
    """

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def __str__(self) -> str:
        saved = f"saved {self.checkpoint}" if self.checkpoint else "no checkpoint saved (checkpointing is off)"
        return f"interrupted by {self.signal_name} at step {self.step}; {saved}"


# ------------------------------------------------------------------------------------ resume
def last_checkpoint(cfg: DictConfig, run: Path) -> Path:
    """The checkpoint a resume continues from: ``last.ckpt``, or else the newest other one.

    A run killed right after its first best-checkpoint write (the epoch's validation) and
    before ``last.ckpt`` has a complete, resumable checkpoint on disk: ModelCheckpoint saves the
    full training state (``save_weights_only: false``), and every save is atomic
    (``sftlab.checkpointing``), so any ``*.ckpt`` there is whole. Returns the ``last.ckpt``
    path, existing or not, when there is no checkpoint at all.
    """
    folder = Path(OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
                  or run / "checkpoints")
    last = folder / "last.ckpt"
    if last.is_file():
        return last
    others = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.is_dir() else []
    return max(others, key=lambda p: (p.stat().st_mtime_ns, p.name)) if others else last


def resume_config(cfg: DictConfig, sweep_job: bool = False) -> DictConfig:
    """The config to continue ``cfg.resume`` with: its own, pointed at its dir and last.ckpt.

    Validates before anything is loaded: the dir is a run of train.py, it has a checkpoint,
    it has not completed, and no other override asks to change what it was started with
    (except for a ``sweep_job``: a re-run sweep repeats the command line that started it).
    """
    raw = str(cfg.resume)
    run = Path(raw).expanduser().resolve()
    if not run.is_dir():
        raise ConfigError(f"resume={raw} is not a folder; give the dir of a run (outputs/train/runs/<run>).")
    if not (run / "config.yaml").is_file():
        raise ConfigError(
            f"resume={raw} has no config.yaml, so it is not a run started by train.py; give a run dir."
        )
    others = [o for o in _task_overrides() if not o.split("=", 1)[0].lstrip("+~") == "resume"]
    if others and not sweep_job:
        raise ConfigError(
            f"resume= continues a run with its own config, but other overrides were given "
            f"({' '.join(others)}); drop them, or start a new run with "
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'} and your overrides."
        )
    loaded = OmegaConf.load(run / "config.yaml")
    assert isinstance(loaded, DictConfig)
    old = str(OmegaConf.select(loaded, "paths.output_dir", default="") or "")
    if old and Path(old) != run:  # the run dir was moved: follow it
        loaded = OmegaConf.create(_replace_prefix(OmegaConf.to_container(loaded), old, str(run)))
    loaded = upgrade_config(loaded, cfg)
    ckpt = last_checkpoint(loaded, run)
    if not ckpt.is_file():
        raise ConfigError(
            f"resume={raw} has no {ckpt.relative_to(run) if ckpt.is_relative_to(run) else ckpt}: "
            "it stopped before its first checkpoint; start it again (checkpoint.every_n_steps=N "
            "saves one every N steps)."
        )
    status = _status(run)
    if status == "completed":
        raise ConfigError(f"resume={raw} has already completed (see its metrics.json); nothing to resume.")
    with open_dict(loaded):
        loaded.resume = str(run)
        loaded.ckpt_path = str(ckpt)
        wandb = OmegaConf.select(loaded, "logger.wandb", default=None)
        if isinstance(wandb, DictConfig):
            wandb.resume = "allow"  # continue the W&B run whose id the first start saved
    return loaded


def keep_csv_history(loggers, ckpt: Path) -> None:
    """A resumed run's ``metrics.csv`` keeps the rows logged before its checkpoint.

    Lightning's CSVLogger deletes an existing metrics.csv when it starts writing, so a resumed
    run would hold only what it logged itself. Rows from after the checkpoint (a stopped run
    flushed them; the resumed run logs those steps again) are left out.
    """
    import csv

    import torch
    from lightning.pytorch.loggers import CSVLogger

    csv_loggers = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    if not csv_loggers:
        return
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    for lg in csv_loggers:
        path = Path(lg.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)
                    if str(r.get("step", "")).isdigit() and int(r["step"]) < step]
        lg.experiment.metrics[:0] = rows  # the writer (created now) writes them with the new rows


def upgrade_config(old: DictConfig, current: DictConfig | None = None) -> DictConfig:
    """A run config written before the ``perf`` group existed, in today's keys.

    Runs started before the speed work moved to ``conf/perf`` recorded ``model.fast_dropout``
    and ``callbacks.release_memory`` (target ``sftlab.callbacks.ReleaseFreeMemory``). Resuming
    or evaluating such a run must neither fail on the old keys nor silently train without the
    kernels it started with (a resumed run would then draw other dropout masks). ``current``
    (the freshly composed config) provides today's ``perf`` entries.
    """
    old = old.copy()
    with open_dict(old):
        fast = OmegaConf.select(old, "model.fast_dropout", default=None)
        if fast is not None:
            old.model.pop("fast_dropout")
        heap = OmegaConf.select(old, "callbacks.release_memory", default=None)
        if heap is not None and str(heap.get("_target_", "")).startswith("sftlab.callbacks."):
            old.callbacks.pop("release_memory")
        if "perf" not in old and current is not None and "perf" in current:
            old.perf = current.perf.copy()
            if fast is not None and "fast_dropout" in old.perf:
                old.perf.fast_dropout.enable = bool(fast)
            if isinstance(heap, DictConfig) and "release_memory" in old.perf:
                for key, value in heap.items():
                    if key != "_target_":
                        old.perf.release_memory[key] = value
    return old


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001  (no Hydra run: nothing was overridden)
        pass
    return []


def _status(run: Path) -> str | None:
    import json

    try:
        return json.loads((run / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _replace_prefix(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _replace_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_prefix(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old.rstrip("/")):]
    return value


def adopt_run_dir(run: Path, fresh: Path) -> None:
    """Log into ``run`` from now on and delete Hydra's ``fresh`` dir if it holds only bookkeeping."""
    fresh = fresh.resolve()
    if fresh == run.resolve():
        return
    for logger in [logging.getLogger(), *_named_loggers()]:
        for handler in list(logger.handlers):
            base = getattr(handler, "baseFilename", None)
            if isinstance(handler, logging.FileHandler) and base and Path(base).resolve().parent == fresh:
                moved = logging.FileHandler(run / Path(base).name, mode="a", encoding="utf-8")
                moved.setFormatter(handler.formatter)
                moved.setLevel(handler.level)
                for flt in handler.filters:
                    moved.addFilter(flt)
                logger.removeHandler(handler)
                handler.close()
                logger.addHandler(moved)
    if fresh.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in fresh.iterdir()):
        shutil.rmtree(fresh, ignore_errors=True)
    log.info("Resuming run %s in place", run)


def _named_loggers() -> list[logging.Logger]:
    return [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]


def new_wandb_id(cfg: DictConfig) -> None:
    """Give a W&B logger an id now, so ``config.yaml`` records it for ``resume=``."""
    wandb = OmegaConf.select(cfg, "logger.wandb", default=None)
    if isinstance(wandb, DictConfig) and "_target_" in wandb and not wandb.get("id"):
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        with open_dict(wandb):
            wandb.id = "".join(secrets.choice(alphabet) for _ in range(8))
