"""Load a checkpoint's tokenizer and model, with our one-sentence errors.

A hub id that cannot be reached, a folder that holds no checkpoint, a tokenizer without a pad
token, or a ``model.max_length`` beyond the model's position table each become one
:class:`~sftlab.errors.ConfigError` naming the key and the fix, instead of a transformers
traceback (or, for ``max_length``, an index error mid-epoch). transformers is imported inside
the functions, so importing this module stays light.
"""

from __future__ import annotations

import logging
from typing import Any

from sftlab.errors import ConfigError, checked

log = logging.getLogger(__name__)

# Config attribute names that hold dropout probabilities, per kind, across architectures
# (BERT/RoBERTa/DeBERTa/ELECTRA, DistilBERT, GPT-2, XLNet ...).
_HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "dropout", "resid_pdrop", "embd_pdrop", "summary_first_dropout")
_ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def load_tokenizer(
    name_or_path: str,
    *,
    pad_token_from_eos: bool = False,
    padding_side: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    split_into_words: bool = False,
    **_: Any,
):
    """The checkpoint's tokenizer, with a pad token for decoder models (GPT-2 has none).

    ``split_into_words`` (the task's inputs are words, NER): a byte-level BPE tokenizer
    (RoBERTa, GPT-2, BART ...) reads a word's leading space as part of its first piece, so
    words tokenized alone would get pieces the model never sees mid-sentence, nor the pipeline
    in raw text (transformers 4.x refuses ``is_split_into_words`` for them; 5.x goes on
    silently). Such a tokenizer is loaded with
    ``add_prefix_space=True``, the setting its class documents for this; ``save_pretrained``
    writes it into the export, so the pipeline tokenizes raw text the way training did.
    """
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    tok = _from_pretrained(name_or_path, kwargs)
    if split_into_words and needs_prefix_space(tok):
        spaced = _from_pretrained(name_or_path, {**kwargs, "add_prefix_space": True})
        if needs_prefix_space(spaced):  # a class that ignores the setting: say so, go on
            log.warning(
                "The tokenizer of %r is byte-level BPE but its class (%s) ignores "
                "add_prefix_space: each word is tokenized without its leading space, as at the "
                "start of a text, which may cost accuracy.", name_or_path, type(tok).__name__)
        else:
            tok = spaced
    if tok.pad_token is None:
        if pad_token_from_eos or tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise ConfigError(
                f"The tokenizer of {name_or_path!r} has no pad token and no EOS token to reuse; "
                "pick another checkpoint or add a pad token to it."
            )
    if padding_side:
        tok.padding_side = padding_side
    return tok


def _from_pretrained(name_or_path: str, kwargs: dict[str, Any]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(_load_error(name_or_path, err)) from None


def needs_prefix_space(tokenizer: Any) -> bool:
    """Whether a fast tokenizer's pre-tokenizer is byte-level BPE without a prefix space.

    Read from the backend itself (a ``ByteLevel`` step with ``add_prefix_space: false``, alone
    or in a ``Sequence``), not from the class: in transformers 5 every tokenizer has an
    ``add_prefix_space`` attribute, and WordPiece/SentencePiece ones mark word starts without it.
    """
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        state = json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None
    except (AttributeError, TypeError, ValueError):
        return False
    steps = state.get("pretokenizers", [state]) if isinstance(state, dict) else []
    return any(isinstance(s, dict) and s.get("type") == "ByteLevel" and not s.get("add_prefix_space")
               for s in steps)


def _load_error(name_or_path: str, err: Exception) -> str:
    import os

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    name = str(name_or_path)
    # a hub id is "name" or "org/name"; anything else that names a place is a local path
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name) \
            or (os.path.sep != "/" and os.path.sep in name):
        return (
            f"model.name_or_path={name_or_path!r} is not a model folder (no config.json/tokenizer "
            "there); point it at a save_pretrained folder or a hub id."
        )
    hint = "(the hub is unreachable while HF_HUB_OFFLINE=1)" if offline else "(check the id and your network)"
    return (
        f"Cannot load {name_or_path!r} from the Hugging Face hub {hint}; use a local folder or "
        "the embedded default model=minilm."
    )


def load_pretrained(
    name_or_path: str,
    *,
    num_labels: int,
    id2label: dict[int, str],
    hidden_dropout: float | None = None,
    attention_dropout: float | None = None,
    pad_token_id: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    auto_class: str = "AutoModelForSequenceClassification",
):
    """``auto_class`` (the task's head, sequence classification by default) with the data's
    labels and dropout overrides."""
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code,
            num_labels=num_labels, id2label=dict(id2label),
            label2id={v: k for k, v in id2label.items()},
        )
    except (OSError, ValueError) as err:
        raise ConfigError(_load_error(name_or_path, err)) from None
    for value, keys in ((hidden_dropout, _HIDDEN_DROPOUT_KEYS), (attention_dropout, _ATTENTION_DROPOUT_KEYS)):
        if value is not None:
            for key in keys:
                if hasattr(config, key):
                    setattr(config, key, float(value))
    if pad_token_id is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id
    # "Some weights ... newly initialized: classifier" is expected here: we add the head.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            name_or_path, config=config, revision=revision, trust_remote_code=trust_remote_code
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def check_max_length(model, max_length: int, name: str) -> None:
    """``max_length`` beyond the model's position table would index out of range mid-epoch."""
    cfg = model.config
    limit = None
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(cfg, key, None):
            limit = int(getattr(cfg, key))
            break
    if limit is not None and cfg.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # positions start after the padding index
    max_length = checked("model.max_length", max_length, int, positive=True)
    if limit is not None and max_length > limit and getattr(cfg, "position_embedding_type", "absolute") == "absolute":
        raise ConfigError(
            f"model.max_length={max_length} exceeds the {limit} positions of {name!r}; "
            f"set model.max_length <= {limit}."
        )
