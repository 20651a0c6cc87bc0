"""LoRA: low-rank adapters on chosen weight matrices (via peft), merged away at export."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from sftlab.errors import ConfigError, checked
from sftlab.layers import HEAD, POOLER, LayerMap, Part, build_layer_map
from sftlab.module_tree import model_type_of, unwrap
from sftlab.strategies.base import Named, Strategy

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
                 lr_decay: float = 1.0, name: str | None = None, lr: float | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name, lr=lr)
        self.r = checked("strategy.r", r, int, 1)
        self.alpha = checked("strategy.alpha", alpha, float, 0.0, lo_open=True)
        self.dropout = checked("strategy.dropout", dropout, float, 0.0, 1.0)
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
        """Wrap the model with adapters, then map and freeze the wrapper (the base class)."""
        from peft import LoraConfig, get_peft_model

        model_type = model_type_of(model)
        targets = self.targets(model_type)
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
            bias="none", fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D is (in, out)
        )
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as err:
            build_layer_map(model)  # a model that cannot be mapped at all says so first
            raise ConfigError(
                f"strategy.target_modules={targets} does not fit {model_type} ({err}); "
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
