"""Batching: length-grouped batches, a loader that resumes mid-epoch, and per-batch padding.

No Lightning here (the deploy side batches prediction requests with ``collate`` and never
imports Lightning): these are torch pieces the data module wires together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sftlab.errors import checked


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
        self.batch_size = checked("batch_size", batch_size, int, positive=True,
                                  hint="set data.batch_size >= 1")
        self.lengths = np.asarray(lengths)
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
        # one independent stream per (seed, epoch): seed + epoch made seed 42's epoch 1 equal
        # seed 43's epoch 0, so a study over consecutive seeds reused most of its orders
        rng = np.random.default_rng([self.seed, self.epoch])
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
                # cyclically: with more ranks than twice the batches, one copy is not enough,
                # and a rank left with 0 batches while __len__ says 1 hangs DDP
                batches = [batches[i % len(batches)] for i in range(total)]
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
    order depends only on ``(seed, epoch)``, rebuilds that epoch's order and starts after the
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


def collate(features: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """Pad a batch to its longest member (not to max_length), by the tokenizer's rules.

    ``features`` are what a DataLoader hands to ``collate_fn``: dicts of 1-D token tensors
    (``input_ids``, ``attention_mask``, ...) and 0-D ones (``labels``, ``idx``). Training and
    prediction both batch through here, so a served batch is padded exactly like a trained one.

    The result is what ``DataCollatorWithPadding`` returns (``tests/test_data.py`` compares
    them, left and right padding). Why not simply that collator: it turns every tensor back
    into Python lists and pads in Python, on the loop's critical path (``num_workers=0``);
    padding the tensors with ``pad_sequence`` costs a small fraction of that. Anything this
    does not know (a tokenizer without a pad token, a column of another kind) goes to the HF
    collator.
    """
    batch = _pad_tensors(features, tokenizer)
    if batch is not None:
        return batch
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)(features)


def _pad_tensors(features: list[dict], tokenizer) -> dict | None:
    """Right- or left-pad the token columns of tensor rows; None where the HF collator must do it."""
    from torch.nn.utils.rnn import pad_sequence

    if not features or tokenizer is None or tokenizer.pad_token_id is None:
        return None
    # labels / word_starts are 1-D only in token classification (-100: no loss on padding)
    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "special_tokens_mask": 1,
                  "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0), "labels": -100,
                  "word_starts": 0}
    side = getattr(tokenizer, "padding_side", "right")
    out = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if not all(isinstance(v, torch.Tensor) for v in values):
            return None
        if all(v.dim() == 0 for v in values):  # labels, idx
            out["labels" if key in ("label", "label_ids") else key] = torch.stack(values)
        elif key in pad_values and all(v.dim() == 1 for v in values):
            out[key] = pad_sequence(values, batch_first=True, padding_value=pad_values[key],
                                    padding_side=side)
        else:
            return None
    return out
