"""Reading: a local file (or a hub dataset) into pandas, validated before any expensive work.

Why our own reading instead of ``load_dataset("csv", ...)`` and its implicit cache:
``load_dataset`` writes an Arrow copy of every raw file before we can validate it, and its
parser errors do not name the row or the fix. We read with pandas (which reports the ragged
line) and validate here; only then does the data module build a ``datasets.Dataset`` and
tokenize it (``encode.py``, cached by ``cache.py``).

Every function here is pure: arguments in, a DataFrame (or an error sentence) out.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlab.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Columns:
    """The columns a task reads: the text, an optional second text (sentence pairs), the label."""

    text: str = "text"
    pair: str | None = None
    label: str = "label"

    @property
    def texts(self) -> list[str]:
        """The text columns, in the order the tokenizer takes them."""
        return [self.text] + ([self.pair] if self.pair else [])

    @property
    def needed(self) -> list[str]:
        """Every column a split must have (in the order a missing one is reported)."""
        return [self.text, self.label] + ([self.pair] if self.pair else [])


def read_table(path: str | os.PathLike, split: str):
    """Read one local file into a pandas DataFrame, turning parser errors into one sentence."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"The {split} file {str(p)!r} does not exist; check data.{split}_file "
            f"(relative paths are resolved against {os.getcwd()!r})."
        )
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(
            f"Cannot read {str(p)!r}: unknown extension {p.suffix!r}; use one of "
            f"{', '.join(sorted(FORMATS))}."
        )
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(
                p, sep="\t" if fmt == "tsv" else ",", keep_default_na=False,
                na_values=[], encoding="utf-8", dtype=str,
            )
        if fmt == "json":
            try:
                return pd.read_json(p, encoding="utf-8", dtype=False)
            except ValueError:
                return pd.read_json(p, lines=True, encoding="utf-8", dtype=False)
        if fmt == "jsonl":
            return pd.read_json(p, lines=True, encoding="utf-8", dtype=False)
        return pd.read_parquet(p)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{str(p)!r} is not UTF-8 (byte {err.start}); re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}`."
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(
            f"The {split} file {str(p)!r} is empty; it needs a header and rows."
        ) from None
    except pd.errors.ParserError as err:
        raise DataError(
            f"{str(p)!r} is malformed ({str(err).strip()}); quote fields that contain the "
            f"separator, or fix that row."
        ) from None
    except ValueError as err:
        raise DataError(f"Cannot parse {str(p)!r} as {fmt}: {err}.") from None


def read_hub(name: str, config: str | None = None) -> dict[str, Any]:
    """The splits of a Hugging Face hub dataset as DataFrames (only those in ``SPLITS``)."""
    from datasets import load_dataset

    try:
        dsd = load_dataset(name, config)
    except Exception as err:  # the hub raises many types; the user needs one sentence
        raise DataError(
            f"Could not load dataset {name!r} from the Hugging Face hub ({type(err).__name__}); "
            "check the name and your network, or use data=local with files."
        ) from None
    return {s: dsd[s].to_pandas() for s in SPLITS if s in dsd}


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of a file (so that an edited file is re-tokenized, a renamed one is not)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_columns(df, split: str, needed: Sequence[str]) -> None:
    """Fail in one sentence when ``df`` lacks a needed column or has no rows."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(
            f"The {split} data has no column {missing[0]!r} "
            f"(columns: {', '.join(map(str, df.columns))}); "
            f"set data.text_field / data.label_field to the right names."
        )
    if len(df) == 0:
        raise DataError(f"The {split} data has no rows; give a file with at least one example.")


def clean_texts(df, split: str, fields: Sequence[str], empty_texts: str):
    """``df`` with its text ``fields`` as strings; empty or null texts fail, or are dropped.

    ``empty_texts="fail"`` names the count and the first bad row; ``"drop"`` removes those rows
    with a warning that gives the count (and fails if nothing is left).
    """
    import numpy as np

    bad = np.zeros(len(df), dtype=bool)
    for f in fields:
        vals = df[f]
        bad |= vals.isna().to_numpy() | np.array([str(v).strip() == "" for v in vals])
    n_bad = int(bad.sum())
    if n_bad:
        first = int(np.flatnonzero(bad)[0])
        if empty_texts == "fail":
            raise DataError(
                f"The {split} data has {n_bad} empty or null texts (first at row {first + 1}); "
                "remove them or set data.empty_texts=drop to skip them with a warning."
            )
        log.warning("Dropping %d empty or null texts from the %s data.", n_bad, split)
        df = df[~bad].reset_index(drop=True)
        if len(df) == 0:
            raise DataError(f"The {split} data has no non-empty texts left.")
    return df.assign(**{f: df[f].astype(str) for f in fields})
