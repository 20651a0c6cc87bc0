"""The last block computes only the position the head reads (a callback): same logits, less work.

Why: a sequence classifier whose head reads the first token (BERT's pooler, ``model.pooling=cls``,
the stock heads of RoBERTa and ELECTRA) uses one row of the last block's output, and that row
depends on the other tokens only through their keys and values in the block's attention. Every
other row of the block (its query, attention output projection and feed-forward network, in the
forward and the backward pass) is computed and thrown away. So the last block here computes
keys and values for every token and the rest for the first token only. For MiniLM (6 blocks)
that is about a seventh of the model's matmul work per step (README "Performance" has the
measurements); the HF Trainer computes all of it.

Exact: the first row's output is the same function of the same inputs (matmuls of one row
instead of all may round differently in the last bits: 1e-9 on the tiny test model's logits, 1e-8 on its gradients; ``tests/test_last_block.py`` bounds them at 1e-5).
Dropout draws fewer random numbers (the skipped rows need no masks), so a training run is not
bit-identical to one without the switch, as with any change of the random stream.

Where it applies (else the callback leaves the model alone and says why, once):

- a sequence-classification module (``head_rows == "sequence"``; token classification reads
  every row) whose head reads the first token (stock ``pooler``/``cls`` heads, or
  ``model.pooling=cls``; ``mean`` and ``last`` read other rows);
- blocks of the BERT family's layout (``attention.self.query/key/value``, ``attention.output``,
  ``intermediate``, ``output``: BERT/MiniLM, RoBERTa, XLM-R, ELECTRA, CamemBERT ...), encoder
  only, absolute positions, no feed-forward chunking;
- the last block runs live: when the frozen-prefix cache replaces it (``head_only``), the cache
  already skips all of it.

The swap is an instance attribute ``forward`` on the last block, removed in ``teardown``: the
``state_dict``, checkpoints and exports never see it, and code outside the Trainer (the
predictor, ``serve.py``) runs the stock model. ``last_hidden_state`` has one position while it
is on, which is all the head reads.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

#: the attribute a LightningModule gets while its last block is switched (read by train_mfu)
FLAG = "first_token_last_block"

_BLOCK_PARTS = (("attention", "self", "query"), ("attention", "self", "key"), ("attention", "self", "value"),
                ("attention", "output"), ("intermediate",), ("output",))


def _get(module: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def unsupported(block: torch.nn.Module) -> str | None:
    """Why ``block`` cannot run first-token-only (a sentence), or None when it can."""
    missing = [".".join(p) for p in _BLOCK_PARTS if _get(block, p) is None]
    if missing:
        return f"{type(block).__name__} is not a BERT-family block (no {', '.join(missing)})"
    attn = block.attention.self
    if getattr(block, "is_decoder", False) or getattr(block, "add_cross_attention", False):
        return f"{type(block).__name__} is a decoder block"
    if getattr(block, "chunk_size_feed_forward", 0):
        return "the feed-forward runs in chunks (config.chunk_size_feed_forward)"
    if getattr(attn, "position_embedding_type", "absolute") != "absolute":
        return f"the attention uses {attn.position_embedding_type} position embeddings"
    if not hasattr(attn, "attention_head_size") or getattr(attn, "config", None) is None:
        return f"{type(attn).__name__} has no attention_head_size/config"
    if "forward" in block.__dict__:
        return "the last block's forward is already swapped (the frozen-prefix cache runs it)"
    return None


def first_token_forward(block: torch.nn.Module):
    """A ``forward`` for a BERT-family ``block`` that returns only the first position's output.

    The same modules and the same attention backend as the block's own forward
    (``config._attn_implementation``), with one query row per sequence. A ``partial`` of a
    module-level function rather than a closure: ``copy.deepcopy`` of the model (LoRA's merged
    export copy) then binds the copy's forward to the copied block, and pickling works.
    """
    return functools.partial(_first_token_forward, block)


def _first_token_forward(block: torch.nn.Module, hidden_states: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = block.attention.self
    batch, length = hidden_states.shape[:2]
    size = attn.attention_head_size
    first = hidden_states[:, :1]
    query = attn.query(first).view(batch, 1, -1, size).transpose(1, 2)
    key = attn.key(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    value = attn.value(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] > 1:
        attention_mask = attention_mask[:, :, :1]  # the first query's row
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    context, _ = interface(attn, query, key, value, attention_mask,
                           dropout=attn.dropout.p if attn.training else 0.0, scaling=attn.scaling)
    context = context.reshape(batch, 1, -1)
    hidden = block.attention.output(context, first)  # dense, dropout, LayerNorm(+ the first row)
    return block.output(block.intermediate(hidden), hidden)


def reads_first_token(pl_module: Any) -> str | None:
    """Why the module's head reads more than the first token (a sentence), or None."""
    from sftlab.pooling import native_pooling

    if getattr(pl_module, "head_rows", None) != "sequence":
        return "the head reads every token"
    model = getattr(pl_module, "model", None)
    if model is None:
        return "no model"
    pooling = getattr(pl_module, "pooling", None) or native_pooling(model)
    if pooling not in ("cls", "pooler"):
        return f"the head reads the {pooling} pooling of all tokens"
    return None


def last_block(model: torch.nn.Module) -> torch.nn.Module | None:
    """The top block of the model's stack (from the layer map), or None."""
    from sftlab.layers import build_layer_map
    from sftlab.module_tree import get_module

    try:
        layer_map = build_layer_map(model)
        blocks = get_module(model, layer_map.blocks_path)
    except Exception:  # noqa: BLE001  (an unmappable model simply runs as it is)
        return None
    return blocks[-1] if len(blocks) else None


class LastBlockClsOnly(pl.Callback):
    """Switch the last block to :func:`first_token_forward` where it applies (module docstring).

    ``setup`` in every stage (validation and test compute the same logits faster too), after
    the frozen-prefix cache's ``setup`` (``conf/perf`` lists this one later), so a last block
    the cache replaced is left to it. ``teardown`` restores the class's forward.
    """

    def __init__(self) -> None:
        self.block: torch.nn.Module | None = None
        self.used = False  # switched in some stage of this trainer (metrics.json)
        self._said = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.block is not None:
            return
        why = reads_first_token(pl_module)
        block = last_block(pl_module.model) if why is None else None
        if why is None and block is None:
            why = "the model's blocks are not mapped (sftlab.layers)"
        if why is None:
            why = unsupported(block)
        if why is not None:
            if not self._said:
                log.info("last block for the first token only: off (%s)", why)
                self._said = True
            return
        block.forward = first_token_forward(block)
        self.block, self.used = block, True
        setattr(pl_module, FLAG, True)
        if not self._said:
            log.info("last block for the first token only: on (the head reads [CLS]; keys and values "
                     "for every token, the rest of the block for [CLS])")
            self._said = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.block is not None:
            self.block.__dict__.pop("forward", None)
            self.block = None
        setattr(pl_module, FLAG, False)

    def run_stats(self) -> dict[str, bool]:
        return {"last_block_cls_only": self.used}
