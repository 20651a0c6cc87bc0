"""Gradual unfreezing: the :class:`Gradual` schedule (which part starts training at which
optimizer step) and the :class:`GradualUnfreezing` callback that applies it during ``fit``."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl

from sftlab.errors import ConfigError, checked
from sftlab.layers import BLOCK, EMBEDDINGS, HEAD, POOLER, LayerMap, Part
from sftlab.strategies.base import Named, Strategy

log = logging.getLogger(__name__)


class Gradual(Strategy):
    """ULMFiT gradual unfreezing (Howard & Ruder 2018): start with the head, then unfreeze the
    blocks one group at a time from the top down, the embeddings last.

    Training the randomly initialized head first keeps its large early gradients from wrecking
    the pretrained features ("catastrophic forgetting"); each deeper group joins once the layers
    above it have adapted. Stage 0 trains head + pooler (+ the top ``initial_layers`` blocks);
    stage ``k`` adds the next ``layers_per_step`` blocks downward; after the bottom block,
    the embeddings (``unfreeze_embeddings: true``). Stage ``k`` starts at optimizer step
    ``k * interval``. By default the stages spread over the first ``unfreeze_over`` (0.5) of the
    run: ``interval = floor(unfreeze_over * total_steps / last_stage)`` (at least 1), so every
    part trains for at least half of the run whatever the depth: a fixed per-stage interval
    that fits a 6-block MiniLM leaves a 12-block BERT's embeddings untrained in a 3-epoch run,
    and half of a 24-block model. ULMFiT's own recipe, one stage per ``unfreeze_every`` epochs
    (``interval = round(unfreeze_every * steps_per_epoch)``), and a fixed
    ``unfreeze_every_steps`` are there too; when such an explicit schedule leaves parts that
    never start within the run, one warning at fit start names them and the fix.
    ``lr_decay < 1`` adds discriminative LRs (ULMFiT used both).

    **Scheduler.** Every part that will ever train is in the optimizer from the start, at its
    own LR; a frozen part has no gradient, so AdamW skips it (no update, no state) until it is
    unfrozen. The LR scheduler therefore governs every group from step 0, and a part unfrozen at
    step ``s`` starts at its scheduled LR ``lr_part * lambda(s)``. Adding param groups at unfreeze
    time instead (Lightning's old ``BaseFinetuning`` recipe) escapes the scheduler built on the
    original groups (huggingface/transformers#20029, Lightning-AI/pytorch-lightning#8720).

    **DDP.** DDP's reducer records which parameters require grad when the model is wrapped, and
    a later ``requires_grad`` change is not seen by it (Lightning-AI/pytorch-lightning#20340):
    a block unfrozen after wrapping would train on unreduced, per-rank gradients and the
    replicas would drift apart. So in a distributed run (``trainer.world_size > 1``) the
    callback's ``setup`` hook, which Lightning 2.x calls *before* ``strategy.setup`` wraps the
    model in DDP (``Trainer._run``: ``_call_setup_hook`` then ``strategy.setup`` ->
    ``configure_ddp``), sets ``requires_grad=True`` on every part that will unfreeze later; DDP
    then registers and all-reduces them every step (a static set of parameters, no
    ``find_unused_parameters`` needed), and ``on_before_optimizer_step`` (after the all-reduce,
    before gradient clipping and ``optimizer.step``) sets ``p.grad = None`` for the parts whose
    stage has not begun, so AdamW skips them exactly as in a single process: bit-identical
    weights, no optimizer state, clipping norms computed over the same parameters. The price is
    the backward compute of not-yet-unfrozen blocks in distributed runs. Single-process runs
    toggle ``requires_grad`` at ``on_train_batch_start`` of the unfreeze step (the first
    micro-batch of that optimizer step), so frozen blocks cost no backward.

    The state is a function of ``trainer.global_step`` alone, so resuming from a checkpoint
    resumes the schedule. The number of trainable blocks is logged as
    ``strategy/unfrozen_blocks``.
    """

    name = "gradual"

    def __init__(self, initial_layers: int = 0, unfreeze_every: float | None = None, layers_per_step: int = 1,
                 unfreeze_embeddings: bool = True, unfreeze_every_steps: int | None = None,
                 unfreeze_over: float = 0.5, lr_decay: float = 1.0, name: str | None = None,
                 lr: float | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name, lr=lr)
        self.initial_layers = checked("strategy.initial_layers", initial_layers, int, 0)
        self.unfreeze_every = checked("strategy.unfreeze_every", unfreeze_every, float, 0.0, lo_open=True,
                                      hint="it is in epochs, fractions allowed (0.5)", allow_none=True)
        self.unfreeze_over = checked("strategy.unfreeze_over", unfreeze_over, float, 0.0, 1.0, lo_open=True,
                                     hint="the fraction of the run by which every part trains")
        #: the run's optimizer steps (set at fit start), for the default spread
        self.total_steps: int | None = None
        self.layers_per_step = checked("strategy.layers_per_step", layers_per_step, int, 1)
        self.unfreeze_embeddings = bool(unfreeze_embeddings)
        self.unfreeze_every_steps = checked("strategy.unfreeze_every_steps", unfreeze_every_steps, int, 1,
                                            allow_none=True)
        self.steps_per_epoch: int | None = None

    def validate(self, layer_map: LayerMap) -> None:
        n = layer_map.num_blocks
        if self.initial_layers > n:
            raise ConfigError(
                f"strategy.initial_layers={self.initial_layers} but {layer_map.model_type} has "
                f"{n} blocks; choose 0..{n}."
            )

    def _block_stage(self, depth: int) -> int:
        j = depth - 1  # 0 = top block
        if j < self.initial_layers:
            return 0
        return 1 + (j - self.initial_layers) // self.layers_per_step

    def stage(self, part: Part, layer_map: LayerMap) -> int | None:
        if part.kind in (HEAD, POOLER):
            return 0
        if part.kind == BLOCK:
            return self._block_stage(part.depth)
        if part.kind == EMBEDDINGS:
            if not self.unfreeze_embeddings:
                return None
            last = self._block_stage(layer_map.num_blocks) if layer_map.num_blocks else 0
            return last + 1
        return None

    def num_stages(self, layer_map: LayerMap | None = None) -> int:
        layer_map = layer_map or self.layers()
        stages = [self.stage(p, layer_map) for p in layer_map]
        return max(s for s in stages if s is not None)

    # -------------------------------------------------------------- schedule
    @property
    def explicit(self) -> bool:
        """Whether the user fixed the interval (in steps or epochs) rather than the spread."""
        return self.unfreeze_every_steps is not None or self.unfreeze_every is not None

    def interval(self, steps_per_epoch: int | None = None, total_steps: int | None = None) -> int:
        """Optimizer steps between two unfreezing stages."""
        if self.unfreeze_every_steps is not None:
            return self.unfreeze_every_steps
        if self.unfreeze_every is not None:
            spe = steps_per_epoch if steps_per_epoch is not None else self.steps_per_epoch
            if spe is None:
                raise RuntimeError("the unfreezing interval is known once the trainer knows its epoch "
                                   "length (pass steps_per_epoch, or set unfreeze_every_steps)")
            return max(1, round(self.unfreeze_every * spe))
        total = total_steps if total_steps is not None else self.total_steps
        if total is None:
            raise RuntimeError("the unfreezing interval is known once the trainer knows the run's "
                               "length (pass total_steps, or set unfreeze_every_steps)")
        return max(1, math.floor(self.unfreeze_over * total / max(1, self.num_stages())))

    def stage_step(self, stage: int, steps_per_epoch: int | None = None) -> int:
        """The global step (optimizer steps done) at which stage ``stage`` starts training."""
        return 0 if stage == 0 else stage * self.interval(steps_per_epoch)

    def unfreeze_steps(self, steps_per_epoch: int | None = None,
                       layer_map: LayerMap | None = None) -> dict[str, int]:
        """Part name -> the first global step it trains (0: from the start); never-trained parts
        are absent. A part's weights first change in the optimizer step taken at that step."""
        layer_map = layer_map or self.layers()
        out = {}
        for part in layer_map:
            k = self.stage(part, layer_map)
            if k is not None:
                out[part.name] = self.stage_step(k, steps_per_epoch)
        return out

    def _later_label(self, stage: int) -> str:
        known = (self.unfreeze_every_steps is not None
                 or (self.unfreeze_every is not None and self.steps_per_epoch is not None)
                 or (not self.explicit and self.total_steps is not None))
        return f"from step {self.stage_step(stage)}" if known else f"stage {stage}"

    def never_started(self, total_steps: int) -> list[str]:
        """Parts that would start training only at or after the run's last step."""
        steps = self.unfreeze_steps()
        return sorted((n for n, s in steps.items() if s >= total_steps), key=lambda n: (steps[n], n))

    def callbacks(self) -> list[pl.Callback]:
        return [GradualUnfreezing(self)]


class GradualUnfreezing(pl.Callback):
    """Applies a :class:`Gradual` strategy's schedule during ``fit`` (see its docstring for why).

    Needs the LightningModule to expose the transformers model as ``.model`` (as
    ``sftlab.model.TextClassifier`` does); a LightningModule that *is* the model also works.
    """

    def __init__(self, strategy: Gradual) -> None:
        self.strategy = strategy
        self.distributed = False
        # (part name, kind, stage, params that train when the stage begins), for stages >= 1
        self._later: list[tuple[str, str, int, Named]] = []
        self._initial_blocks = 0
        self._unfrozen: set[str] = set()

    @staticmethod
    def _model(pl_module):
        return getattr(pl_module, "model", pl_module)

    def _resolve(self, pl_module) -> None:
        """The later stages' parameters, from the map ``setup`` built (moving the model to its
        device and wrapping it in DDP keep the parameter objects, so it is read, not rebuilt)."""
        layer_map = self.strategy.layers(self._model(pl_module))
        s = self.strategy
        self._later = []
        self._initial_blocks = 0
        for part in layer_map:
            k = s.stage(part, layer_map)
            if k is None:
                continue
            if k == 0:
                self._initial_blocks += part.kind == BLOCK
            else:
                self._later.append((part.name, part.kind, k, s.selected(part, layer_map)))

    # -------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.distributed = trainer.world_size > 1
        self._resolve(pl_module)
        if self.distributed:
            # before DDP wraps the model: register every part that will ever train
            for _, _, _, params in self._later:
                for _, p in params:
                    p.requires_grad_(True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s = self.strategy
        if s.unfreeze_every_steps is None:
            s.steps_per_epoch = self.steps_per_epoch(trainer)
        total = trainer.estimated_stepping_batches
        s.total_steps = int(total) if math.isfinite(total) and total > 0 else None
        if s.total_steps is None and not s.explicit:
            raise ConfigError("strategy=gradual spreads its stages over the run, whose length is "
                              "unknown; set trainer.max_epochs or trainer.max_steps, or "
                              "strategy.unfreeze_every_steps.")
        late = s.never_started(s.total_steps) if s.total_steps is not None else []
        if late:
            log.warning(
                "gradual unfreezing: %s never train in this run's %d steps (they start at step %d "
                "or later); lower strategy.unfreeze_every / unfreeze_every_steps, or drop both to "
                "spread the stages over strategy.unfreeze_over of the run.",
                ", ".join(late), s.total_steps, min(s.unfreeze_steps()[n] for n in late))
        self._unfrozen = set()
        self._apply(trainer.global_step)
        log.info("gradual unfreezing every %d steps: %s", s.interval(),
                 ", ".join(f"{name}@{s.stage_step(k)}" for name, _, k, _ in self._later) or "nothing to unfreeze")

    def steps_per_epoch(self, trainer: pl.Trainer) -> int:
        """Optimizer steps in one epoch, known at ``on_fit_start`` (so the parts table can say
        "from step N").

        Lightning fills ``trainer.num_training_batches`` only in ``fit_loop.setup_data()``, which
        it runs after ``on_fit_start``, so we run it here (it is idempotent). The public
        ``trainer.estimated_stepping_batches`` is not the epoch length: it is the whole run's
        steps (times ``max_epochs``, capped at ``max_steps``), and with ``max_epochs=-1`` it
        returns ``max_steps`` without loading the data.
        """
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            raise ConfigError(
                "strategy.unfreeze_every is in epochs but the training data has no length; "
                "set strategy.unfreeze_every_steps instead."
            )
        return math.ceil(batches / max(1, trainer.accumulate_grad_batches))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        n_blocks = self._apply(trainer.global_step)
        pl_module.log("strategy/unfrozen_blocks", float(n_blocks), on_step=True, on_epoch=False,
                      batch_size=1)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self.distributed:
            return
        step = trainer.global_step
        for _, _, k, params in self._later:
            if self.strategy.stage_step(k) > step:
                for _, p in params:
                    p.grad = None

    # -------------------------------------------------------------- state
    def _apply(self, step: int) -> int:
        """Set the trainable state for global step ``step``; return the number of trainable blocks."""
        n_blocks = self._initial_blocks
        started = []
        for name, kind, k, params in self._later:
            on = step >= self.strategy.stage_step(k)
            if not self.distributed:
                for _, p in params:
                    if p.requires_grad != on:
                        p.requires_grad_(on)
            if on:
                n_blocks += kind == BLOCK
                if name not in self._unfrozen:
                    self._unfrozen.add(name)
                    started.append(name)
        if started:
            log.info("gradual unfreezing: step %d: %s start training", step, ", ".join(started))
        return n_blocks
