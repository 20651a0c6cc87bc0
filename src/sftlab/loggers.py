"""Experiment loggers that need more than a ``_target_``: W&B that works with or without an account,
and TensorBoard that says how to install it when its package is missing.

Why a factory rather than ``_target_: WandbLogger`` directly: the same command must work on a
laptop with credentials (online), on a cluster node without them, and in CI (offline, files
inside the run dir, synced later with ``wandb sync``). ``offline: auto`` decides from the
environment; secrets stay in the environment/netrc and never enter the config.

Grouping: every job of a Hydra multirun lands in one W&B group, so the dashboard shows a sweep
as one expandable row. ``hparams_search`` presets set ``sweep_group`` (-> ``logger.wandb.group``);
a plain ``python train.py -m ...`` leaves it null, and then the group is named the way the presets
name theirs, ``<task>-<sweep dir name>`` (e.g. ``train-2026-01-31_12-00-00_1a2b3c4d``), so the
W&B group and the folder on disk share one name. A single run has no group.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from typing import Any


def wandb_credentials_present() -> bool:
    """An API key in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc")
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return rc.authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_offline(offline: bool | str | None) -> bool:
    """``auto``: offline unless WANDB_MODE=online or credentials exist; WANDB_MODE=offline wins."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if isinstance(offline, bool):
        return offline
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online":
        return False
    return not wandb_credentials_present()


def wandb_logger(
    *,
    save_dir: str,
    project: str = "sftlab",
    entity: str | None = None,
    group: str | None = None,
    job_type: str = "train",
    tags: list[str] | None = None,
    name: str | None = None,
    offline: bool | str = "auto",
    log_model: bool | str = False,
    id: str | None = None,  # noqa: A002  (W&B's own name; set by resume to continue a run)
    **kwargs: Any,
):
    """Lightning's ``WandbLogger`` with the run's files inside the Hydra run dir."""
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    is_offline = resolve_offline(offline)
    if not group:
        group = multirun_group(job_type)
    return WandbLogger(
        save_dir=save_dir, project=project, entity=entity, group=group, job_type=job_type,
        tags=list(tags or []), name=name, offline=is_offline, id=id,
        # artifacts need a server; offline runs keep checkpoints in the run dir anyway
        log_model=False if is_offline else log_model,
        **kwargs,
    )


#: the one sentence a run without TensorBoard's package ends with (``logger=tensorboard``/``many``)
TENSORBOARD_MISSING = (
    "logger=tensorboard needs the tensorboard package; pip install 'sftlab[tensorboard]' "
    "(or use logger=csv)."
)


def tensorboard_logger(*, save_dir: str, **kwargs: Any):
    """Lightning's ``TensorBoardLogger``, or a :class:`~sftlab.errors.ConfigError` up front.

    Why a factory: ``tensorboard`` is an optional extra (``sftlab[tensorboard]``), and without it
    (and without ``tensorboardX``, which Lightning's logger also writes with) Lightning raises a
    ``ModuleNotFoundError`` that Hydra wraps in a multi-line instantiation error.
    """
    from sftlab.errors import ConfigError

    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        raise ConfigError(TENSORBOARD_MISSING)
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=save_dir, **kwargs)


def multirun_group(task_name: str) -> str | None:
    """``<task>-<sweep dir name>`` inside a Hydra multirun job, else None (a single run).

    The sweep dir is resolved once per sweep (Hydra copies the master config's resolver cache,
    ``${now:}`` included, into every job), so all jobs of one sweep get the same name, and two
    sweeps never share one (the dir name ends in the launching process's unique id).
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return f"{task_name}-{Path(str(HydraConfig.get().sweep.dir)).name}"
    except Exception:  # noqa: BLE001  (no usable Hydra context: no group, as in a plain run)
        return None


def finish_wandb(loggers: list[Any], failed: bool) -> None:
    """End the W&B run of this job, so each Hydra multirun job is its own run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def log_confusion_to_wandb(loggers: list[Any], y_true: list[int], y_pred: list[int], labels: list[str]) -> None:
    """The test confusion matrix as a W&B plot (a table behind it), next to the run's metrics."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            lg.experiment.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=y_true, preds=y_pred, class_names=labels)})
