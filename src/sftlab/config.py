"""From the composed config to objects: instantiation, cheap checks, where the run writes.

The pipelines (``sftlab.train``, ``sftlab.evaluate``) build every object through here, so our
own errors reach the user as one sentence, and a typo in a number fails before anything heavy
is imported. Only omegaconf and hydra at import time: this module is on the config path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sftlab.errors import checked


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own errors through as themselves.

    Hydra wraps whatever a constructor raises in an ``InstantiationException`` that repeats the
    target and the config key around it; a ``ConfigError`` from ``TextClassifier`` (max_length
    beyond the model's positions) or a strategy (trainable_layers too large) would then print
    as a multi-line Hydra error instead of our one sentence.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from sftlab.errors import SftlabError

    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err.__cause__
        while cause is not None and not isinstance(cause, SftlabError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict group (callbacks, loggers); skip null/disabled ones."""
    out = []
    for _, node in (group or {}).items():
        if node is None or not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        if node.pop("enable", True) is False:
            continue
        out.append(instantiate(node))
    return out


def check_config(cfg: DictConfig) -> None:
    """Cheap checks before anything is loaded, so a typo costs seconds, not an epoch."""
    from sftlab.optim import base_lr

    base_lr(cfg.optimizer)
    for key in ("batch_size", "eval_batch_size"):
        checked(f"data.{key}", cfg.data.get(key), int, positive=True)
    checked("model.max_length", cfg.model.get("max_length", 1), int, positive=True)
    from sftlab.tasks import task_of

    if task_of(cfg).name == "token_classification":  # a misspelt scheme, before torch loads
        from sftlab.data.tags import check_scheme

        check_scheme(cfg.data.get("tag_scheme", "auto"))
    from sftlab.cluster import check_slurm_world

    check_slurm_world(cfg)


def route_lightning_logs() -> None:
    """Send Lightning's messages through the root logger only (Hydra's console + run log).

    Lightning adds its own console handler when it is imported before logging is configured,
    which prints every message twice under Hydra.
    """
    if logging.getLogger().hasHandlers():
        for name in ("lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            lg.handlers.clear()
            lg.propagate = True


# set by launchers that start each sweep job as its own command (hydra/launcher=torchrun): the
# job runs as a single Hydra run in its sweep subdir, and is still a sweep job
SWEEP_JOB_ENV = "SFTLAB_SWEEP_JOB"


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (a sweep)."""
    if os.environ.get(SWEEP_JOB_ENV):
        return True
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def output_dir(cfg: DictConfig) -> Path:
    """The run's dir (``paths.output_dir``), created if needed."""
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
