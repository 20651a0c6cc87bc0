"""The layer map: a model seen as ordered parts, bottom to top.

Every fine-tuning strategy speaks about the same few things: "the embeddings", "the top k
blocks", "the head". Transformers names them differently per architecture (``bert.encoder.layer``,
``transformer.h``, ``distilbert.transformer.layer``, ``logits_proj``, ``score`` ...), so this
module turns a loaded ``AutoModelForSequenceClassification`` into one ordered list of
:class:`Part` objects that strategies can rely on::

    embeddings, block.0, ..., block.{L-1}, [pooler], head

Each part has a ``depth`` counted from the top, the number that discriminative learning rates
use: head and pooler 0, the top block 1, ..., the bottom block ``L``, the embeddings ``L + 1``.

How a model is split (``build_layer_map``):

- a per-``model_type`` :class:`Rule` names the ``nn.ModuleList`` of blocks (relative to the base
  model, e.g. ``encoder.layer``), the pooler modules, and the shared parameters that need a
  deliberate home; for a model type without a rule, the largest ``nn.ModuleList`` inside the
  base model is taken as the blocks (a fallback, logged);
- everything outside the base model (``classifier``, ``score``, ``logits_proj``, RoBERTa's
  ``classifier.dense``) is the **head**; poolers that feed the head (BERT's ``pooler``,
  DistilBERT's ``pre_classifier``, XLNet's ``sequence_summary``, DeBERTa's ``pooler``) are the
  **pooler**;
- any other parameter of the base model is placed by where it is registered: before the blocks
  it is **embeddings** (word/position/type tables, their LayerNorm, ELECTRA's
  ``embeddings_project``, XLNet's ``mask_emb``); after the blocks it belongs to the **top block**
  (the final norm of pre-LN models, GPT-2's ``ln_f``: it normalizes the top block's output, so it
  trains, freezes and gets its LR with the top block; a linear probe keeps it frozen).
- parameters that a classification forward never uses (XLNet's pretraining ``mask_emb``) keep
  their part but are listed in ``LayerMap.inert``, and no strategy trains them: a parameter that
  requires grad but never gets one breaks DDP's reducer.
- shared parameters used by *every* block sit with the embeddings: DeBERTa's relative position
  table ``encoder.rel_embeddings`` and its ``encoder.LayerNorm`` (they are position embeddings,
  and get the lowest LR); DeBERTa's ``encoder.conv`` runs once, on the output of the first
  block, so it belongs to ``block.0``.

Every parameter belongs to exactly one part. Tied parameters (one ``nn.Parameter`` under two
names) are listed once, under the first name ``named_parameters()`` yields, as torch does.
PEFT-wrapped models (LoRA) are mapped through their base model, with names relative to the
wrapper, so adapter weights (``lora_A``/``lora_B``) land in the block they adapt.

A model that cannot be mapped raises :class:`~sftlab.errors.ConfigError` naming the model type
and the rule to add here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sftlab.errors import ConfigError
from sftlab.module_tree import (
    base_prefix,
    get_module,
    largest_module_list,
    model_type_of,
    outer_path,
    torch_nn,
    under,
    unwrap,
)

log = logging.getLogger(__name__)

# Part kinds, bottom to top.
EMBEDDINGS, BLOCK, POOLER, HEAD = "embeddings", "block", "pooler", "head"


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters counted once (the one counter)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@dataclass(frozen=True)
class Rule:
    """Where the parts of one architecture live.

    ``blocks`` and ``base_pooler`` are relative to the base model (``model.base_model``);
    ``head_pooler``, ``to_embeddings``, ``to_bottom_block`` and ``inert`` are relative to the
    task model (the ``...ForSequenceClassification``), with ``{base}`` standing for the base
    model's attribute name, and may name modules or single parameters. Paths that a given
    checkpoint lacks (e.g. ``encoder.conv`` when ``conv_kernel_size=0``) are ignored.
    """

    blocks: str
    base_pooler: tuple[str, ...] = ("pooler",)
    head_pooler: tuple[str, ...] = ()
    to_embeddings: tuple[str, ...] = ()
    to_bottom_block: tuple[str, ...] = ()
    #: parameters a sequence-classification forward never uses (they keep their part, but no
    #: strategy trains them: a parameter without gradient would break DDP's reducer)
    inert: tuple[str, ...] = ()


_BERT_LIKE = Rule(blocks="encoder.layer")
_DEBERTA = Rule(
    blocks="encoder.layer",
    head_pooler=("pooler",),
    to_embeddings=("{base}.encoder.rel_embeddings", "{base}.encoder.LayerNorm"),
    to_bottom_block=("{base}.encoder.conv",),
)

#: model_type -> Rule. MiniLM checkpoints are ``bert``. Add a line here for a new architecture.
RULES: dict[str, Rule] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": Rule(blocks="transformer.layer", head_pooler=("pre_classifier",)),
    # mask_emb is XLNet's pretraining query-stream embedding: unused when classifying
    "xlnet": Rule(blocks="layer", head_pooler=("sequence_summary",), to_embeddings=("{base}.mask_emb",),
                  inert=("{base}.mask_emb",)),
    "gpt2": Rule(blocks="h"),
    "deberta": _DEBERTA,
    "deberta-v2": _DEBERTA,
}


@dataclass
class Part:
    """One trainable unit of a model: the embeddings, one block, the pooler or the head.

    ``params`` are ``(qualified name, parameter)`` pairs, names relative to the model given to
    :func:`build_layer_map`. ``depth`` counts from the top (head/pooler 0, top block 1, ...,
    embeddings ``L + 1``); ``index`` is the block index counted from the bottom (blocks only).
    """

    name: str
    kind: str
    depth: int
    index: int | None = None
    params: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def __repr__(self) -> str:
        return f"Part({self.name!r}, kind={self.kind!r}, depth={self.depth}, params={len(self.params)})"


@dataclass
class LayerMap:
    """A model's parts in order: embeddings, block.0 .. block.{L-1}, [pooler], head."""

    model_type: str
    parts: list[Part]
    blocks_path: str
    #: qualified names of parameters the classification forward never uses (see Rule.inert)
    inert: frozenset[str] = frozenset()

    def __iter__(self) -> Iterator[Part]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, name: str) -> Part:
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(f"no part {name!r}; parts are {self.names}")

    def __contains__(self, name: object) -> bool:
        return any(part.name == name for part in self.parts)

    @property
    def names(self) -> list[str]:
        return [part.name for part in self.parts]

    @property
    def blocks(self) -> list[Part]:
        """The blocks, bottom (``block.0``) to top."""
        return [part for part in self.parts if part.kind == BLOCK]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def embeddings(self) -> Part | None:
        return next((p for p in self.parts if p.kind == EMBEDDINGS), None)

    @property
    def pooler(self) -> Part | None:
        return next((p for p in self.parts if p.kind == POOLER), None)

    @property
    def head(self) -> Part:
        return next(p for p in self.parts if p.kind == HEAD)

    def top_blocks(self, k: int) -> list[Part]:
        """The ``k`` top blocks, top first."""
        return list(reversed(self.blocks))[:k] if k > 0 else []

    def part_of(self, param_name: str) -> str:
        """The name of the part that holds a parameter (by qualified name)."""
        for part in self.parts:
            if any(n == param_name for n, _ in part.params):
                return part.name
        raise KeyError(param_name)

    def named_parameters(self) -> Iterator[tuple[str, Any]]:
        for part in self.parts:
            yield from part.params


# --------------------------------------------------------------------------- building
def _unmappable(model_type: str, why: str) -> ConfigError:
    return ConfigError(
        f"Cannot map the layers of model_type {model_type!r} ({why}); "
        f"add a rule for model_type {model_type!r} in src/sftlab/layers.py."
    )


def build_layer_map(model) -> LayerMap:
    """Split ``model`` (a sequence classifier, possibly PEFT-wrapped) into ordered parts.

    Parameter names in the map are relative to ``model`` as given (so a PEFT model's names
    start with ``base_model.model.``), which is what ``model.named_parameters()`` yields.
    """
    inner = unwrap(model)
    model_type = model_type_of(model)
    # names relative to the model as given, by parameter identity
    outer_names = {id(p): n for n, p in model.named_parameters()}

    base = base_prefix(inner)
    if not base:
        raise _unmappable(model_type, f"{type(inner).__name__} has no base model separate from its head")
    rule = RULES.get(model_type)
    blocks_path = None
    if rule is not None:
        candidate = f"{base}.{rule.blocks}"
        if isinstance(get_module(inner, candidate), torch_nn().ModuleList):
            blocks_path = candidate
        else:
            log.warning("layer map: %s has no %s; falling back to its largest ModuleList", model_type, candidate)
    if blocks_path is None:
        blocks_path = largest_module_list(inner, base)
        if blocks_path is None:
            raise _unmappable(model_type, "no nn.ModuleList of blocks found in its base model")
        if rule is None:
            log.info("layer map: no rule for %s; taking %s as its blocks", model_type, blocks_path)
        rule = Rule(blocks=blocks_path[len(base) + 1:])

    fmt = {"base": base}
    poolers = [f"{base}.{p}" for p in rule.base_pooler] + [p.format(**fmt) for p in rule.head_pooler]
    to_emb = [p.format(**fmt) for p in rule.to_embeddings]
    to_bottom = [p.format(**fmt) for p in rule.to_bottom_block]
    inert_paths = [p.format(**fmt) for p in rule.inert]
    inert: set[str] = set()
    num_blocks = len(get_module(inner, blocks_path))
    if num_blocks == 0:
        raise _unmappable(model_type, f"its block list {blocks_path} is empty")

    emb: list[tuple[str, Any]] = []
    blocks: list[list[tuple[str, Any]]] = [[] for _ in range(num_blocks)]
    pooler: list[tuple[str, Any]] = []
    head: list[tuple[str, Any]] = []
    after_blocks: list[tuple[str, Any]] = []
    seen_blocks = False
    for name, param in inner.named_parameters():  # deduplicated: tied params once
        qual = outer_names.get(id(param), name)
        if any(under(name, p) for p in inert_paths):
            inert.add(qual)
        if under(name, blocks_path):
            idx = int(name[len(blocks_path) + 1:].split(".", 1)[0])
            blocks[idx].append((qual, param))
            seen_blocks = True
        elif any(under(name, p) for p in poolers):
            pooler.append((qual, param))
        elif any(under(name, p) for p in to_emb):
            emb.append((qual, param))
        elif any(under(name, p) for p in to_bottom):
            blocks[0].append((qual, param))
        elif under(name, base):
            (after_blocks if seen_blocks else emb).append((qual, param))
        else:
            head.append((qual, param))
    if not head:
        raise _unmappable(model_type, "no classification head outside its base model")
    blocks[-1].extend(after_blocks)

    parts: list[Part] = []
    if emb:
        parts.append(Part("embeddings", EMBEDDINGS, depth=num_blocks + 1, params=emb))
    for i, params in enumerate(blocks):
        parts.append(Part(f"block.{i}", BLOCK, depth=num_blocks - i, index=i, params=params))
    if pooler:
        parts.append(Part("pooler", POOLER, depth=0, params=pooler))
    parts.append(Part("head", HEAD, depth=0, params=head))
    return LayerMap(model_type=model_type, parts=parts, blocks_path=outer_path(model, inner, blocks_path),
                    inert=frozenset(inert))
