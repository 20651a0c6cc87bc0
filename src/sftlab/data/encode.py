"""Encoding: a validated, label-mapped DataFrame into a tokenized ``datasets.Dataset``.

This is the step a second task replaces: token classification brings its own aligner (labels
per word to labels per sub-word token) with the same signature, and the data module calls
whichever it is given (``TextClassificationDataModule.encode``).
"""

from __future__ import annotations

from typing import Any

from sftlab.data.read import Columns


def encode_texts(df, tokenizer: Any, columns: Columns, max_length: int):
    """Tokenize the text column(s) of ``df``, truncated to ``max_length``, not padded.

    The result has the tokenizer's columns, ``labels`` (int ids), ``idx`` (the row number, so
    that predictions can be written back in file order) and ``length`` (tokens per row, which
    the length-grouped sampler reads; the loader does not serve it).
    """
    from datasets import Dataset

    cols = columns.texts
    ds = Dataset.from_dict({
        **{c: df[c].tolist() for c in cols},
        "labels": df[columns.label].astype(int).tolist(),
        "idx": list(range(len(df))),
    })
    text, pair = columns.text, columns.pair

    def encode(batch):
        enc = tokenizer(batch[text], batch[pair] if pair else None, truncation=True,
                        max_length=max_length)
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    return ds.map(encode, batched=True, batch_size=1000, remove_columns=cols,
                  desc="tokenizing", load_from_cache_file=False)
