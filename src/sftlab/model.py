"""The task room: a pretrained transformer + classification head + loss + metrics.

``TextClassifier`` wraps ``AutoModelForSequenceClassification`` in a LightningModule. It owns
what is specific to the *task* (cross-entropy with optional label smoothing, torchmetrics on
val and test, the confusion matrix) and delegates what is specific to the *fine-tuning
recipe* to two collaborators given by the config:

- the strategy (``conf/strategy``) decides which parts train, at which LR, and when;
- the optimizer and scheduler factories (``conf/optimizer``, ``conf/scheduler``) build the
  optimizer over the strategy's parameter groups.

So a new strategy is one class + one YAML, and never touches this file.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from sftlab.errors import ConfigError
from sftlab.pooling import logits_of, resolve_pooling
from sftlab.pretrained import check_max_length, load_pretrained

log = logging.getLogger(__name__)

# Batch keys that are ours, not the model's.
_META_KEYS = ("labels", "idx", "length")


def metric_key(name: str) -> str:
    """A label name usable inside a metric key (``Sci/Tech`` → ``Sci_Tech``)."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name)).strip("_") or "label"


class TextClassifier(pl.LightningModule):
    """A sequence classifier trained with cross-entropy, evaluated with torchmetrics.

    Metrics (``split/name``): ``acc``, ``f1_macro``, ``loss`` and per class
    ``precision/<label>``, ``recall/<label>``, ``f1/<label>`` on validation and test. The
    test confusion matrix is kept in ``self.test_confusion`` for the run to save.
    """

    #: the metric a study ranks by and checkpoints select on (``val/acc``)
    main_metric = "acc"
    #: the transformers Auto class of the head (``sftlab.tasks`` names one per task)
    auto_model = "AutoModelForSequenceClassification"
    #: what the head reads: one position per ``sequence``, or every ``token`` (model FLOPs, MFU)
    head_rows = "sequence"

    def __init__(
        self,
        name_or_path: str,
        label_names: Sequence[str],
        strategy: Any = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        max_length: int = 128,
        hidden_dropout: float | None = None,
        attention_dropout: float | None = None,
        label_smoothing: float = 0.0,
        pad_token_from_eos: bool = False,
        padding_side: str | None = None,
        pad_token_id: int | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        pooling: str = "auto",
        model: Any = None,
    ) -> None:
        super().__init__()
        self.label_names = [str(n) for n in label_names]
        self.num_labels = len(self.label_names)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)
        self.max_length = int(max_length)
        if model is None:  # a ready model may be given (tests, eval of an exported folder)
            model = load_pretrained(
                name_or_path,
                num_labels=self.num_labels,
                id2label=dict(enumerate(self.label_names)),
                hidden_dropout=hidden_dropout,
                attention_dropout=attention_dropout,
                pad_token_id=pad_token_id,
                revision=revision,
                trust_remote_code=trust_remote_code,
                auto_class=self.auto_model,
            )
        check_max_length(model, self.max_length, name_or_path)
        # None: the stock head pools (exportable); else cls/mean/last/pooler by us (sftlab.pooling)
        self.pooling = resolve_pooling(model, pooling, name_or_path)
        model.train()  # from_pretrained returns eval mode; Lightning toggles modes from here
        self.strategy = strategy
        # The strategy freezes what starts frozen *now*, before any Trainer/DDP wrapping, so
        # DDP registers the right parameters (see strategies/gradual.py for gradual unfreezing).
        self.model = strategy.setup(model) if strategy is not None else model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._build_metrics()
        self.test_confusion: torch.Tensor | None = None
        # (row index in the split's file, true label id, probabilities) per test example
        self.test_predictions: list[tuple[int, int, list[float]]] = []

    # ------------------------------------------------------------------------- metrics
    def _build_metrics(self) -> None:
        from torchmetrics import MeanMetric, MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        k = self.num_labels

        def collection(prefix: str) -> MetricCollection:
            return MetricCollection(
                {
                    "acc": MulticlassAccuracy(k, average="micro"),
                    "f1_macro": MulticlassF1Score(k, average="macro"),
                    "precision": MulticlassPrecision(k, average=None),
                    "recall": MulticlassRecall(k, average=None),
                    "f1": MulticlassF1Score(k, average=None),
                },
                prefix=prefix,
            )

        self.val_metrics = collection("val/")
        self.test_metrics = collection("test/")
        self.test_confmat = MulticlassConfusionMatrix(k)
        # Loss means weighted by examples, summed over DDP ranks before dividing: equal to one
        # process's mean over the split. (``self.log(sync_dist=True)`` averages the ranks'
        # means, which is off when the ranks hold different numbers of examples.)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def _flatten(self, computed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-class vectors become one scalar per label: ``val/f1/World``."""
        out = {}
        for key, value in computed.items():
            if value.ndim == 0:
                out[key] = value
            else:
                for name, v in zip(self.label_names, value, strict=True):
                    out[f"{key}/{metric_key(name)}"] = v
        return out

    # ------------------------------------------------------------------------- steps
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in _META_KEYS}
        return logits_of(self.model, inputs, self.pooling)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self._loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        loss = self._loss(logits, batch["labels"])
        self.val_loss.update(loss.detach(), weight=len(batch["labels"]))
        self.val_metrics.update(logits.argmax(-1), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        # torchmetrics' compute() already reduced over DDP ranks, so every rank holds the same
        # values; sync_dist=True averages identical numbers (exact) and tells Lightning so
        metrics = self._flatten(self.val_metrics.compute())
        acc = metrics.pop("val/acc")
        self.log_dict(metrics, sync_dist=True)
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        self.val_metrics.reset()
        self.val_loss.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        loss = self._loss(logits, batch["labels"])
        self.test_loss.update(loss.detach(), weight=len(batch["labels"]))
        preds = logits.argmax(-1)
        self.test_metrics.update(preds, batch["labels"])
        self.test_confmat.update(preds, batch["labels"])
        if "idx" in batch:
            probs = logits.float().softmax(-1).cpu().tolist()
            self.test_predictions.extend(
                zip(batch["idx"].cpu().tolist(), batch["labels"].cpu().tolist(), probs, strict=True)
            )

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._flatten(self.test_metrics.compute()), sync_dist=True)
        self.log("test/loss", self.test_loss.compute(), sync_dist=True)
        self.test_confusion = self.test_confmat.compute().cpu()
        # each DDP rank scored its own batches; every rank gets all rows (rank 0 saves them)
        self.test_predictions = _gather_lists(self.test_predictions)
        self.test_metrics.reset()
        self.test_confmat.reset()
        self.test_loss.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the label names, so a bare checkpoint can be evaluated without its data."""
        checkpoint["sftlab"] = {"label_names": self.label_names}

    # ------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        from sftlab.optim import build_optimizer

        if self.optimizer_factory is None:
            raise ConfigError("No optimizer configured; add optimizer=adamw.")
        optimizer = build_optimizer(self.model, self.strategy, self.optimizer_factory)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigError("Cannot size the LR schedule: set trainer.max_epochs or trainer.max_steps.")
        scheduler = self.scheduler_factory(optimizer, num_training_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the true gradients here, for every precision and optimizer (fused AdamW included).

        Lightning's mixed-precision plugin refuses to clip for optimizers that unscale
        gradients inside their ``step`` (fused AdamW), because under fp16 the gradients it sees
        are still multiplied by the loss scale. With a scaler we unscale them ourselves first
        (``GradScaler.unscale_``, which also records inf/NaN for the step); ``GradScaler.step``
        then hands such an optimizer no ``grad_scale`` (the stage is UNSCALED), so its fused
        kernel does not unscale twice, and skips the step if the unscale found inf/NaN. Other
        optimizers were unscaled by Lightning before this hook. bf16 and fp32 have no scaler.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            from sftlab.perf.embedding_grad import clip_grad_norm_

            clip_grad_norm_(params, gradient_clip_val)  # torch's, or over a kept buffer's touched rows

    def on_fit_start(self) -> None:
        from sftlab.console import print_parts_table
        from sftlab.layers import count_params
        from sftlab.optim import part_lrs

        trainable, total = count_params(self.model)
        if self.strategy is not None and self.trainer.is_global_zero:
            # the LRs the optimizer got (configure_optimizers ran before on_fit_start)
            lrs = {k: v for opt in self.trainer.optimizers for k, v in part_lrs(opt).items()}
            print_parts_table(self.strategy.describe(self.model, lrs), title=f"strategy: {self.strategy.name}")
        for logger in self.loggers:
            logger.log_metrics(
                {"trainable_params": trainable, "trainable_fraction": trainable / max(total, 1)}, step=0
            )


def _gather_lists(items: list) -> list:
    """Concatenate a picklable list over DDP ranks (the list itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in (part or [])]
