"""Fine-tuning strategies: which parts of the model train, at which learning rate, and when.

One small class per recipe, each instantiated by Hydra from ``conf/strategy/<name>.yaml``.
They all speak about the parts of :mod:`sftlab.layers` (embeddings, ``block.i``, pooler, head),
so one class serves every architecture.

The LightningModule calls, in this order:

- ``setup(model) -> model`` once, in its ``__init__``, before the Trainer (and DDP) exist: maps
  the layers, sets ``requires_grad`` for what starts frozen, may wrap the model (LoRA);
- ``param_groups(model, lr)`` in ``configure_optimizers``: one group per part that ever trains,
  ``{"name": "block.5", "params": [(qualified name, param), ...], "lr": float}``. Parts that
  never train are left out (no optimizer state); ``sftlab.optim`` splits each group into
  decay / no-decay groups and keeps its name and LR;
- ``callbacks()`` for the Trainer (gradual unfreezing);
- ``describe(model, lr)`` for the parts table at fit start;
- ``export_model(model)`` for ``save_pretrained`` (LoRA merges its adapters).

Learning rates: every strategy takes ``lr_decay`` (layer-wise LR decay). A part at depth ``d``
from the top trains at ``lr * lr_decay ** d``: head and pooler ``d = 0`` (``lr``), the top block
``d = 1``, ..., the bottom block ``d = L``, the embeddings ``d = L + 1`` (the lowest rate). It
is 1.0 (off) everywhere except ``discriminative``, so ``strategy=gradual strategy.lr_decay=0.9``
composes ULMFiT's two ideas and a sweep can vary ``strategy.lr_decay`` under any strategy.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl

from sftlab.errors import ConfigError
from sftlab.layers import BLOCK, EMBEDDINGS, HEAD, POOLER, LayerMap, Part, build_layer_map, unwrap

log = logging.getLogger(__name__)

Named = list[tuple[str, Any]]


def trainable_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters counted once."""
    trainable = total = 0
    for _, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _number(key: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hint: str = "") -> Any:
    """``value`` as ``kind``, within [lo, hi] (or (lo, hi]), else a one-sentence ConfigError."""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        out = kind(value)
        if kind is int and out != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"strategy.{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}.") from None
    bad = not math.isfinite(out) or (lo is not None and (out <= lo if lo_open else out < lo)) or (
        hi is not None and out > hi)
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        rng = " and ".join(s for s in (lo_s, hi_s) if s)
        raise ConfigError(f"strategy.{key} must be {rng}, got {value!r}{'; ' + hint if hint else ''}.")
    return out


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
    """

    name = "strategy"
    #: what ``describe`` calls a partial selection ("biases", "adapters")
    select_label = "selected"

    def __init__(self, lr_decay: float = 1.0, name: str | None = None) -> None:
        self.lr_decay = _number("lr_decay", lr_decay, float, 0.0, 1.0, lo_open=True,
                                hint="1.0 is off, 0.95 is Sun et al.'s choice")
        if name:
            self.name = str(name)
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
        """Map the layers and freeze what does not train from the first step; return the model."""
        layer_map = build_layer_map(model)
        self.validate(layer_map)
        for part in layer_map:
            now = {id(p) for _, p in self.selected(part, layer_map)} if self.stage(part, layer_map) == 0 else set()
            for _, p in part.params:
                p.requires_grad_(id(p) in now)
        self.layer_map = layer_map
        trainable, total = trainable_params(model)
        log.info("strategy %s: %s of %s parameters train from the start (%.2f%%)", self.name,
                 f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
        return model

    def part_lr(self, part: Part, lr: float) -> float:
        """``lr * lr_decay ** depth`` (head/pooler depth 0, top block 1, embeddings L + 1)."""
        return lr * self.lr_decay ** part.depth

    def param_groups(self, model, lr: float) -> list[dict[str, Any]]:
        """One group per part that ever trains: ``{"name", "params": [(name, p)], "lr"}``."""
        layer_map = build_layer_map(model)
        groups = []
        for part in layer_map:
            if self.stage(part, layer_map) is None:
                continue
            params = self.selected(part, layer_map)
            if params:
                groups.append({"name": part.name, "params": params, "lr": self.part_lr(part, lr)})
        return groups

    def callbacks(self) -> list[pl.Callback]:
        return []

    def export_model(self, model):
        """The model to ``save_pretrained``: the model itself unless a strategy wrapped it."""
        return model

    def describe(self, model, lr: float | None = None) -> list[dict[str, Any]]:
        """One row per part: part, params, trainable (True/False/"biases (n)"/"from step N"), lr."""
        layer_map = build_layer_map(model)
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
            rows.append({
                "part": part.name,
                "params": part.numel,
                "trainable": trainable,
                "lr": self.part_lr(part, lr) if selected and lr is not None else "-",
            })
        return rows

    def _later_label(self, stage: int) -> str:
        return f"stage {stage}"

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "layer_map")
        return f"{type(self).__name__}({keys})"


# ---------------------------------------------------------------------- full / discriminative
class Full(Strategy):
    """Full fine-tuning: every parameter trains, at one LR (``lr_decay: 1.0``).

    The baseline of Devlin et al. (2019) and the strongest recipe when there is enough labelled
    data; it costs optimizer state for every weight and can forget pretraining on small data.
    """

    name = "full"


class Discriminative(Full):
    """Discriminative (layer-wise decayed) learning rates: lower layers move less.

    Lower layers hold general features that fine-tuning should barely change, upper layers
    task-specific ones (Howard & Ruder 2018, "ULMFiT"; Sun et al. 2019, "How to Fine-Tune BERT
    for Text Classification?"). Part at depth ``d`` from the top trains at
    ``lr * lr_decay ** d``: head and pooler at ``lr``, top block at ``lr * lr_decay``, bottom
    block at ``lr * lr_decay ** L``, embeddings at ``lr * lr_decay ** (L + 1)``. Sun et al.
    found 0.95 best for BERT-base (``discriminative``); ULMFiT's 1/2.6 = 0.3846 per layer group
    (``discriminative_ulmfit``) is far steeper, made for 3-layer LSTMs: on 12 blocks it leaves
    the bottom blocks nearly frozen.
    """

    name = "discriminative"

    def __init__(self, lr_decay: float = 0.95, name: str | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name)


# ---------------------------------------------------------------------- head only / partial
class HeadOnly(Strategy):
    """Linear probe: only the head (and pooler) train; the pretrained body is a fixed feature
    extractor.

    Cheapest in memory and time (no backward through the body, optimizer state for a few
    thousand weights) and immune to forgetting, but usually well below full fine-tuning: the
    features were not trained for the task. A diagnostic as much as a recipe (how linearly
    separable the task is in the pretrained representation). ``train_pooler`` trains the
    pooler too: it feeds the head, and in DistilBERT, XLNet and DeBERTa it is newly initialized.
    """

    name = "head_only"

    def __init__(self, train_pooler: bool = True, lr_decay: float = 1.0, name: str | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name)
        self.train_pooler = bool(train_pooler)

    def stage(self, part: Part, layer_map: LayerMap) -> int | None:
        if part.kind == HEAD or (part.kind == POOLER and self.train_pooler):
            return 0
        return None


class Partial(Strategy):
    """Train the top ``trainable_layers`` blocks (+ pooler + head); freeze the rest.

    The upper blocks are the most task-specific and change most under full fine-tuning, while
    the lower ones change little (Sun et al. 2019; Lee et al. 2019, "What Would Elsa Do?"
    found the top quarter of BERT recovers most of full fine-tuning). Freezing the bottom saves
    backward compute below the lowest trained block and its optimizer state, and protects the
    general features on small data. Embeddings stay frozen unless ``train_embeddings: true``.
    """

    name = "partial"

    def __init__(self, trainable_layers: int = 2, train_embeddings: bool = False,
                 lr_decay: float = 1.0, name: str | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name)
        try:
            self.trainable_layers = int(trainable_layers)
        except (TypeError, ValueError):
            raise ConfigError(f"strategy.trainable_layers must be an integer, got {trainable_layers!r}.") from None
        self.train_embeddings = bool(train_embeddings)

    def validate(self, layer_map: LayerMap) -> None:
        n = layer_map.num_blocks
        if not 0 <= self.trainable_layers <= n:
            raise ConfigError(
                f"strategy.trainable_layers={self.trainable_layers} but {layer_map.model_type} has "
                f"{n} blocks; choose 0..{n}."
            )

    def stage(self, part: Part, layer_map: LayerMap) -> int | None:
        if part.kind in (HEAD, POOLER):
            return 0
        if part.kind == BLOCK:
            return 0 if part.depth <= self.trainable_layers else None
        if part.kind == EMBEDDINGS:
            return 0 if self.train_embeddings else None
        return None


# ---------------------------------------------------------------------- BitFit
class BitFit(Strategy):
    """BitFit: train only the bias terms of the body, plus the head (Ben Zaken et al. 2022).

    About 0.1% of BERT's weights; competitive with full fine-tuning on small and medium data,
    with a tiny per-task diff to store. Bias terms are every parameter whose name ends in
    ``bias`` (LayerNorm biases and XLNet's ``r_w_bias``/``r_r_bias``/``r_s_bias`` included).
    The pooler trains fully by default (``train_pooler: true``): in DistilBERT, XLNet and
    DeBERTa it is newly initialized, and only its bias would leave a random projection in front
    of the head; ``train_pooler: false`` is the paper's strict variant (pooler bias only).
    """

    name = "bitfit"
    select_label = "biases"

    def __init__(self, train_pooler: bool = True, lr_decay: float = 1.0, name: str | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name)
        self.train_pooler = bool(train_pooler)

    def select(self, part: Part, layer_map: LayerMap) -> Named:
        if part.kind == HEAD or (part.kind == POOLER and self.train_pooler):
            return list(part.params)
        return [(n, p) for n, p in part.params if n.rsplit(".", 1)[-1].endswith("bias")]


# ---------------------------------------------------------------------- LoRA
#: model_type -> LoRA target module names (the attention query/value projections of Hu et al.,
#: where each architecture has them as nn.Linear / Conv1D).
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],  # fused q/k/v Conv1D
    "deberta": ["in_proj"],  # fused q/k/v Linear
    "deberta-v2": ["query_proj", "value_proj"],
    # XLNet's attention keeps q/k/v/o as raw nn.Parameter tensors (einsum), which LoRA cannot
    # wrap; its feed-forward Linears are the adaptable matrices (He et al. 2022 found FFN
    # adapters as effective as attention ones).
    "xlnet": ["layer_1", "layer_2"],
}


class Lora(Strategy):
    """LoRA: freeze the body, learn a low-rank update ``B @ A`` (rank ``r``) of chosen weight
    matrices, and train the head fully (Hu et al. 2022).

    Trains ~0.5% of the weights with quality close to full fine-tuning, and the adapters can be
    merged into the weights afterwards, so inference costs nothing extra: ``export_model``
    returns a plain transformers model with ``W + (alpha / r) B A`` folded in, loadable without
    peft. The update scale is ``alpha / r``; LoRA usually wants a larger LR than full
    fine-tuning (1e-4 .. 1e-3). ``target_modules: null`` picks the attention query/value
    projections of the architecture (``LORA_TARGETS``).

    The head (and, with ``train_pooler``, the pooler) train by plain ``requires_grad`` rather
    than peft's ``modules_to_save``, which would keep a second copy of them.
    """

    name = "lora"
    select_label = "adapters"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1,
                 target_modules: Sequence[str] | None = None, train_pooler: bool = True,
                 lr_decay: float = 1.0, name: str | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name)
        self.r = _number("r", r, int, 1)
        self.alpha = _number("alpha", alpha, float, 0.0, lo_open=True)
        self.dropout = _number("dropout", dropout, float, 0.0, 1.0)
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        self.target_modules = [str(t) for t in target_modules] if target_modules else None
        self.train_pooler = bool(train_pooler)

    def targets(self, model_type: str) -> list[str]:
        if self.target_modules:
            return list(self.target_modules)
        if model_type not in LORA_TARGETS:
            raise ConfigError(
                f"LoRA has no default target modules for model_type {model_type!r}; set "
                "strategy.target_modules (names of nn.Linear modules in its blocks, e.g. [query,value])."
            )
        return list(LORA_TARGETS[model_type])

    def setup(self, model):
        from peft import LoraConfig, get_peft_model

        layer_map = build_layer_map(model)  # fail early, before touching the model
        targets = self.targets(layer_map.model_type)
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
            bias="none", fan_in_fan_out=layer_map.model_type == "gpt2",  # GPT-2's Conv1D is (in, out)
        )
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as err:
            raise ConfigError(
                f"strategy.target_modules={targets} does not fit {layer_map.model_type} ({err}); "
                "name nn.Linear modules of its blocks."
            ) from None
        return super().setup(wrapped)

    def select(self, part: Part, layer_map: LayerMap) -> Named:
        if part.kind == HEAD or (part.kind == POOLER and self.train_pooler):
            return list(part.params)
        return [(n, p) for n, p in part.params if ".lora_" in n]

    def export_model(self, model):
        """A plain transformers model with the adapters merged (a copy; ``model`` stays usable)."""
        if unwrap(model) is model:
            return model
        merged = copy.deepcopy(model).merge_and_unload()
        for p in merged.parameters():
            p.requires_grad_(True)
        return merged


# ---------------------------------------------------------------------- gradual unfreezing
class Gradual(Strategy):
    """ULMFiT gradual unfreezing (Howard & Ruder 2018): start with the head, then unfreeze the
    blocks one group at a time from the top down, the embeddings last.

    Training the randomly initialized head first keeps its large early gradients from wrecking
    the pretrained features ("catastrophic forgetting"); each deeper group joins once the layers
    above it have adapted. Stage 0 trains head + pooler (+ the top ``initial_layers`` blocks);
    stage ``k`` adds the next ``layers_per_step`` blocks downward; after the bottom block,
    the embeddings (``unfreeze_embeddings: true``). Stage ``k`` starts at optimizer step
    ``k * interval``, where ``interval = round(unfreeze_every * steps_per_epoch)`` (at least 1;
    ``steps_per_epoch = ceil(num_training_batches / accumulate_grad_batches)``), or
    ``unfreeze_every_steps`` when set. ULMFiT unfroze one group per epoch; the default here is a
    quarter epoch, so the default 3 epochs reach full fine-tuning of a 6-block MiniLM.
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

    def __init__(self, initial_layers: int = 0, unfreeze_every: float = 0.25, layers_per_step: int = 1,
                 unfreeze_embeddings: bool = True, unfreeze_every_steps: int | None = None,
                 lr_decay: float = 1.0, name: str | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name)
        self.initial_layers = _number("initial_layers", initial_layers, int, 0)
        self.unfreeze_every = _number("unfreeze_every", unfreeze_every, float, 0.0, lo_open=True,
                                      hint="it is in epochs, fractions allowed (0.5)")
        self.layers_per_step = _number("layers_per_step", layers_per_step, int, 1)
        self.unfreeze_embeddings = bool(unfreeze_embeddings)
        self.unfreeze_every_steps = (None if unfreeze_every_steps is None
                                     else _number("unfreeze_every_steps", unfreeze_every_steps, int, 1))
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
        layer_map = layer_map or self._require_map()
        stages = [self.stage(p, layer_map) for p in layer_map]
        return max(s for s in stages if s is not None)

    # -------------------------------------------------------------- schedule
    def interval(self, steps_per_epoch: int | None = None) -> int:
        """Optimizer steps between two unfreezing stages."""
        if self.unfreeze_every_steps is not None:
            return self.unfreeze_every_steps
        spe = steps_per_epoch if steps_per_epoch is not None else self.steps_per_epoch
        if spe is None:
            raise RuntimeError("the unfreezing interval is known once the trainer knows its epoch length "
                               "(pass steps_per_epoch, or set unfreeze_every_steps)")
        return max(1, round(self.unfreeze_every * spe))

    def stage_step(self, stage: int, steps_per_epoch: int | None = None) -> int:
        """The global step (optimizer steps done) at which stage ``stage`` starts training."""
        return 0 if stage == 0 else stage * self.interval(steps_per_epoch)

    def unfreeze_steps(self, steps_per_epoch: int | None = None,
                       layer_map: LayerMap | None = None) -> dict[str, int]:
        """Part name -> the first global step it trains (0: from the start); never-trained parts
        are absent. A part's weights first change in the optimizer step taken at that step."""
        layer_map = layer_map or self._require_map()
        out = {}
        for part in layer_map:
            k = self.stage(part, layer_map)
            if k is not None:
                out[part.name] = self.stage_step(k, steps_per_epoch)
        return out

    def _require_map(self) -> LayerMap:
        if self.layer_map is None:
            raise RuntimeError("call setup(model) first")
        return self.layer_map

    def _later_label(self, stage: int) -> str:
        if self.unfreeze_every_steps is None and self.steps_per_epoch is None:
            return f"stage {stage}"
        return f"from step {self.stage_step(stage)}"

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
        layer_map = build_layer_map(self._model(pl_module))
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
        self._resolve(pl_module)  # parameters after the strategy moved the model to its device
        self._unfrozen = set()
        self._apply(trainer.global_step)
        log.info("gradual unfreezing every %d steps: %s", s.interval(),
                 ", ".join(f"{name}@{s.stage_step(k)}" for name, _, k, _ in self._later) or "nothing to unfreeze")

    def steps_per_epoch(self, trainer: pl.Trainer) -> int:
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

    def unfrozen_parts(self) -> Iterable[str]:
        return sorted(self._unfrozen)
