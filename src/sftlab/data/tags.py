"""Token-level data: sentences as word lists with one tag per word, read and checked.

The token-classification counterpart of ``read.py`` + ``labels.py``, pure functions only:

- ``read_tagged``: JSONL / JSON / Parquet with a token-list and a tag-list field (names
  configurable: ``data.tokens_field``, ``data.tags_field``), or CoNLL column text (``.txt`` /
  ``.conll``: one token per line, its tag in column ``data.tag_column`` (the last by default),
  a blank line between sentences, ``-DOCSTART-`` lines skipped). Every row keeps where it came
  from (``line 12``), so an error names the line to fix.
- ``to_iob2``: the tag scheme checked and brought to IOB2, the one the metrics (seqeval) and
  the transformers pipeline's entity grouping read (IOB1 and BIOES are converted).
- ``map_tags``: tag names to ids (the label set comes from train; a validation/test tag that
  train lacks is an error), ``clean_sentences`` and ``carve_sentences`` as for texts.

Why our own reader for the CoNLL form: ``datasets`` has no generic loader for it, and
pandas' CSV reader mangles it (quotes and ``#`` are ordinary tokens there).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

WHERE = "_where"  # the column that says where a sentence came from ("line 12")
CONLL = (".conll", ".txt")
TAGGED_FORMATS = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", *CONLL)
SCHEMES = ("auto", "iob2", "iob1", "bioes")
_TAG = re.compile(r"^([BIESLU])-(.+)$")


# ----------------------------------------------------------------------------- reading
def read_tagged(path: str | os.PathLike, split: str, tokens_field: str = "tokens",
                tags_field: str = "ner_tags", tag_column: int = -1,
                tag_names: Sequence[str] | None = None):
    """One file of tagged sentences as a DataFrame: ``tokens_field``, ``tags_field`` (lists of
    strings, one tag per token) and ``_where``. Integer tags are names by ``tag_names``."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(f"The {split} file {str(p)!r} does not exist; check data.{split}_file "
                        f"(relative paths are resolved against {os.getcwd()!r}).")
    suffix = p.suffix.lower()
    if suffix not in TAGGED_FORMATS:
        raise DataError(f"Cannot read {str(p)!r} for token classification: unknown extension "
                        f"{suffix!r}; use one of {', '.join(TAGGED_FORMATS)}.")
    try:
        if suffix in CONLL:
            rows = _read_conll(p, split, tag_column)
        else:
            rows = _read_records(p, suffix, split, tokens_field, tags_field, tag_names)
    except UnicodeDecodeError as err:
        raise DataError(f"{str(p)!r} is not UTF-8 (byte {err.start}); re-save it as UTF-8.") from None
    if not rows:
        raise DataError(f"The {split} file {str(p)!r} is empty (no sentences); give a file with "
                        "at least one tagged sentence.")
    tokens, tags, where = zip(*rows, strict=True)
    return pd.DataFrame({tokens_field: list(tokens), tags_field: list(tags), WHERE: list(where)})


def _read_conll(p: Path, split: str, tag_column: int) -> list[tuple[list[str], list[str], str]]:
    rows: list[tuple[list[str], list[str], str]] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0
    need = tag_column + 1 if tag_column >= 0 else max(2, -tag_column)
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if words:
                    rows.append((words, tags, f"{p.name} line {start}"))
                words, tags = [], []
                continue
            if len(cols) < need:
                raise DataError(
                    f"{p.name} line {n} ({line.strip()!r}) has {len(cols)} column(s) but the tag "
                    f"is read from column {tag_column} (data.tag_column); CoNLL files need the "
                    "token first and its tag in that column (the last by default).")
            if not words:
                start = n
            words.append(cols[0])
            tags.append(cols[tag_column])
    if words:
        rows.append((words, tags, f"{p.name} line {start}"))
    return rows


def _read_records(p: Path, suffix: str, split: str, tokens_field: str, tags_field: str,
                  tag_names: Sequence[str] | None) -> list[tuple[list[str], list[str], str]]:
    if suffix in (".parquet", ".pq"):
        import pandas as pd

        try:
            df = pd.read_parquet(p)
        except Exception as err:  # pyarrow raises many kinds; the user needs one sentence
            raise DataError(f"Cannot read {str(p)!r} as Parquet ({type(err).__name__}).") from None
        records = [(f"{p.name} row {i + 1}", r) for i, r in enumerate(df.to_dict("records"))]
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # a .json file that holds JSON lines
            return _read_records(p, ".jsonl", split, tokens_field, tags_field, tag_names)
        if not isinstance(data, list):
            raise DataError(f"{p.name} holds a JSON {type(data).__name__}; expected a list of "
                            f"objects with {tokens_field!r} and {tags_field!r}.")
        records = [(f"{p.name} item {i + 1}", r) for i, r in enumerate(data)]
    else:
        records = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{p.name} line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{p.name} line {n} is not valid JSON ({err.msg}); write one "
                                    "JSON object per line.") from None
    return [_record(r, where, tokens_field, tags_field, tag_names) for where, r in records]


def _record(row: Any, where: str, tokens_field: str, tags_field: str,
            tag_names: Sequence[str] | None) -> tuple[list[str], list[str], str]:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, not an object with "
                        f"{tokens_field!r} and {tags_field!r}.")
    for field, key in ((tokens_field, "tokens_field"), (tags_field, "tags_field")):
        if field not in row:
            raise DataError(f"{where} has no field {field!r} (fields: {', '.join(map(str, row))}); "
                            f"set data.{key} to the field that holds the {key.split('_')[0]}.")
    tokens, tags = _as_list(row[tokens_field]), _as_list(row[tags_field])
    if tokens is None or tags is None:
        bad = tokens_field if tokens is None else tags_field
        raise DataError(f"{where}: {bad!r} is not a list; give one list of tokens and one list of tags.")
    if len(tokens) != len(tags):
        raise DataError(f"{where} has {len(tokens)} tokens but {len(tags)} tags; each token needs "
                        "exactly one tag.")
    if any(isinstance(t, int) and not isinstance(t, bool) for t in tags):
        if tag_names is None:
            raise DataError(f"{where} has integer tags; set data.label_names to the tag names in id "
                            "order (e.g. [O,B-PER,I-PER,...]) or store the tags as strings.")
        try:
            tags = [tag_names[int(t)] for t in tags]
        except IndexError:
            raise DataError(f"{where} has tag id {max(map(int, tags))} but data.label_names lists "
                            f"only {len(tag_names)} tags.") from None
    return [str(t) for t in tokens], [str(t) for t in tags], where


def _as_list(value: Any) -> list | None:
    if isinstance(value, list | tuple):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from Parquet
        out = value.tolist()
        return out if isinstance(out, list) else None
    return None


# ----------------------------------------------------------------------------- the tag scheme
def _parse(tag: str, where: str) -> tuple[str, str | None]:
    """(prefix, type) of a tag: ("O", None), ("B", "PER") ...; else one sentence."""
    if tag == "O":
        return "O", None
    m = _TAG.match(tag)
    if m is None:
        raise DataError(
            f"{where} has tag {tag!r}, which is in no tag scheme sftlab knows; use IOB2 "
            "(B-PER, I-PER, O), IOB1 or BIOES tags, with the entity type after a dash.")
    return m.group(1), m.group(2)


def check_scheme(scheme: str) -> str:
    """``scheme`` if it is one of :data:`SCHEMES`, else one sentence naming ``data.tag_scheme``."""
    if scheme not in SCHEMES:
        raise ConfigError(f"data.tag_scheme={scheme!r} is not one of {', '.join(SCHEMES)}.")
    return scheme


def detect_scheme(sentences: Sequence[Sequence[str]], wheres: Sequence[str]) -> tuple[str, list[str]]:
    """``(scheme, where the I- tags that start an entity are)``.

    ``bioes`` when E-/S- (or L-/U-) prefixes occur; ``iob1`` when entities start with I- and
    no B- follows an O (IOB1 uses B- only between two adjacent entities of one type); else
    ``iob2``, whose stray I- starts (the hub's CoNLL-2003 has a few ``O I-MISC``) are listed.
    """
    i_starts: list[str] = []
    b_after_o = 0
    for tags, where in zip(sentences, wheres, strict=True):
        prev: tuple[str, str | None] = ("O", None)
        for tag in tags:
            prefix, kind = _parse(tag, where)
            if prefix in "ESLU":
                return "bioes", []
            starts = prev[0] == "O" or prev[1] != kind
            if prefix == "I" and starts:
                i_starts.append(where)
            elif prefix == "B" and starts:
                b_after_o += 1
            prev = (prefix, kind)
    if i_starts and not b_after_o:
        return "iob1", i_starts
    return "iob2", i_starts


def to_iob2(sentences: Sequence[Sequence[str]], wheres: Sequence[str], scheme: str = "auto",
            split: str = "train") -> list[list[str]]:
    """The tags in IOB2. ``scheme``: ``auto`` (detected), or what the file is declared to be;
    ``iob2`` refuses IOB1 and BIOES, ``iob1`` and ``bioes`` are converted. An IOB2 file's
    stray I- tags that start an entity become B- (what seqeval reads them as), with a warning."""
    check_scheme(scheme)
    found, i_starts = detect_scheme(sentences, wheres)
    if scheme == "iob2" and found != "iob2":
        raise DataError(f"The {split} tags are {found.upper()}, not IOB2 as data.tag_scheme says "
                        f"(e.g. {(i_starts or wheres)[0]}); set data.tag_scheme=auto (or {found}) "
                        "to convert them.")
    if found == "iob2" and not i_starts:
        return [list(t) for t in sentences]
    if found == "iob2":
        log.warning("%d %s tag(s) I-X start an entity with no B-X before them (first: %s); read "
                    "as B-X, as seqeval scores them.", len(i_starts), split, i_starts[0])
    else:
        log.info("Converting the %s tags from %s to IOB2.", split, found.upper())
    out = []
    for tags in sentences:
        new, prev = [], ("O", None)
        for tag in tags:
            prefix, kind = _parse(tag, "")
            if prefix in "SU":
                prefix = "B"
            elif prefix in "EL":
                prefix = "I"
            if prefix == "I" and (prev[0] == "O" or prev[1] != kind):
                prefix = "B"  # IOB1 (or a broken BIOES span): this I- starts an entity
            new.append("O" if kind is None else f"{prefix}-{kind}")
            prev = (prefix, kind)
        out.append(new)
    return out


# ----------------------------------------------------------------------------- labels, rows
def tag_order(tags: set[str]) -> list[str]:
    """``O`` first, then per entity type (sorted) its B- and I- tag: the hub's CoNLL layout."""
    kinds = sorted({t[2:] for t in tags if t != "O"})
    return (["O"] if "O" in tags else []) + [f"{p}-{k}" for k in kinds for p in "BI" if f"{p}-{k}" in tags]


def map_tags(raw: dict[str, Any], tags_field: str, label_names: Sequence[str] | None = None,
             *, names_from: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """``(tag names in id order, frames with tag ids)``; names from ``label_names`` or train."""
    given = list(label_names) if label_names is not None else None
    if given is None:
        if "train" not in raw:
            raise ConfigError("Token classification needs data.label_names when no training data is loaded.")
        names = tag_order({t for tags in raw["train"][tags_field] for t in tags})
    else:
        names = [str(n) for n in given]
    index = {n: i for i, n in enumerate(names)}
    mapped = {}
    for split, df in raw.items():
        for tags, where in zip(df[tags_field], df[WHERE], strict=True):
            unknown = [t for t in tags if t not in index]
            if unknown:
                known = ", ".join(names)
                if names_from:
                    raise DataError(f"{where} ({split}) has tag {unknown[0]!r} that {names_from} does "
                                    f"not know (known: {known}); score a file with those tags only.")
                what = "never seen in train" if given is None else "not in data.label_names"
                raise DataError(f"{where} ({split}) has tag {unknown[0]!r} {what} (known: {known}); "
                                "fix the data or list every tag in data.label_names.")
        mapped[split] = df.assign(**{tags_field: [[index[t] for t in tags] for tags in df[tags_field]]})
    if len(names) < 2:
        raise DataError(f"Only one tag ({names[0]!r}) in the data; token classification needs at least two.")
    return names, mapped


def clean_sentences(df, split: str, fields: Sequence[str], empty_texts: str):
    """Empty sentences (no tokens) fail with their line, or are dropped with a warning."""
    field = fields[0]
    empty = [i for i, tokens in enumerate(df[field]) if len(tokens) == 0]
    if not empty:
        return df
    if empty_texts == "fail":
        raise DataError(f"The {split} data has {len(empty)} empty sentence(s) (first: "
                        f"{df[WHERE].iloc[empty[0]]}); remove them or set data.empty_texts=drop.")
    log.warning("Dropping %d empty sentence(s) from the %s data.", len(empty), split)
    df = df.drop(index=df.index[empty]).reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"The {split} data has no non-empty sentences left.")
    return df


def carve_sentences(train, label_field: str, fraction: float, seed: int):
    """A seeded random ``fraction`` of train as validation (sentences have no one label to
    stratify by)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(train) * fraction)) if len(train) > 1 else 0
    mask = np.zeros(len(train), dtype=bool)
    mask[rng.permutation(len(train))[:n_val]] = True
    return train[~mask].reset_index(drop=True), train[mask].reset_index(drop=True)
