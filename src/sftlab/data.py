"""The data room: labelled text in, padded token batches out.

``TextClassificationDataModule`` loads a dataset (local files or a hub name), validates it
before any expensive work, maps labels to ids, tokenizes each split once into an on-disk cache
keyed by a fingerprint of everything that affects the result, and serves length-grouped
batches padded per batch.

Why our own reading and cache instead of ``load_dataset("csv", ...)`` and its implicit cache:
``load_dataset`` writes an Arrow copy of every raw file before we can validate it, and its
parser errors do not name the row or the fix. We read with pandas (which reports the ragged
line), validate, then build a ``datasets.Dataset`` and tokenize with ``.map``; the result goes
to ``<cache_dir>/<fingerprint>/`` through an atomic rename, so a second identical run (or a
sweep job) loads it instead of tokenizing again and parallel runs never see half a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sftlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# bump when the cached format changes, so old caches are not reused
_CACHE_VERSION = "2"
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


# --------------------------------------------------------------------------------------- read
def read_table(path: str | os.PathLike, split: str):
    """Read one local file into a pandas DataFrame, turning parser errors into one sentence."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"The {split} file {str(p)!r} does not exist; check data.{split}_file "
            f"(relative paths are resolved against {os.getcwd()!r})."
        )
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(
            f"Cannot read {str(p)!r}: unknown extension {p.suffix!r}; use one of "
            f"{', '.join(sorted(_FORMATS))}."
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
        raise DataError(f"The {split} file {str(p)!r} is empty; it needs a header and rows.") from None
    except pd.errors.ParserError as err:
        raise DataError(
            f"{str(p)!r} is malformed ({str(err).strip()}); quote fields that contain the "
            f"separator, or fix that row."
        ) from None
    except ValueError as err:
        raise DataError(f"Cannot parse {str(p)!r} as {fmt}: {err}.") from None


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of a file (so that an edited file is re-tokenized, a renamed one is not)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ sampler
class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar token length, in random order, sharded over DDP ranks.

    Why: random batches of short texts pad to the longest member (AG News: a mean of ~93
    tokens for texts that average 53), and attention/FFN cost scales with the padded length.
    Like the HF Trainer's ``group_by_length``, we shuffle, cut the permutation into
    mega-batches of ``mega_batch_mult`` batches, sort each mega-batch by length, cut it into
    batches and shuffle the batch order: every epoch sees a different mix, and the gradient
    statistics stay those of random batches (the mega-batch is itself a random sample).

    With ``shuffle=False`` (evaluation) the whole split is sorted by length: the least padding,
    and the order does not matter to metrics. ``group_by_length=False`` gives plain random
    batches from the same class, so one code path serves every case.

    Distributed: Lightning's automatic ``DistributedSampler`` injection cannot re-create a
    custom batch sampler, so the trainer runs with ``use_distributed_sampler=False`` and this
    sampler shards itself: rank r takes batches r, r+W, r+2W ... For training the batch list is
    padded by repeating batches so every rank steps equally often (DDP needs equal step counts);
    for evaluation it is not, so no example is counted twice.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        group_by_length: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}; set data.batch_size >= 1.")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.drop_last = drop_last
        self.mega = max(1, mega_batch_mult)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # batches of this epoch to pass over on the next __iter__ (a resumed run, see below)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start, so each epoch gets a new permutation."""
        self.epoch = epoch

    @property
    def sampler(self) -> LengthGroupedBatchSampler:
        """Ourselves, so that Lightning's ``set_epoch`` reaches us.

        Lightning calls ``set_epoch`` on ``loader.sampler`` and on ``loader.batch_sampler.sampler``
        (torch's ``BatchSampler`` layout), never on the batch sampler itself; without this every
        epoch would repeat the first epoch's batches.
        """
        return self

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng(self.seed + self.epoch)
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable") if self.group_by_length else np.arange(n)
            # evaluation shards by example, not by batch: every rank gets data whenever there
            # are at least as many examples as ranks, and no example is counted twice
            order = order[self.rank :: self.num_replicas]
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        perm = rng.permutation(n)
        if self.group_by_length:
            size = self.batch_size * self.mega
            chunks = [perm[i : i + size] for i in range(0, n, size)]
            perm = np.concatenate(
                [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]
            ) if chunks else perm
        batches = [perm[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        if self.num_replicas > 1:
            if self.shuffle and batches:  # equal step counts on every rank
                total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
                batches = batches + batches[: total - len(batches)]
                batches = batches[self.rank :: self.num_replicas]
        skip, self.skip = self.skip, 0  # one resumed epoch only
        return iter(batches[skip:])

    def __len__(self) -> int:
        n = len(self.lengths)
        full = n // self.batch_size if self.drop_last and self.shuffle else math.ceil(n / self.batch_size)
        if self.num_replicas > 1:
            if self.shuffle:
                return math.ceil(full / self.num_replicas)
            return math.ceil(len(range(self.rank, n, self.num_replicas)) / self.batch_size)
        return full


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can stop mid-epoch and resume at the next unseen batch.

    Lightning treats a loader with ``state_dict``/``load_state_dict`` as resumable: it stores
    ``state_dict()`` in every checkpoint and, on resume, calls ``load_state_dict()`` before it
    creates the epoch's iterator; it does not skip anything itself. The state is the epoch and
    the number of batches this loader has handed out, counted at the iterator (not at the
    sampler, which worker processes read ahead of training). On resume the batch sampler, whose
    order depends only on ``seed + epoch``, rebuilds that epoch's order and starts after the
    batches already trained on, without loading them. A state taken at the end of an epoch
    resumes nothing: the next epoch starts from its first batch.
    """

    _yielded = 0
    _epoch: int | None = None  # the epoch of the current iterator (set_epoch may run ahead)

    def __iter__(self):
        sampler = self.batch_sampler
        self._epoch = getattr(sampler, "epoch", 0)
        self._yielded = getattr(sampler, "skip", 0)
        return _CountingIterator(super().__iter__(), self)

    def state_dict(self) -> dict[str, int]:
        epoch = self._epoch if self._epoch is not None else getattr(self.batch_sampler, "epoch", 0)
        return {"epoch": int(epoch), "batches": int(self._yielded)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler = self.batch_sampler
        if not hasattr(sampler, "skip"):
            return
        epoch, done = int(state_dict.get("epoch", 0)), int(state_dict.get("batches", 0))
        if done >= len(sampler):  # that epoch was finished: the next one starts from its top
            epoch, done = epoch + 1, 0
        # set here and not only by Lightning's set_epoch: Lightning may build the resumed
        # epoch's iterator before it calls set_epoch
        sampler.set_epoch(epoch)
        sampler.skip = done


class _CountingIterator:
    """Counts the batches a DataLoader iterator has returned (see ``ResumableDataLoader``)."""

    def __init__(self, it, owner: ResumableDataLoader) -> None:
        self._it, self._owner = it, owner

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._owner._yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self._it)


# -------------------------------------------------------------------------------- datamodule
class TextClassificationDataModule(pl.LightningDataModule):
    """Load → validate → map labels → tokenize once (cached) → length-grouped dataloaders.

    ``label_names`` is available right after construction (it reads the raw files, not the
    tokenized ones) because the model's head size and ``id2label`` come from the data.
    ``splits`` limits the work to what is needed: evaluation loads only the split it scores.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        hub_name: str | None = None,
        hub_config: str | None = None,
        text_field: str = "text",
        text_pair_field: str | None = None,
        label_field: str = "label",
        label_names: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        group_by_length: bool = True,
        num_workers: int = 0,
        empty_texts: str = "fail",
        max_length: int = 128,
        seed: int = 42,
        cache_dir: str | None = None,
        splits: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if batch_size is None or int(batch_size) <= 0:
            raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size}.")
        if eval_batch_size is None or int(eval_batch_size) <= 0:
            raise ConfigError(f"data.eval_batch_size must be a positive integer, got {eval_batch_size}.")
        if empty_texts not in ("fail", "drop"):
            raise ConfigError(f"data.empty_texts must be 'fail' or 'drop', got {empty_texts!r}.")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
        self.tokenizer = tokenizer
        self.files = {"train": train_file, "validation": validation_file, "test": test_file}
        self.hub_name, self.hub_config = hub_name, hub_config
        self.text_field, self.text_pair_field, self.label_field = text_field, text_pair_field, label_field
        self._given_label_names = list(label_names) if label_names is not None else None
        self.val_fraction = float(val_fraction)
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.group_by_length = bool(group_by_length)
        self.num_workers = int(num_workers)
        self.empty_texts = empty_texts
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.splits = tuple(splits) if splits else SPLITS
        if hub_name is None and not any(self.files[s] for s in self.splits):
            raise ConfigError(
                "No data given: set data.train_file (and validation/test files) or data.hub_name."
            )
        self._raw: dict[str, Any] | None = None
        self._label_names: list[str] | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict[str, int] | None = None
        self.datasets: dict[str, Any] = {}
        self.lengths: dict[str, np.ndarray] = {}
        self.cache_hit: bool | None = None
        self.cache_path: Path | None = None

    # ----------------------------------------------------------------------------- labels
    @property
    def label_names(self) -> list[str]:
        """Label names in id order (from the config, else from the training labels)."""
        if self._label_names is None:
            self._load_raw()
        assert self._label_names is not None
        return self._label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    # ----------------------------------------------------------------------------- raw data
    def _load_raw(self) -> None:
        """Read every needed split into pandas, validate, carve validation, map labels."""
        if self._raw is not None:
            return
        raw: dict[str, Any] = {}
        if self.hub_name:
            raw = self._read_hub()
        else:
            for split in SPLITS:
                wanted = split in self.splits or (split == "train" and "validation" in self.splits)
                if self.files[split] and wanted:
                    raw[split] = read_table(self.files[split], split)
        for split, df in raw.items():
            self._check_columns(df, split)
        if "validation" in self.splits and "validation" not in raw:
            if "train" not in raw:
                raise ConfigError("No validation data: set data.validation_file or data.train_file.")
            raw["train"], raw["validation"] = self._carve_validation(raw["train"])
        self._label_names, raw = self._map_labels(raw)
        for split in list(raw):
            raw[split] = self._clean_texts(raw[split], split)
            cap = self.max_train_samples if split == "train" else self.max_eval_samples
            if cap is not None:
                raw[split] = raw[split].iloc[: int(cap)].reset_index(drop=True)
        self._raw = {s: df for s, df in raw.items() if s in self.splits}
        for split in self.splits:
            if split not in self._raw and not (split == "test" and not self.files["test"] and not self.hub_name):
                raise ConfigError(f"No {split} data: set data.{split}_file.")

    def _read_hub(self) -> dict[str, Any]:
        from datasets import load_dataset

        try:
            dsd = load_dataset(self.hub_name, self.hub_config)
        except Exception as err:  # the hub raises many types; the user needs one sentence
            raise DataError(
                f"Could not load dataset {self.hub_name!r} from the Hugging Face hub ({type(err).__name__}); "
                "check the name and your network, or use data=local with files."
            ) from None
        return {s: dsd[s].to_pandas() for s in SPLITS if s in dsd}

    def _check_columns(self, df, split: str) -> None:
        need = [self.text_field, self.label_field] + ([self.text_pair_field] if self.text_pair_field else [])
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise DataError(
                f"The {split} data has no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))}); "
                f"set data.text_field / data.label_field to the right names."
            )
        if len(df) == 0:
            raise DataError(f"The {split} data has no rows; give a file with at least one example.")

    def _carve_validation(self, train):
        """Stratified, seeded split of train into train/validation (val_fraction per class)."""
        rng = np.random.default_rng(self.seed)
        labels = train[self.label_field].astype(str).to_numpy()
        val_idx = []
        for lab in sorted(set(labels)):
            idx = np.flatnonzero(labels == lab)
            rng.shuffle(idx)
            val_idx.extend(idx[: max(1, round(len(idx) * self.val_fraction))].tolist() if len(idx) > 1 else [])
        mask = np.zeros(len(train), dtype=bool)
        mask[val_idx] = True
        return train[~mask].reset_index(drop=True), train[mask].reset_index(drop=True)

    def _map_labels(self, raw: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """Turn the label column into ids 0..K-1 and return the names in id order.

        Integer labels (or strings of digits) are ids; other strings are names, mapped to ids
        by ``label_names`` when given, else by sorted order of the training labels.
        """
        col = self.label_field

        def as_ints(series):
            try:
                vals = [int(str(v).strip()) for v in series]
                if all(str(v).strip().lstrip("-").isdigit() for v in series):
                    return np.asarray(vals)
            except ValueError:
                pass
            return None

        int_labels = {s: as_ints(df[col]) for s, df in raw.items()}
        numeric = all(v is not None for v in int_labels.values())
        names = self._given_label_names
        if numeric:
            if names is None:
                ref = int_labels.get("train")
                if ref is None:
                    ref = np.concatenate(list(int_labels.values()))
                names = [str(i) for i in range(int(ref.max()) + 1)]
            k = len(names)
            for split, ids in int_labels.items():
                bad = ids[(ids < 0) | (ids >= k)]
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
                    raise ConfigError("String labels need data.label_names when no training data is loaded.")
                names = sorted({str(v) for v in src[col]})
            index = {n: i for i, n in enumerate(names)}
            mapped = {}
            for split, df in raw.items():
                vals = [str(v) for v in df[col]]
                unknown = sorted({v for v in vals if v not in index})
                if unknown:
                    where = "never seen in train" if self._given_label_names is None else "not in data.label_names"
                    raise DataError(
                        f"The {split} data has label {unknown[0]!r} {where} (known: {', '.join(names)}); "
                        "fix the data or list every label in data.label_names."
                    )
                mapped[split] = df.assign(**{col: [index[v] for v in vals]})
        if numeric and self._given_label_names is None and "train" in mapped:
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
            raise DataError(f"Only one label ({names[0]!r}) in the data; classification needs at least two.")
        return list(map(str, names)), mapped

    def _clean_texts(self, df, split: str):
        fields = [self.text_field] + ([self.text_pair_field] if self.text_pair_field else [])
        bad = np.zeros(len(df), dtype=bool)
        for f in fields:
            vals = df[f]
            bad |= vals.isna().to_numpy() | np.array([str(v).strip() == "" for v in vals])
        n_bad = int(bad.sum())
        if n_bad:
            first = int(np.flatnonzero(bad)[0])
            if self.empty_texts == "fail":
                raise DataError(
                    f"The {split} data has {n_bad} empty or null texts (first at row {first + 1}); "
                    "remove them or set data.empty_texts=drop to skip them with a warning."
                )
            log.warning("Dropping %d empty or null texts from the %s data.", n_bad, split)
            df = df[~bad].reset_index(drop=True)
            if len(df) == 0:
                raise DataError(f"The {split} data has no non-empty texts left.")
        for f in fields:
            df[f] = df[f].astype(str)
        return df

    # --------------------------------------------------------------------------- tokenizing
    def fingerprint(self, split: str) -> str:
        """Everything that changes the tokenized result of ``split``, hashed."""
        tok = self.tokenizer
        parts = {
            "v": _CACHE_VERSION,
            "split": split,
            "files": {s: file_digest(f) for s, f in self.files.items() if f and Path(f).is_file()},
            "hub": [self.hub_name, self.hub_config],
            "tok": [getattr(tok, "name_or_path", ""), type(tok).__name__, len(tok),
                    getattr(tok, "padding_side", ""), str(getattr(tok, "pad_token", ""))],
            "tok_files": _tokenizer_digest(tok),
            "fields": [self.text_field, self.text_pair_field, self.label_field],
            "labels": self.label_names,
            "max_length": self.max_length,
            "caps": [self.max_train_samples, self.max_eval_samples],
            "val": [self.val_fraction, self.seed] if not self.files["validation"] else None,
            "empty": self.empty_texts,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _tokenize(self, df):
        from datasets import Dataset

        cols = [self.text_field] + ([self.text_pair_field] if self.text_pair_field else [])
        ds = Dataset.from_dict({
            **{c: df[c].tolist() for c in cols},
            "labels": df[self.label_field].astype(int).tolist(),
            "idx": list(range(len(df))),
        })
        tok, pair, text, max_len = self.tokenizer, self.text_pair_field, self.text_field, self.max_length

        def encode(batch):
            enc = tok(batch[text], batch[pair] if pair else None, truncation=True, max_length=max_len)
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(encode, batched=True, batch_size=1000, remove_columns=cols,
                      desc="tokenizing", load_from_cache_file=False)

    def _load_or_tokenize(self, split: str):
        """Tokenized split from the cache, or tokenize now and publish it atomically."""
        from datasets import load_from_disk

        if self.cache_dir is None:
            self._load_raw()
            self.cache_hit = False
            return self._tokenize(self._raw[split])
        key = self.fingerprint(split)
        final = self.cache_dir / key
        if (final / "dataset_info.json").is_file():
            self.cache_hit = True if self.cache_hit in (None, True) else False
            self.cache_path = final
            log.info("Tokenized %s split from cache %s", split, final)
            return load_from_disk(str(final))
        self._load_raw()
        ds = self._tokenize(self._raw[split])
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.cache_dir))
        try:
            _quiet_save(ds, tmp)
            try:
                os.rename(tmp, final)  # atomic: readers see all of it or nothing
            except OSError:  # another run published the same key first; theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.cache_hit = False
        self.cache_path = final
        return load_from_disk(str(final))

    def prepare_data(self) -> None:
        """Rank 0 only (Lightning): tokenize and fill the cache, so other ranks just load it."""
        for split in self.splits:
            if split not in self.datasets and self._has_split(split):
                self.setup()
                return

    def _has_split(self, split: str) -> bool:
        if self.hub_name:  # a hub dataset without this split raises KeyError in setup
            return True
        return bool(self.files[split]) or (split == "validation" and bool(self.files["train"]))

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits:
            if split not in self.datasets and self._has_split(split):
                try:
                    ds = self._load_or_tokenize(split)
                except KeyError:  # a hub dataset without this split
                    continue
                self.lengths[split] = np.asarray(ds["length"])
                self.datasets[split] = ds.with_format(
                    "torch", columns=[c for c in ds.column_names if c != "length"],
                    output_all_columns=False,
                )

    # -------------------------------------------------------------------------- loaders
    def collate(self, features: list[dict]) -> dict:
        """Pad per batch to the longest member (not to max_length), by the tokenizer's rules.

        The result is what ``DataCollatorWithPadding`` returns (``tests/test_data.py`` compares
        them, left and right padding). Why not simply that collator: it turns every tensor back
        into Python lists and pads in Python, 1.8 ms per batch of 16 here, ~1% of a bf16
        training step on 2 CPU cores and on the loop's critical path (``num_workers=0``).
        Padding the tensors with ``pad_sequence`` takes ~0.1 ms. Anything this does not know (a
        tokenizer without a pad token, a column of another kind) goes to the HF collator.
        """
        batch = _pad_tensors(features, self.tokenizer)
        if batch is not None:
            return batch
        if not hasattr(self, "_collator"):
            from transformers import DataCollatorWithPadding

            self._collator = DataCollatorWithPadding(self.tokenizer)
        return self._collator(features)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            raise ConfigError(f"No {split} data is configured; set data.{split}_file.")
        ds = self.datasets[split]
        world, rank = self._world()
        sampler = LengthGroupedBatchSampler(
            self.lengths[split],
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            group_by_length=self.group_by_length,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )
        return ResumableDataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=_on_gpu(self),
            # the loader's own generator for worker seeds: a plain DataLoader draws them from
            # the global generator at every epoch start, which would shift dropout's random
            # stream differently in a resumed run than in an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", train=True)
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    # The train loader's position also travels through the datamodule's own state: Lightning
    # restores a datamodule before anything builds a loader, but it hands a stateful loader its
    # checkpointed state only if the loader did not exist yet when the fit loop starts, and
    # ``trainer.estimated_stepping_batches`` (the LR schedule's length) builds it earlier
    # (Lightning issue #20550). Applying the same state twice is harmless.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_state = state_dict.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


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


def _on_gpu(dm: pl.LightningDataModule) -> bool:
    trainer = getattr(dm, "trainer", None)
    return bool(trainer is not None and trainer.accelerator.__class__.__name__ == "CUDAAccelerator")


def _pad_tensors(features: list[dict], tokenizer) -> dict | None:
    """Right- or left-pad the token columns of tensor rows; None where the HF collator must do it."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    if not features or tokenizer is None or tokenizer.pad_token_id is None:
        return None
    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "special_tokens_mask": 1,
                  "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    side = getattr(tokenizer, "padding_side", "right")
    out = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if not all(isinstance(v, torch.Tensor) for v in values):
            return None
        if all(v.dim() == 0 for v in values):  # labels, idx
            out["labels" if key in ("label", "label_ids") else key] = torch.stack(values)
        elif key in pad_values and all(v.dim() == 1 for v in values):
            out[key] = pad_sequence(values, batch_first=True, padding_value=pad_values[key], padding_side=side)
        else:
            return None
    return out


def _tokenizer_digest(tok) -> str:
    """Hash of the tokenizer's vocabulary/normalizer (two tokenizers with one name may differ)."""
    try:
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        if backend is not None:
            return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    except Exception:  # slow tokenizers: fall back to the vocabulary
        pass
    try:
        return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]
    except Exception:
        return ""
