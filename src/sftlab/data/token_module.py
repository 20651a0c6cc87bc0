"""``TokenClassificationDataModule``: tagged sentences in, sub-word batches with aligned tags out.

The text-classification data module with its steps swapped (see its docstring): the reader is
``tags.read_tagged`` followed by the tag-scheme check (``tags.to_iob2``), labels are tags
(``tags.map_tags``: the set from train), validation is carved at random, and the encoder is
the task's aligner (``sftlab.tasks.token_classification.encode_words``). Loading, the cache
(keyed with the task and its options), length-grouped batches, resume and DDP sharding are the
shared ones.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sftlab.data.module import TextClassificationDataModule
from sftlab.data.tags import (
    WHERE,
    carve_sentences,
    check_scheme,
    clean_sentences,
    map_tags,
    read_tagged,
    to_iob2,
)
from sftlab.errors import ConfigError, checked

log = logging.getLogger(__name__)

#: how the training loss weighs tokens (``data.token_loss``)
TOKEN_LOSSES = ("token_mean", "batch_mean")


class TokenClassificationDataModule(TextClassificationDataModule):
    """Sentences with one tag per word (JSONL/JSON/Parquet lists, or CoNLL column files).

    ``tokens_field`` / ``tags_field`` name the list fields, ``tag_column`` the CoNLL column of
    the tag (-1: the last), ``tag_scheme`` what the tags are (``auto``, ``iob2``, ``iob1``,
    ``bioes``: all end as IOB2), ``label_all_subwords`` whether the later sub-words of a word
    carry its tag in the loss, ``token_loss`` how the training loss weighs tokens
    (``token_mean``: every labelled token alike; ``batch_mean``: the mean of each batch, as
    the HF Trainer does; see :mod:`sftlab.tasks.token_classification`).
    """

    carve = staticmethod(carve_sentences)
    map_labels = staticmethod(map_tags)
    clean = staticmethod(clean_sentences)
    unserved = ("length", "truncated_words")

    def __init__(self, tokenizer: Any, tokens_field: str = "tokens", tags_field: str = "ner_tags",
                 tag_column: int = -1, tag_scheme: str = "auto", label_all_subwords: bool = False,
                 token_loss: str = "token_mean", **kwargs: Any) -> None:
        if kwargs.get("hub_name"):
            raise ConfigError("Token classification reads local files (JSONL/JSON/Parquet or CoNLL "
                              "columns); set data.train_file etc. instead of data.hub_name.")
        if kwargs.get("text_pair_field"):
            raise ConfigError("data.text_pair_field has no meaning for token classification; remove it.")
        super().__init__(tokenizer, text_field=tokens_field, label_field=tags_field, **kwargs)
        self.tag_column = checked("data.tag_column", tag_column, int)
        self.tag_scheme = check_scheme(tag_scheme)
        self.label_all_subwords = bool(label_all_subwords)
        if token_loss not in TOKEN_LOSSES:
            raise ConfigError(f"data.token_loss={token_loss!r} is not one of {', '.join(TOKEN_LOSSES)}; "
                              f"token_mean weighs every labelled token alike, batch_mean is HF's per-batch mean.")
        self.token_loss = token_loss
        # the task and every option that changes the tokenized result enter the cache key
        self.task = (f"token_classification:scheme={tag_scheme}:column={self.tag_column}"
                     f":all_subwords={self.label_all_subwords}")

    def read_file(self, path: str, split: str):
        df = read_tagged(path, split, self.text_field, self.label_field, self.tag_column,
                         self._given_label_names)
        tags = to_iob2(df[self.label_field].tolist(), df[WHERE].tolist(), self.tag_scheme, split)
        return df.assign(**{self.label_field: tags})

    def token_loss_divisor(self) -> float | None:
        """The constant that ``token_mean`` divides a batch's summed token loss by: the mean
        number of labelled tokens (label != -100) per training example times the batch size
        (per device: under DDP the gradient mean over ranks then divides by the global batch's
        expected count). None for ``batch_mean``, or when there is no train split."""
        if self.token_loss == "batch_mean":
            return None
        if "train" not in self.datasets:
            self.setup()
        if "train" not in self.datasets:
            return None
        rows = self.datasets["train"].with_format(None)["labels"]
        labelled = sum(sum(1 for t in row if t != -100) for row in rows)
        if not rows or not labelled:
            return None
        return labelled / len(rows) * self.batch_size

    def encode(self, df, tokenizer, columns, max_length: int):
        from sftlab.tasks.token_classification import encode_words

        return encode_words(df, tokenizer, columns, max_length,
                            label_all_subwords=self.label_all_subwords, label_names=self.label_names)

    def _load_or_tokenize(self, split: str):
        """The split (from the cache or not), and one warning when max_length cut sentences."""
        ds = super()._load_or_tokenize(split)
        cut = np.asarray(ds["truncated_words"])
        if cut.any() and self._world()[1] == 0:
            log.warning(
                "%d of %d %s sentences are longer than model.max_length=%d tokens and were "
                "truncated (%d words cut in all; they are neither trained on nor scored); raise "
                "model.max_length to keep them.", int((cut > 0).sum()), len(cut), split,
                self.max_length, int(cut.sum()))
        return ds
