"""Callbacks of our own (Lightning's built-ins come straight from conf/callbacks).

``TrainThroughput`` measures what ``metrics.json`` reports as ``train_time_s`` and
``train_samples_per_s``: training examples processed divided by the wall time of the training
loop *without* validation, which is what the HF Trainer's ``train_samples_per_second`` means
when evaluation is off, so the two compare directly. Lightning's ``ThroughputMonitor`` needs
per-device FLOP counts and reports per batch; we need one honest number per run. It also counts
the model FLOPs of every training batch (:mod:`sftlab.perf.flops`: matmuls over the real
tokens, backward only where gradients flow, attention) for ``train_mfu``: those FLOPs per
second of training over the calibrated matmul peak of the run's precision
(:mod:`sftlab.perf.precision`).

A callback reports into ``metrics.json`` by having a ``run_stats() -> dict`` method; the
pipeline asks every callback of the trainer once training ends (``sftlab.results.run_stats``)
and needs to know none of them by class.

``CrashSafeCheckpoint`` (with ``sftlab.checkpointing.RNGState``, which puts the random
generators into every checkpoint) makes a run survive being killed: it writes ``last.ckpt``
every ``checkpoint.every_n_steps`` optimizer steps and when SIGTERM/SIGINT arrive, then stops.
With the resumable train loader (``sftlab.data.ResumableDataLoader``) a run killed mid-epoch
and resumed ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from sftlab.cluster import submitit_signal
from sftlab.runs import RunInterrupted

log = logging.getLogger(__name__)


class TrainThroughput(pl.Callback):
    """Wall time of the training loop with validation subtracted, and samples processed."""

    def __init__(self, peak_gflops: float | None = None, peak_per_process: bool = False) -> None:
        """``peak_gflops``: the calibrated matmul rate of the run's precision (None: no MFU).

        ``peak_per_process``: the peak is one device's (a GPU), so under DDP the run's peak is
        that times the number of processes; on a CPU the calibration ran with all the
        machine's threads before DDP split them, so it is already the whole machine's.
        """
        from sftlab.perf.flops import FlopCounter

        self.peak_gflops = peak_gflops
        self.peak_per_process = peak_per_process
        self.flop_counter = FlopCounter()
        self.world_size = 1
        self.samples = 0
        self.train_time_s = 0.0
        self._t0: float | None = None
        self._val_t0: float | None = None
        self.first_step_s: float | None = None
        self._fit_t0: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch gets no on_train_epoch_start for that epoch
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        # our batches are transformers BatchEncoding (a Mapping, not a dict)
        self.samples += int(batch["labels"].shape[0]) * trainer.world_size
        self.world_size = trainer.world_size  # FLOPs are this rank's; the others do as much
        self.flop_counter.add(getattr(pl_module, "model", pl_module), batch,
                              head_per_token=getattr(pl_module, "head_rows", "sequence") == "token",
                              cached_blocks=getattr(pl_module, "frozen_cached_blocks", 0),
                              first_token_last_block=getattr(pl_module, "first_token_last_block", False))
        if self.first_step_s is None and self._fit_t0 is not None:
            self.first_step_s = time.perf_counter() - self._fit_t0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training and self._t0 is not None:
            self.train_time_s += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        # restart after a validation at the next training batch, not at validation end: the
        # best/last checkpoints are written after validation (ModelCheckpoint runs its
        # on_validation_end after ours), and that model selection is not training, just as the
        # HF Trainer's train_samples_per_second with saving off does not count it
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch-end validation before this hook; _t0 is then None or
        # restarted after validation, so only training time is added.
        if self._t0 is not None:
            self.train_time_s += time.perf_counter() - self._t0
            self._t0 = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_time_s if self.train_time_s > 0 else 0.0

    @property
    def gflops_per_s(self) -> float:
        """Model GFLOP/s achieved by the training loop, all processes together."""
        flops = self.flop_counter.flops * self.world_size
        return flops / self.train_time_s / 1e9 if self.train_time_s > 0 else 0.0

    def run_stats(self) -> dict[str, float]:
        stats = {
            "train_time_s": round(self.train_time_s, 3),
            "train_samples_per_s": round(self.samples_per_s, 3),
            "time_to_first_step_s": round(self.first_step_s or 0.0, 3),
            "train_model_gflops_per_s": float(f"{self.gflops_per_s:.4g}"),
            # the count itself (all processes): what train_mfu's numerator divides by the time
            "train_model_gflops": float(f"{self.flop_counter.flops * self.world_size / 1e9:.6g}"),
        }
        if self.peak_gflops:
            peak = self.peak_gflops * (self.world_size if self.peak_per_process else 1)
            stats["train_mfu"] = round(self.gflops_per_s / peak, 4)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "train_time_s": self.train_time_s, "flops": self.flop_counter.flops}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples = state_dict.get("samples", 0)
        self.train_time_s = state_dict.get("train_time_s", 0.0)
        self.flop_counter.flops = state_dict.get("flops", 0)


class FiniteLossGuard(pl.Callback):
    """Stop at the first non-finite training loss (or after ``max_bad_steps`` skipped ones).

    Why: a NaN at step 4000 otherwise trains on silently (AdamW turns every weight into NaN)
    and the run ends with chance accuracy hours later. Skipping a few bad steps (the batch's
    gradients are dropped, the optimizer does not step) rescues runs with rare fp overflows;
    a diverging LR fails fast with a message that names the step and the fix.
    """

    def __init__(self, max_bad_steps: int = 0) -> None:
        self.max_bad_steps = int(max_bad_steps)
        self.bad_steps = 0

    def run_stats(self) -> dict[str, int]:
        return {"skipped_bad_steps": self.bad_steps}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        import torch

        if torch.isfinite(loss).all():
            return
        self.bad_steps += 1
        if self.bad_steps > self.max_bad_steps:
            from sftlab.errors import TrainingError

            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            raise TrainingError(
                f"The training loss is {loss.item()} at step {trainer.global_step} (lr {lr:.3g}); "
                "lower optimizer.lr (or raise trainer.gradient_clip_val / set "
                "callbacks.finite_loss.max_bad_steps=N to skip rare bad batches)."
            )
        # skip this batch: zero the loss's graph contribution; gradients of this step are dropped
        pl_module._skip_step = True  # read in on_before_optimizer_step below

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(pl_module, "_skip_step", False):
            optimizer.zero_grad(set_to_none=True)
            pl_module._skip_step = False

    def state_dict(self) -> dict[str, Any]:
        # a resumed run keeps counting: max_bad_steps is per run, not per process
        return {"bad_steps": self.bad_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bad_steps = int(state_dict.get("bad_steps", 0))


def _validation_due(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether Lightning validates after this training batch (or, conservatively, may)."""
    done = batch_idx + 1
    if done >= trainer.num_training_batches:
        return True  # the epoch's last batch: its validation, if any, runs next
    every = getattr(trainer, "val_check_batch", None)
    return bool(trainer.enable_validation and isinstance(every, int) and every > 0 and done % every == 0)


class CrashSafeCheckpoint(pl.Callback):
    """``last.ckpt`` every ``every_n_steps`` optimizer steps, and on SIGTERM/SIGINT before exiting
    (and on submitit's requeue signal, on SLURM: ``sftlab.cluster.hand_over_requeue``).

    Why not a second ``ModelCheckpoint(every_n_train_steps=N)``: Lightning refuses any
    ``ModelCheckpoint`` when ``enable_checkpointing=false`` (benchmarks run that way), and it
    cannot stop on a signal. Why not Lightning's own SIGTERM handling: it raises wherever the
    loop notices the signal, mid-validation included, saves nothing, and ignores SIGINT.

    Here a signal only sets a flag; the next training batch that completes an optimizer step
    saves ``last.ckpt`` (through the trainer, so atomically and with every callback's state)
    and raises :class:`RunInterrupted`. That is the point where a checkpoint is exactly
    resumable: after the step, before the next batch (mid gradient accumulation the summed
    gradients would be lost). Except when a validation is due after that batch (the epoch's
    last batch, by default): Lightning resumes a checkpoint taken there *past* that
    validation, so the resumed run would miss it and could select another best checkpoint.
    Such saves and stops wait for the validation, and happen at the end of the epoch or at the
    next batch. Under DDP the flag is OR-ed over ranks every batch so all ranks stop at the
    same step; a second Ctrl+C aborts at once without saving. The checkpoint goes into the
    ``ModelCheckpoint`` callback's folder; with checkpointing off nothing is saved.
    """

    def __init__(self, every_n_steps: int | None = None, on_signal: bool = True) -> None:
        from sftlab.errors import ConfigError

        if every_n_steps is not None and (isinstance(every_n_steps, bool) or int(every_n_steps) < 0):
            raise ConfigError(
                f"checkpoint.every_n_steps must be a positive integer or null, got {every_n_steps!r}."
            )
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.on_signal = bool(on_signal)
        self.requested_signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1
        self._saved_step = -1
        self._save_pending = False

    # ------------------------------------------------------------------ signals
    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested_signal is not None and signum == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt  # the second Ctrl+C: stop now, do not wait for the step
        self.requested_signal = signum

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # and on SLURM under submitit its requeue signal (sftlab.runs: one requeue mechanism)
        requeue = [s for s in (submitit_signal(),) if s is not None]
        for signum in (signal.SIGTERM, signal.SIGINT, *requeue):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def last_path(trainer: pl.Trainer) -> Path | None:
        """``<ModelCheckpoint dirpath>/last.ckpt``, or None when checkpointing is off."""
        cb = trainer.checkpoint_callback
        if cb is None or not getattr(cb, "dirpath", None):
            return None
        return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its own SIGTERM handler just before this hook; ours replaces it
        # for the training loop, and Lightning's teardown restores the original handlers.
        self._last_step = self._saved_step = trainer.global_step
        if self.on_signal:
            self._install_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        stop = self.requested_signal is not None
        if trainer.world_size > 1:  # every rank, every batch: the collectives must match
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        step = trainer.global_step
        stepped, self._last_step = step != self._last_step, step
        if not stepped:
            return
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0 and step != self._saved_step
        if _validation_due(trainer, batch_idx):
            self._save_pending = self._save_pending or due
            return  # stop / save after the validation (on_train_epoch_end or the next batch)
        if stop:
            self._stop(trainer)
        if due or self._save_pending:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stop = self.requested_signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not (stop or self._save_pending):
            return
        # Lightning calls the checkpoint callbacks' on_train_epoch_end after ours, and they take
        # the epoch's best/last checkpoints there; let them do it first (their own later call
        # sees the step saved and skips), so what we save and resume from includes them.
        for cb in trainer.checkpoint_callbacks:
            cb.on_train_epoch_end(trainer, pl_module)
        if stop:
            self._stop(trainer)
        self._save(trainer)

    def after_fit(self, trainer: pl.Trainer) -> None:
        """After ``fit``: a signal that came when no training step was left still stops the run.

        Called by the pipeline once ``fit`` has returned (any callback with ``after_fit`` is),
        not from a Lightning hook: raising inside ``fit`` (``on_train_end``, ``on_fit_end``,
        ``teardown``) would send the run down Lightning's exception path, which finalizes the
        loggers as failed (no W&B checkpoint upload), skips the remaining end and teardown
        hooks, and lets ``ModelCheckpoint(save_on_exception=True)`` save once more, unlike a
        run that completed its training.
        """
        stop = self.requested_signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        signum = self.requested_signal or signal.SIGTERM
        path = self._save(trainer)
        log.warning(
            "Received %s: saved %s at step %d and stopped.",
            signal.Signals(signum).name, path or "no checkpoint (checkpointing is off)", trainer.global_step,
        )
        raise RunInterrupted(signum, trainer.global_step, str(path) if path else None)

    def _save(self, trainer: pl.Trainer) -> Path | None:
        self._save_pending = False
        path = self.last_path(trainer)
        if path is not None:
            # ModelCheckpoint writes last.ckpt too; told it is its own file, it overwrites it
            # later instead of starting a last-v1.ckpt (which a resume would not pick up)
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "save_last", None) and Path(getattr(cb, "dirpath", "") or "") == path.parent:
                    cb.last_model_path = str(path)
            trainer.save_checkpoint(path, weights_only=False)  # the full training state
            self._saved_step = trainer.global_step
        return path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        # last.ckpt = the end of training. Lightning 2.6's ModelCheckpoint rewrites it only at
        # a step where it also kept a top-k checkpoint, so after an epoch that did not improve
        # it held an earlier step: the last epoch's weights were lost for eval.py (best vs last
        # epoch) and for anyone reading "last" as "final".
        step = trainer.global_step
        saved = [getattr(cb, "_last_global_step_saved", -1) for cb in trainer.checkpoint_callbacks]
        if self._saved_step != step and step not in saved:
            self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
