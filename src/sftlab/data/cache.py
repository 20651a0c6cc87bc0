"""The tokenize cache: each split tokenized once, under a key of everything that shapes it.

The tokenized split goes to ``<cache_dir>/<fingerprint>/`` through an atomic rename, so a
second identical run (or a sweep job) loads it instead of tokenizing again, and parallel runs
never see half a cache. The key is computed from explicit inputs (``fingerprint``): file
contents, tokenizer, columns, label names, lengths, caps, the validation carving; nothing is
read from a data module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sftlab.data.read import Columns, file_digest

log = logging.getLogger(__name__)

# bump when the cached format changes, so old caches are not reused
_CACHE_VERSION = "3"  # 3: the tokenizer digest without truncation/padding state


def tokenizer_digest(tok: Any) -> str:
    """Hash of the tokenizer's vocabulary/normalizer (two tokenizers with one name may differ).

    The backend's truncation and padding settings are left out: calling the tokenizer with
    ``truncation=True, max_length=...`` stores them in it, so a run that tokenized its train
    split would otherwise key validation differently from a run that loaded train from the
    cache (max_length is in the key on its own).
    """
    try:
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        if backend is not None:
            state = json.loads(backend.to_str())
            if isinstance(state, dict):
                state.pop("truncation", None)
                state.pop("padding", None)
            return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    except Exception:  # slow tokenizers: fall back to the vocabulary
        pass
    try:
        return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]
    except Exception:
        return ""


def fingerprint(
    split: str,
    *,
    files: Mapping[str, str | None],
    hub: Sequence[str | None],
    tokenizer: Any,
    columns: Columns,
    label_names: Sequence[str],
    max_length: int,
    caps: Sequence[int | None],
    val: Sequence[Any] | None,
    empty_texts: str,
    task: str | None = None,
) -> str:
    """Everything that changes the tokenized result of ``split``, hashed.

    ``files`` maps splits to paths (hashed by content), ``hub`` is ``[name, config]``, ``caps``
    ``[max_train_samples, max_eval_samples]``, ``val`` ``[val_fraction, seed]`` when validation
    is carved from train (else None). ``task`` names a task other than text classification
    (it enters the key only when set, so classification keys stay what they were).
    """
    tok = tokenizer
    parts = {
        "v": _CACHE_VERSION,
        "split": split,
        "files": {s: file_digest(f) for s, f in files.items() if f and Path(f).is_file()},
        "hub": list(hub),
        "tok": [getattr(tok, "name_or_path", ""), type(tok).__name__, len(tok),
                getattr(tok, "padding_side", ""), str(getattr(tok, "pad_token", ""))],
        "tok_files": tokenizer_digest(tok),
        "fields": [columns.text, columns.pair, columns.label],
        "labels": list(label_names),
        "max_length": max_length,
        "caps": list(caps),
        "val": list(val) if val is not None else None,
        "empty": empty_texts,
    }
    if task is not None:
        parts["task"] = task
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_or_tokenize(cache_dir: str | os.PathLike, key: str, build: Callable[[], Any]):
    """``(dataset, hit)``: the cached ``datasets.Dataset`` for ``key``, or ``build()``'s, published.

    A miss calls ``build()``, saves its result into a temp dir inside ``cache_dir`` and renames
    that to ``<cache_dir>/<key>`` (atomic: readers see all of it or nothing). When another run
    published the same key first, its entry wins (it is identical: same key, same inputs) and
    ours is removed. Either way the returned dataset is loaded from the published entry.
    """
    from datasets import load_from_disk

    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (final / "dataset_info.json").is_file():
        return load_from_disk(str(final)), True
    ds = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        _quiet_save(ds, tmp)
        try:
            os.rename(tmp, final)  # atomic: readers see all of it or nothing
        except OSError:  # another run published the same key first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(final)), False


def _quiet_save(ds, path: Path) -> None:
    """``save_to_disk`` without its progress bar (the tokenizing bar already told the story)."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        ds.save_to_disk(str(path))
    finally:
        if was:
            ds_logging.enable_progress_bar()
