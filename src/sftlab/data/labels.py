"""Labels: the label column mapped to ids 0..K-1, and a validation split carved by label.

Both are pure functions of the raw split frames and the config (no data module state): the
model's head size and ``id2label`` come from the names returned here, so they must be the same
whoever calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sftlab.errors import ConfigError, DataError


def _as_ints(series) -> np.ndarray | None:
    """The values as integer ids when every one is an integer (or a string of digits), else None."""
    try:
        vals = [int(str(v).strip()) for v in series]
        if all(str(v).strip().lstrip("-").isdigit() for v in series):
            return np.asarray(vals)
    except ValueError:
        pass
    return None


def map_labels(
    raw: dict[str, Any], label_field: str, label_names: Sequence[str] | None = None,
    *, names_from: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Turn the label column into ids 0..K-1 and return ``(names in id order, mapped frames)``.

    Integer labels (or strings of digits) are ids; other strings are names, mapped to ids
    by ``label_names`` when given, else by sorted order of the training labels. A label that
    the names (or, without names, the training data) do not know fails in one sentence.
    ``names_from`` says where fixed names came from when they are not the user's to extend
    (``"the model"`` for eval.py: its head has exactly those labels), which changes the advice.
    """
    col = label_field
    given = list(label_names) if label_names is not None else None
    int_labels = {s: _as_ints(df[col]) for s, df in raw.items()}
    numeric = all(v is not None for v in int_labels.values())
    names = given
    if numeric:
        if names is None:
            ref = int_labels.get("train")
            if ref is None:
                ref = np.concatenate(list(int_labels.values()))
            names = [str(i) for i in range(int(ref.max()) + 1)]
        k = len(names)
        for split, ids in int_labels.items():
            bad = ids[(ids < 0) | (ids >= k)]
            if len(bad) and names_from:
                raise DataError(
                    f"The {split} data has label {int(bad[0])} but {names_from} knows only {k} "
                    f"labels (0..{k - 1}: {', '.join(names)}); score a file with those labels only."
                )
            if len(bad):
                raise DataError(
                    f"The {split} data has label {int(bad[0])} but only {k} labels exist "
                    f"(0..{k - 1}: {', '.join(names)}); fix the data or set data.label_names."
                )
        mapped = {s: df.assign(**{col: int_labels[s]}) for s, df in raw.items()}
    else:
        if names is None:
            src = raw.get("train")
            if src is None:
                raise ConfigError(
                    "String labels need data.label_names when no training data is loaded."
                )
            names = sorted({str(v) for v in src[col]})
        index = {n: i for i, n in enumerate(names)}
        mapped = {}
        for split, df in raw.items():
            vals = [str(v) for v in df[col]]
            unknown = sorted({v for v in vals if v not in index})
            if unknown and names_from:
                raise DataError(
                    f"The {split} data has label {unknown[0]!r} that {names_from} does not know "
                    f"(known: {', '.join(names)}); score a file with those labels only."
                )
            if unknown:
                where = "never seen in train" if given is None else "not in data.label_names"
                raise DataError(
                    f"The {split} data has label {unknown[0]!r} {where} "
                    f"(known: {', '.join(names)}); "
                    "fix the data or list every label in data.label_names."
                )
            mapped[split] = df.assign(**{col: [index[v] for v in vals]})
    if numeric and given is None and "train" in mapped:
        seen = set(mapped["train"][col].tolist())
        for split in ("validation", "test"):
            if split in mapped:
                unseen = sorted(set(mapped[split][col].tolist()) - seen)
                if unseen:
                    raise DataError(
                        f"The {split} data has label {unseen[0]} never seen in train; "
                        "fix the data or set data.label_names to declare every label."
                    )
    if len(names) < 2:
        raise DataError(
            f"Only one label ({names[0]!r}) in the data; classification needs at least two."
        )
    return list(map(str, names)), mapped


def carve_validation(train, label_field: str, fraction: float, seed: int):
    """Stratified, seeded split of train into ``(train, validation)`` (``fraction`` per class).

    A class with a single example stays in train. The same seed carves the same rows.
    """
    rng = np.random.default_rng(seed)
    labels = train[label_field].astype(str).to_numpy()
    val_idx = []
    for lab in sorted(set(labels)):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, round(len(idx) * fraction))].tolist() if len(idx) > 1 else [])
    mask = np.zeros(len(train), dtype=bool)
    mask[val_idx] = True
    return train[~mask].reset_index(drop=True), train[mask].reset_index(drop=True)
