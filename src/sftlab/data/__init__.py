"""The data room: labelled text in, padded token batches out.

One module per step, each usable on its own:

- ``read``: a local CSV/TSV/JSON/JSONL/Parquet file (or a hub dataset) into pandas, validated
  (columns, rows, empty texts) before any expensive work; ``file_digest``.
- ``labels``: the label column mapped to ids, and the stratified validation carving.
- ``encode``: a validated frame into a tokenized ``datasets.Dataset``.
- ``cache``: the tokenize cache (``fingerprint``, ``load_or_tokenize``), published atomically.
- ``batching``: the length-grouped batch sampler, the resumable loader and ``collate``
  (no Lightning: the deploy side pads prediction batches with it).
- ``module``: ``TextClassificationDataModule``, the Lightning data module wiring them.
- ``tags``: token classification's readers (word lists with tags: JSONL/JSON/Parquet, CoNLL
  columns), the tag-scheme check (IOB2; IOB1/BIOES converted) and the tag set from train;
  ``token_module``: ``TokenClassificationDataModule``, the data module with those steps.

Every public name is importable from ``sftlab.data`` (``_target_:
sftlab.data.TextClassificationDataModule`` in ``conf/data``). Names load on first use
(PEP 562), so ``import sftlab.data.batching`` does not pull in Lightning and
``import sftlab.data`` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SPLITS": "read",
    "FORMATS": "read",
    "Columns": "read",
    "read_table": "read",
    "read_hub": "read",
    "file_digest": "read",
    "check_columns": "read",
    "clean_texts": "read",
    "map_labels": "labels",
    "carve_validation": "labels",
    "encode_texts": "encode",
    "fingerprint": "cache",
    "tokenizer_digest": "cache",
    "load_or_tokenize": "cache",
    "LengthGroupedBatchSampler": "batching",
    "ResumableDataLoader": "batching",
    "collate": "batching",
    "TextClassificationDataModule": "module",
    "read_tagged": "tags",
    "to_iob2": "tags",
    "map_tags": "tags",
    "TokenClassificationDataModule": "token_module",
}

__all__ = [
    "Columns",
    "FORMATS",
    "LengthGroupedBatchSampler",
    "ResumableDataLoader",
    "SPLITS",
    "TextClassificationDataModule",
    "TokenClassificationDataModule",
    "carve_validation",
    "check_columns",
    "clean_texts",
    "collate",
    "encode_texts",
    "file_digest",
    "fingerprint",
    "load_or_tokenize",
    "map_labels",
    "map_tags",
    "read_hub",
    "read_table",
    "read_tagged",
    "to_iob2",
    "tokenizer_digest",
]

if TYPE_CHECKING:
    from sftlab.data.batching import LengthGroupedBatchSampler, ResumableDataLoader, collate
    from sftlab.data.cache import fingerprint, load_or_tokenize, tokenizer_digest
    from sftlab.data.encode import encode_texts
    from sftlab.data.labels import carve_validation, map_labels
    from sftlab.data.module import TextClassificationDataModule
    from sftlab.data.read import (
        FORMATS,
        SPLITS,
        Columns,
        check_columns,
        clean_texts,
        file_digest,
        read_hub,
        read_table,
    )
    from sftlab.data.tags import map_tags, read_tagged, to_iob2
    from sftlab.data.token_module import TokenClassificationDataModule


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
