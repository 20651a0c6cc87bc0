"""Callbacks of our own (Lightning's built-ins come straight from conf/callbacks).

``TrainThroughput`` measures what ``metrics.json`` reports as ``train_time_s`` and
``train_samples_per_s``: training examples processed divided by the wall time of the training
loop *without* validation, which is what the HF Trainer's ``train_samples_per_second`` means
when evaluation is off, so the two compare directly. Lightning's ``ThroughputMonitor`` needs
per-device FLOP counts and reports per batch; we need one honest number per run.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class TrainThroughput(pl.Callback):
    """Wall time of the training loop with validation subtracted, and samples processed."""

    def __init__(self) -> None:
        self.samples = 0
        self.train_time_s = 0.0
        self._t0: float | None = None
        self._val_t0: float | None = None
        self.first_step_s: float | None = None
        self._fit_t0: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        # our batches are transformers BatchEncoding (a Mapping, not a dict)
        self.samples += int(batch["labels"].shape[0]) * trainer.world_size
        if self.first_step_s is None and self._fit_t0 is not None:
            self.first_step_s = time.perf_counter() - self._fit_t0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training and self._t0 is not None:
            self.train_time_s += time.perf_counter() - self._t0
            self._t0 = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training:
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

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "train_time_s": self.train_time_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples = state_dict.get("samples", 0)
        self.train_time_s = state_dict.get("train_time_s", 0.0)


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
