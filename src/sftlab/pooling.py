"""Pooling: how a sequence of token states becomes the one vector the classification head reads.

``model.pooling`` is one of:

- ``auto`` (default): the architecture's own head, i.e. what stock
  ``AutoModelForSequenceClassification`` does, so the exported folder loads with stock
  transformers and ``pipeline`` and predicts exactly what the run predicted. That is BERT's
  ``pooler`` ([CLS] through a dense + tanh layer), the last non-pad token for GPT-style
  decoders and XLNet, and [CLS] through the head's own dense layer for RoBERTa, DistilBERT,
  DeBERTa and ELECTRA.
- ``pooler``, ``cls``, ``mean``, ``last``: the token states are pooled by us and the head's
  final linear layer reads the result (``classifier`` of BERT-style models, ``score`` of
  decoders). ``cls`` is the first token without BERT's pooler, ``mean`` the mask-weighted mean
  over real tokens, ``last`` the last real token (left or right padding).

Why ``auto`` does not follow a sentence-transformers checkpoint's own pooling: such a
checkpoint (all-MiniLM-L6-v2, the embedded default) declares ``mean`` in ``1_Pooling/config.json``,
and stock ``BertForSequenceClassification`` can only read [CLS] through the pooler: no set of
weights makes it compute a mean. A mean-pooled model therefore cannot be carried by the stock
export; ``auto`` keeps the exportable pooling and says (once, at load) what the checkpoint
declares. Choose ``model.pooling=mean`` to use it: the export then records ``sftlab_pooling``
in its ``config.json``, sftlab's predictor, ``predict.py``, ``serve.py`` and ``eval.py`` honour
it, and the model card warns that stock ``pipeline`` will predict differently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sftlab.errors import ConfigError

log = logging.getLogger(__name__)

POOLINGS = ("auto", "cls", "pooler", "mean", "last")
#: the key an export records a non-stock pooling under (a plain config attribute)
CONFIG_KEY = "sftlab_pooling"

# Heads that classify from the last real token (GPT-style decoders; XLNet's SequenceSummary "last").
_LAST_TOKEN_TYPES = ("gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3",
                     "gemma", "gemma2", "phi", "phi3", "opt", "bloom", "falcon", "xlnet")


def native_pooling(model) -> str:
    """What the architecture's stock sequence-classification head pools: pooler, last or cls."""
    from sftlab.module_tree import unwrap

    hf = unwrap(model)
    model_type = str(getattr(hf.config, "model_type", ""))
    if model_type in _LAST_TOKEN_TYPES:
        return "last"
    if getattr(hf.base_model, "pooler", None) is not None and _linear_head(hf) is not None:
        return "pooler"  # BERT: pooler(h[CLS]) -> dropout -> classifier
    return "cls"


def declared_pooling(name_or_path: str | None) -> str | None:
    """The pooling a sentence-transformers checkpoint says it was trained with (local folders).

    Read from ``modules.json`` → the ``Pooling`` module's ``config.json``; ``None`` when the
    folder is not a sentence-transformers checkpoint (or not a folder: hub ids are not fetched
    for this).
    """
    if not name_or_path:
        return None
    root = Path(str(name_or_path))
    try:
        modules = json.loads((root / "modules.json").read_text())
        path = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((root / path / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None
    for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                      ("pooling_mode_lasttoken", "last"), ("pooling_mode_max_tokens", "max"),
                      ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len")):
        if config.get(key):
            return name
    return None


def resolve_pooling(model, requested: str | None, name_or_path: str | None = None) -> str | None:
    """Check ``model.pooling`` against the model; ``None`` means the stock head runs as it is.

    A pooling that differs from the native one is recorded in ``model.config`` (so an export
    carries it) and BERT's pooler, which it bypasses, is removed: parameters without gradients
    would otherwise sit in the optimizer and break DDP's reducer.
    """
    from sftlab.module_tree import unwrap

    hf = unwrap(model)
    requested = str(requested or "auto")
    if requested == "auto":
        requested = str(getattr(hf.config, CONFIG_KEY, None) or "auto")  # an sftlab export
    if requested not in POOLINGS:
        raise ConfigError(f"model.pooling={requested!r} is not one of {', '.join(POOLINGS)}; pick one of them.")
    native = native_pooling(hf)
    if requested == "auto":
        declared = declared_pooling(name_or_path)
        if declared and declared != native:
            log.info("model.pooling=auto uses the stock head's %s pooling (exportable); the checkpoint "
                     "was trained with %s pooling: model.pooling=%s uses it (see README, Pooling).",
                     native, declared, declared)
        return None
    if requested == native:
        return None
    if _linear_head(hf) is None:
        raise ConfigError(
            f"model.pooling={requested} needs a head that is one linear layer (BERT-style or GPT-style "
            f"models); {hf.config.model_type} has its own pooling head: use model.pooling=auto."
        )
    if requested == "pooler":
        raise ConfigError(f"model.pooling=pooler: {hf.config.model_type} has no pooler; use auto, cls, mean or last.")
    if getattr(hf.base_model, "pooler", None) is not None:
        hf.base_model.pooler = None
    setattr(hf.config, CONFIG_KEY, requested)
    return requested


def _linear_head(hf) -> Any:
    """The head's final linear layer when the head is just that (plus dropout), else None."""
    import torch.nn as nn

    for name in ("classifier", "score"):
        head = getattr(hf, name, None)
        if isinstance(head, nn.Linear):
            return head
    return None


def pool(hidden, attention_mask, mode: str):
    """One vector per sequence from ``hidden`` (batch, tokens, dim): cls, mean or last real token."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if mode == "last":
        # the highest position holding a real token: right and left padding alike
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ConfigError(f"Unknown pooling {mode!r}; pick one of {', '.join(POOLINGS)}.")


def logits_of(model, inputs: dict[str, Any], mode: str | None):
    """The model's logits: the stock forward when ``mode`` is None, else :func:`pooled_logits`."""
    return model(**inputs).logits if mode is None else pooled_logits(model, inputs, mode)


def pooled_logits(model, inputs: dict[str, Any], mode: str):
    """Logits through our pooling and the head's linear layer (``mode`` from resolve_pooling)."""
    from sftlab.module_tree import unwrap

    hf = unwrap(model)
    out = hf.base_model(**inputs)
    vector = pool(out.last_hidden_state, inputs.get("attention_mask"), mode)
    dropout = getattr(hf, "dropout", None)
    if dropout is not None:
        vector = dropout(vector)
    return _linear_head(hf)(vector)
