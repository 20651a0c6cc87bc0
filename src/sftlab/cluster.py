"""What the launcher that started this process (torchrun, srun, submitit) means for a run.

- The run dir: every process torchrun or srun starts resolves the default run dir on its own
  (:func:`check_shared_run_dir`).
- The world: the tasks srun started must be the world the trainer expects
  (:func:`check_slurm_world`).
- Requeue on SLURM: one mechanism, submitit's (below, and ``conf/hydra/launcher/slurm.yaml``).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from sftlab.errors import ConfigError

if TYPE_CHECKING:
    from sftlab.runs import RunInterrupted

log = logging.getLogger(__name__)


def check_shared_run_dir(cfg: DictConfig) -> None:
    """Ranks started by torchrun or srun name their run dir each for itself: insist on one.

    Lightning's own DDP launcher hands rank 0's dir to the ranks it starts, and a sweep job's
    dir is its sweep subdir; but every process torchrun or srun starts resolves the default
    ``runs/<time>_<pid>`` on its own, and the ranks would scatter over several dirs.
    """
    external = bool(os.environ.get("TORCHELASTIC_RUN_ID")) or (
        "SLURM_PROCID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"))
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    if not external or not world.isdigit() or int(world) < 2 or cfg.get("resume"):
        return
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
            return
        given = any(str(o).split("=", 1)[0] == "hydra.run.dir" for o in HydraConfig.get().overrides.hydra)
    except Exception:  # noqa: BLE001  (no Hydra run: the caller chose the dir)
        return
    if not given:
        raise ConfigError(
            f"{world} processes were started by torchrun/srun, and each would name its own run dir; "
            "give all of them the same one: hydra.run.dir=outputs/train/runs/<name> (on a "
            "filesystem every node sees)."
        )


def check_slurm_world(cfg: DictConfig) -> None:
    """Under srun, the tasks SLURM started must be the world the trainer expects.

    Lightning takes the world size from ``SLURM_NTASKS``; fewer tasks than
    ``trainer.num_nodes × trainer.devices`` would train on a silently smaller world
    (Lightning #20391), more would leave ranks out of the process group.
    """
    ntasks = os.environ.get("SLURM_NTASKS")
    if not ntasks or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return  # not srun (Lightning's SLURMEnvironment.detect() says the same)
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if not (isinstance(devices, int) and isinstance(nodes, int)) or not ntasks.isdigit():
        return
    if int(ntasks) != devices * nodes:
        raise ConfigError(
            f"SLURM started {ntasks} tasks but trainer.num_nodes × trainer.devices = {nodes} × "
            f"{devices} = {nodes * devices}; start one task per device (hydra/launcher=slurm "
            "derives tasks_per_node and nodes from them) or set trainer.num_nodes/trainer.devices "
            "to match."
        )


# One requeue mechanism: submitit's. On SLURM under hydra/launcher=slurm, submitit asks SLURM
# for its signal (USR2 by default, SUBMITIT_PREEMPT_SIGNAL) ``signal_delay_s`` before the time
# limit, and its handler re-submits the same job (same sweep job number, so the same run dir).
# CrashSafeCheckpoint catches that signal first, like SIGTERM: it saves last.ckpt at the next
# optimizer step and stops; main() then hands the signal to submitit's handler, and the
# requeued job resumes in place from that last.ckpt (sftlab.sweeps). Lightning's own SLURM
# requeue (SIGUSR1, an "hpc" checkpoint written inside the signal handler, mid-step) is off.
def submitit_signal() -> int | None:
    """The signal submitit requeues on, when this process is a submitit job; else None."""
    if not os.environ.get("SUBMITIT_FOLDER"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return int(sig) if sig is not None else None


def hand_over_requeue(err: RunInterrupted) -> None:
    """After a stop on submitit's signal (last.ckpt saved): let submitit requeue the job.

    Lightning restored the handlers it found before fit, so submitit's is current again; it
    requeues on global rank 0 and exits there, and returns on the other ranks.
    """
    if err.signum != submitit_signal():
        return
    handler = signal.getsignal(err.signum)
    if callable(handler):
        log.info("Handing %s to submitit: requeue, then resume from %s", err.signal_name, err.checkpoint)
        handler(err.signum, None)


def cluster_plugins() -> list[Any]:
    """Lightning plugins for the cluster this process runs on: SLURM without Lightning's requeue.

    Under submitit the requeue is submitit's (see above); Lightning's SLURMEnvironment still
    reads the ranks and the world from srun's variables.
    """
    if submitit_signal() is None:
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
