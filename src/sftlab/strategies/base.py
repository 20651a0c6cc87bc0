"""The strategy contract: which parts train, when, and at which share of the LR.

A strategy speaks about the parts of :mod:`sftlab.layers` (embeddings, ``block.i``, pooler,
head), so one class serves every architecture. Subclasses answer two questions per part
(``stage``: when does it start training, if ever; ``select``: which of its parameters train),
and this base class does the bookkeeping: ``requires_grad``, the parameter groups, the parts
table.

Learning rates: every strategy takes ``lr_decay`` (layer-wise LR decay). A part at depth ``d``
from the top trains at ``lr * lr_decay ** d`` (its *LR scale* is ``lr_decay ** d``): head and
pooler ``d = 0`` (``lr``), the top block ``d = 1``, ..., the bottom block ``d = L``, the
embeddings ``d = L + 1`` (the lowest rate). It is 1.0 (off) everywhere except
``discriminative``, so ``strategy=gradual strategy.lr_decay=0.9`` composes ULMFiT's two ideas
and a sweep can vary ``strategy.lr_decay`` under any strategy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from sftlab.errors import checked
from sftlab.layers import LayerMap, Part, build_layer_map, count_params

log = logging.getLogger(__name__)

Named = list[tuple[str, Any]]


class Strategy:
    """The base recipe: every part trains, from the start, at ``lr * lr_decay ** depth``.

    Subclasses say *which* parts train and *when* through two hooks, and the base class does
    the bookkeeping (``requires_grad``, parameter groups, the parts table):

    - ``stage(part, layer_map)``: 0 if the part trains from the first step, ``k > 0`` if it
      starts at unfreezing stage ``k`` (gradual), ``None`` if it never trains;
    - ``select(part, layer_map)``: which of the part's parameters train when it does (all by
      default; BitFit: the biases; LoRA: the adapters).

    Frozen parameters get ``requires_grad=False`` (autograd skips them: no gradient, less
    memory) and no optimizer group (no AdamW state: two fewer copies of the frozen weights).

    The LightningModule calls ``setup(model) -> model`` once, in its ``__init__``, before the
    Trainer (and DDP) exist: it maps the layers (once: ``self.layer_map``), sets
    ``requires_grad`` for what starts frozen, and may wrap the model (LoRA). Then
    ``sftlab.optim.build_optimizer`` asks ``param_groups`` for one group per part that ever
    trains; ``callbacks()`` go to the Trainer (gradual unfreezing); ``describe`` fills the parts
    table at fit start; ``export_model`` gives the model to ``save_pretrained``.
    """

    name = "strategy"
    #: run the parts that never train (the embeddings + bottom blocks) once per example and
    #: cache their output (``sftlab.perf.frozen_cache``); head_only and partial take it
    cache_frozen = False
    #: what ``describe`` calls a partial selection ("biases", "adapters")
    select_label = "selected"

    def __init__(self, lr_decay: float = 1.0, name: str | None = None, lr: float | None = None) -> None:
        self.lr_decay = checked("strategy.lr_decay", lr_decay, float, 0.0, 1.0, lo_open=True,
                                hint="1.0 is off, 0.95 is Sun et al.'s choice")
        if name:
            self.name = str(name)
        # the LR this recipe is known to want (conf/strategy/<name>.yaml: lr, where the value
        # comes from); conf/optimizer reads it as optimizer.lr unless the user sets one
        self.lr = checked("strategy.lr", lr, float, positive=True, allow_none=True)
        self.layer_map: LayerMap | None = None

    # ------------------------------------------------------------------ subclass hooks
    def stage(self, part: Part, layer_map: LayerMap) -> int | None:
        return 0

    def select(self, part: Part, layer_map: LayerMap) -> Named:
        return list(part.params)

    def validate(self, layer_map: LayerMap) -> None:
        """Check the config against the model (e.g. the number of blocks); raise ConfigError."""

    def selected(self, part: Part, layer_map: LayerMap) -> Named:
        """``select`` without the parameters the forward never uses (``LayerMap.inert``)."""
        return [(n, p) for n, p in self.select(part, layer_map) if n not in layer_map.inert]

    # ------------------------------------------------------------------ the interface
    def setup(self, model):
        """Map the layers and freeze what does not train from the first step; return the model.

        The map is built here, once, on the model as returned (a strategy that wraps the model
        maps the wrapper), and every later question (groups, table, unfreezing) reads it.
        """
        layer_map = build_layer_map(model)
        self.validate(layer_map)
        for part in layer_map:
            now = {id(p) for _, p in self.selected(part, layer_map)} if self.stage(part, layer_map) == 0 else set()
            for _, p in part.params:
                p.requires_grad_(id(p) in now)
        self.layer_map = layer_map
        trainable, total = count_params(model)
        log.info("strategy %s: %s of %s parameters train from the start (%.2f%%)", self.name,
                 f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
        return model

    def layers(self, model=None) -> LayerMap:
        """The layer map ``setup`` built; ``model``, when given, must be the model it returned.

        Never rebuilt: moving the model to a device or wrapping it in DDP keeps its parameter
        objects (``.to`` swaps their data in place), so the map stays the model's for the run.
        """
        if self.layer_map is None:
            raise RuntimeError("call setup(model) first")
        if model is not None:
            named = dict(model.named_parameters())
            if any(named.get(n) is not p for n, p in self.layer_map.named_parameters()):
                raise RuntimeError(f"strategy {self.name}: this is not the model setup() returned")
        return self.layer_map

    def lr_scale(self, part: Part) -> float:
        """``lr_decay ** depth`` (head/pooler depth 0, top block 1, embeddings L + 1)."""
        return self.lr_decay ** part.depth

    def param_groups(self, model, lr: float) -> list[dict[str, Any]]:
        """One group per part that ever trains: ``{"name", "params": [(name, p)], "lr"}``.

        Parts that never train are left out (no optimizer state); ``sftlab.optim`` splits each
        group into decay / no-decay groups and keeps its name and LR.
        """
        layer_map = self.layers(model)
        groups = []
        for part in layer_map:
            if self.stage(part, layer_map) is None:
                continue
            params = self.selected(part, layer_map)
            if params:
                groups.append({"name": part.name, "params": params, "lr": lr * self.lr_scale(part)})
        return groups

    def callbacks(self) -> list[pl.Callback]:
        return []

    def export_model(self, model):
        """The model to ``save_pretrained``: the model itself unless a strategy wrapped it."""
        return model

    def describe(self, model, lr: float | Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """One row per part: part, params, trainable (True/False/"biases (n)"/"from step N"), lr.

        ``lr`` is a base LR (a row shows ``lr * lr_scale``) or the optimizer's LR per part name
        (``sftlab.optim.part_lrs``: the table at fit start shows what the optimizer got).
        """
        layer_map = self.layers(model)
        rows = []
        for part in layer_map:
            k = self.stage(part, layer_map)
            selected = self.selected(part, layer_map) if k is not None else []
            n_sel = sum(p.numel() for _, p in selected)
            n_all = sum(p.numel() for n, p in part.params if n not in layer_map.inert)
            if not selected:
                trainable: Any = False
            elif k and k > 0:
                trainable = self._later_label(k)
            elif n_sel == n_all:
                trainable = True
            else:
                trainable = f"{self.select_label} ({n_sel:,})"
            if not selected or lr is None:
                part_lr: Any = "-"
            elif isinstance(lr, Mapping):
                part_lr = lr.get(part.name, "-")
            else:
                part_lr = lr * self.lr_scale(part)
            rows.append({"part": part.name, "params": part.numel, "trainable": trainable, "lr": part_lr})
        return rows

    def _later_label(self, stage: int) -> str:
        return f"stage {stage}"

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "layer_map")
        return f"{type(self).__name__}({keys})"
