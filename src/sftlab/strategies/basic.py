"""The static recipes: what trains is fixed at setup (full, discriminative, head only, partial,
BitFit)."""

from __future__ import annotations

from sftlab.errors import ConfigError, checked
from sftlab.layers import BLOCK, EMBEDDINGS, HEAD, POOLER, LayerMap, Part
from sftlab.strategies.base import Named, Strategy


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

    def __init__(self, lr_decay: float = 0.95, name: str | None = None, lr: float | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name, lr=lr)


class HeadOnly(Strategy):
    """Linear probe: only the head (and pooler) train; the pretrained body is a fixed feature
    extractor.

    Cheapest in memory and time (no backward through the body, optimizer state for a few
    thousand weights) and immune to forgetting, but usually well below full fine-tuning: the
    features were not trained for the task. A diagnostic as much as a recipe (how linearly
    separable the task is in the pretrained representation). ``train_pooler`` trains the
    pooler too: it feeds the head, and in DistilBERT, XLNet and DeBERTa it is newly initialized.
    ``cache_frozen`` runs the frozen body once per example (``sftlab.perf.frozen_cache``).
    """

    name = "head_only"

    def __init__(self, train_pooler: bool = True, lr_decay: float = 1.0, name: str | None = None,
                 lr: float | None = None, cache_frozen: bool = False) -> None:
        super().__init__(lr_decay=lr_decay, name=name, lr=lr)
        self.train_pooler = bool(train_pooler)
        self.cache_frozen = bool(cache_frozen)

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
    ``cache_frozen`` runs the frozen embeddings + bottom blocks once per example
    (``sftlab.perf.frozen_cache``; nothing to cache with ``train_embeddings: true``).
    """

    name = "partial"

    def __init__(self, trainable_layers: int = 2, train_embeddings: bool = False,
                 lr_decay: float = 1.0, name: str | None = None, lr: float | None = None,
                 cache_frozen: bool = False) -> None:
        super().__init__(lr_decay=lr_decay, name=name, lr=lr)
        self.cache_frozen = bool(cache_frozen)
        # the range depends on the model: checked in validate, once the blocks are counted
        self.trainable_layers = checked("strategy.trainable_layers", trainable_layers, int)
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

    def __init__(self, train_pooler: bool = True, lr_decay: float = 1.0, name: str | None = None, lr: float | None = None) -> None:
        super().__init__(lr_decay=lr_decay, name=name, lr=lr)
        self.train_pooler = bool(train_pooler)

    def select(self, part: Part, layer_map: LayerMap) -> Named:
        if part.kind == HEAD or (part.kind == POOLER and self.train_pooler):
            return list(part.params)
        return [(n, p) for n, p in part.params if n.rsplit(".", 1)[-1].endswith("bias")]
