"""The Lightning data module: wires reading, labels, encoding, the cache and batching together.

``TextClassificationDataModule`` loads a dataset (local files or a hub name), validates it
before any expensive work (``read.py``), maps labels to ids (``labels.py``), tokenizes each
split once (``encode.py``) into an on-disk cache keyed by a fingerprint of everything that
affects the result (``cache.py``), and serves length-grouped batches padded per batch
(``batching.py``). The module itself holds only the configuration and the order of the steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from sftlab.data import cache
from sftlab.data.batching import LengthGroupedBatchSampler, ResumableDataLoader, collate
from sftlab.data.encode import encode_texts
from sftlab.data.labels import carve_validation, map_labels
from sftlab.data.read import SPLITS, Columns, check_columns, clean_texts, read_hub, read_table
from sftlab.errors import ConfigError, checked

log = logging.getLogger(__name__)


class TextClassificationDataModule(pl.LightningDataModule):
    """Load → validate → map labels → tokenize once (cached) → length-grouped dataloaders.

    ``label_names`` is available right after construction (it reads the raw files, not the
    tokenized ones) because the model's head size and ``id2label`` come from the data.
    ``splits`` limits the work to what is needed: evaluation loads only the split it scores.

    The task's steps are the plain functions below, called in a fixed order by ``_load_raw``
    and ``_load_or_tokenize``. Text classification is the default; a second task (token
    classification) subclasses this and swaps in its reader (``read_file``, ``map_labels``,
    ``clean``, ``carve``) and its aligner (``encode``), and sets ``task`` so that its cache
    entries never collide with ours; loaders, cache, resume and sharding stay shared.
    """

    task: str | None = None  # enters the cache key when set (see cache.fingerprint)
    read_file = staticmethod(read_table)  # (path, split) -> DataFrame
    carve = staticmethod(carve_validation)  # (train, label_field, fraction, seed) -> (train, val)
    map_labels = staticmethod(map_labels)  # (raw, label_field, names) -> (names, mapped)
    clean = staticmethod(clean_texts)  # (df, split, text fields, empty_texts) -> df
    encode = staticmethod(encode_texts)  # (df, tokenizer, columns, max_length) -> Dataset
    unserved: tuple[str, ...] = ("length",)  # dataset columns the loaders do not hand out

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
        split_seed: int | None = None,
        cache_dir: str | None = None,
        splits: Sequence[str] | None = None,
        label_names_from: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = checked("data.batch_size", batch_size, int, positive=True)
        self.eval_batch_size = checked("data.eval_batch_size", eval_batch_size, int, positive=True)
        if empty_texts not in ("fail", "drop"):
            raise ConfigError(f"data.empty_texts must be 'fail' or 'drop', got {empty_texts!r}.")
        # in (0, 1); checked's upper bound is inclusive, and a fraction of 1 would leave no train
        self.val_fraction = checked("data.val_fraction", val_fraction, float, lo=0, lo_open=True)
        if self.val_fraction >= 1:
            raise ConfigError(f"data.val_fraction must be < 1 (the share of train carved out for "
                              f"validation), got {val_fraction!r}.")
        self.tokenizer = tokenizer
        self.files = {"train": train_file, "validation": validation_file, "test": test_file}
        self.hub_name, self.hub_config = hub_name, hub_config
        self.text_field, self.text_pair_field = text_field, text_pair_field
        self.label_field = label_field
        self.columns = Columns(text_field, text_pair_field, label_field)
        self._given_label_names = list(label_names) if label_names is not None else None
        # where fixed label names came from when they are not the user's (eval.py: "the model")
        self.label_names_from = label_names_from
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.group_by_length = bool(group_by_length)
        self.num_workers = int(num_workers)
        self.empty_texts = empty_texts
        self.max_length = int(max_length)
        self.seed = int(seed)
        # the validation carve's seed, apart from the training seed: a seed study varies the
        # initialisation and the data order, never which rows are validation (None: seed)
        self.split_seed = int(split_seed) if split_seed is not None else self.seed
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
            raw = read_hub(self.hub_name, self.hub_config)
        else:
            for split in SPLITS:
                wanted = split in self.splits or (split == "train" and "validation" in self.splits)
                if self.files[split] and wanted:
                    raw[split] = self.read_file(self.files[split], split)
        for split, df in raw.items():
            check_columns(df, split, self.columns.needed)
        if "validation" in self.splits and "validation" not in raw:
            if "train" not in raw:
                raise ConfigError("No validation data: set data.validation_file or data.train_file.")
            raw["train"], raw["validation"] = self.carve(
                raw["train"], self.label_field, self.val_fraction, self.split_seed)
        self._label_names, raw = self.map_labels(raw, self.label_field, self._given_label_names,
                                                 names_from=self.label_names_from)
        for split in list(raw):
            raw[split] = self.clean(raw[split], split, self.columns.texts, self.empty_texts)
            cap = self.max_train_samples if split == "train" else self.max_eval_samples
            if cap is not None:
                raw[split] = raw[split].iloc[: int(cap)].reset_index(drop=True)
        self._raw = {s: df for s, df in raw.items() if s in self.splits}
        for split in self.splits:
            no_test = split == "test" and not self.files["test"] and not self.hub_name
            if split not in self._raw and not no_test:
                raise ConfigError(f"No {split} data: set data.{split}_file.")

    # --------------------------------------------------------------------------- tokenizing
    def fingerprint(self, split: str) -> str:
        """The cache key of ``split``: everything that changes its tokenized result, hashed."""
        return cache.fingerprint(
            split,
            files=self.files,
            hub=[self.hub_name, self.hub_config],
            tokenizer=self.tokenizer,
            columns=self.columns,
            label_names=self.label_names,
            max_length=self.max_length,
            caps=[self.max_train_samples, self.max_eval_samples],
            val=[self.val_fraction, self.split_seed] if not self.files["validation"] else None,
            empty_texts=self.empty_texts,
            task=self.task,
        )

    def _tokenize(self, split: str):
        self._load_raw()
        assert self._raw is not None
        return self.encode(self._raw[split], self.tokenizer, self.columns, self.max_length)

    def _load_or_tokenize(self, split: str):
        """Tokenized split from the cache, or tokenize now and publish it (``cache.py``)."""
        if self.cache_dir is None:
            self.cache_hit = False
            return self._tokenize(split)
        key = self.fingerprint(split)
        ds, hit = cache.load_or_tokenize(self.cache_dir, key, lambda: self._tokenize(split))
        # a hit only when every split so far came from the cache
        self.cache_hit = hit and self.cache_hit in (None, True)
        self.cache_path = self.cache_dir / key
        if hit:
            log.info("Tokenized %s split from cache %s", split, self.cache_path)
        return ds

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
                    "torch", columns=[c for c in ds.column_names if c not in self.unserved],
                    output_all_columns=False,
                )

    # -------------------------------------------------------------------------- loaders
    def collate(self, features: list[dict]) -> dict:
        """Pad per batch to the longest member, by the tokenizer's rules (``batching.collate``)."""
        return collate(features, self.tokenizer)

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
            self.datasets[split],
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
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_state = state_dict.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def _on_gpu(dm: pl.LightningDataModule) -> bool:
    trainer = getattr(dm, "trainer", None)
    return bool(trainer is not None and trainer.accelerator.__class__.__name__ == "CUDAAccelerator")
