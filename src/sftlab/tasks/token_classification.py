"""Token classification (NER): a tag per word, scored by entity (seqeval).

What differs from sequence classification, and only that:

- the head: ``AutoModelForTokenClassification`` (a linear layer on every token; the layer map
  sees it as the head, the encoder's blocks as before, so every strategy applies unchanged);
- label alignment (:func:`encode_words`): sentences come as words, the tokenizer splits them
  into sub-words; the first sub-word of a word carries the word's tag, the others are ignored
  by the loss (-100), or, with ``data.label_all_subwords=true``, carry it too (a ``B-X`` as
  ``I-X``). Metrics always read the first sub-word, so they are per word either way;
- truncation: a sentence longer than ``model.max_length`` tokens loses its tail (one warning
  per split counts the sentences and words); the cut words are neither trained on nor scored,
  as in the transformers NER examples;
- the training loss (``data.token_loss``): ``token_mean`` (default) weighs every labelled
  token of the train split alike, whatever batch it lands in: the batch's summed cross-entropy
  over a constant, the mean number of labelled tokens per training batch (from the train split,
  :meth:`~sftlab.data.TokenClassificationDataModule.token_loss_divisor`). ``batch_mean`` is the
  HF Trainer's per-batch mean, under which a token's weight is 1 / (labelled tokens in its
  batch): with batches grouped by length (``data.group_by_length``, our default for speed) the
  batches of short sentences are few tokens each, and on the CoNLL-2003 sample sentences of at
  most 5 words (5.5% of the labelled tokens) drew 24% of the loss (6% in random batches);
- metrics (:func:`tag_metrics`): entity-level precision / recall / F1 (exact span and type,
  seqeval's default CoNLL rules) micro-averaged and per type, and token accuracy; under DDP
  the predicted sentences of every rank are gathered first, so each counts once. The best
  checkpoint is chosen on ``val/f1`` (``main_metric``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sftlab.errors import ConfigError
from sftlab.model import _META_KEYS, TextClassifier, _gather_lists, metric_key

log = logging.getLogger(__name__)

IGNORE = -100
_NOT_INPUTS = (*_META_KEYS, "word_starts")
_AVERAGES = ("micro avg", "macro avg", "weighted avg")


# ----------------------------------------------------------------------------- alignment
def encode_words(df, tokenizer: Any, columns: Any, max_length: int, *,
                 label_all_subwords: bool = False, label_names: Sequence[str] = ()):
    """Tokenize word lists (``is_split_into_words``) and align the tag ids to the sub-words.

    Columns of the result: the tokenizer's, ``labels`` (per sub-word; -100 where the loss
    ignores it), ``word_starts`` (1 on the first sub-word of each word: where metrics read),
    ``idx`` (row in the file), ``length`` and ``truncated_words`` (words cut by max_length).
    """
    from datasets import Dataset

    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"Token classification needs a fast tokenizer (for word_ids); "
                          f"{type(tokenizer).__name__} is not one: pick a checkpoint that has one.")
    names = list(label_names)
    # B-X -> I-X for the later sub-words of a word when all of them are labelled
    inside = {i: names.index("I-" + n[2:]) for i, n in enumerate(names)
              if n.startswith("B-") and "I-" + n[2:] in names}
    ds = Dataset.from_dict({"words": df[columns.text].tolist(), "tags": df[columns.label].tolist(),
                            "idx": list(range(len(df)))})

    def encode(batch):
        enc = tokenizer(batch["words"], is_split_into_words=True, truncation=True, max_length=max_length)
        labels, starts, cut = [], [], []
        for i, tags in enumerate(batch["tags"]):
            lab, start, prev = [], [], None
            for w in enc.word_ids(i):
                if w is None:
                    lab.append(IGNORE)
                    start.append(0)
                elif w != prev:
                    lab.append(tags[w])
                    start.append(1)
                else:
                    lab.append(inside.get(tags[w], tags[w]) if label_all_subwords else IGNORE)
                    start.append(0)
                prev = w
            seen = max((w for w in enc.word_ids(i) if w is not None), default=-1) + 1
            labels.append(lab)
            starts.append(start)
            cut.append(len(tags) - seen)
        enc["labels"], enc["word_starts"], enc["truncated_words"] = labels, starts, cut
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    return ds.map(encode, batched=True, batch_size=1000, remove_columns=["words", "tags"],
                  desc="tokenizing", load_from_cache_file=False)


# ----------------------------------------------------------------------------- metrics
def tag_metrics(true: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """``f1``, ``precision``, ``recall`` (entity level, micro), ``acc`` (per word) and per
    entity type ``f1/<TYPE>``, ``precision/<TYPE>``, ``recall/<TYPE>``."""
    from seqeval.metrics import accuracy_score, classification_report

    out: dict[str, float] = {"acc": float(accuracy_score(true, pred)) if true else 0.0}
    report = classification_report(true, pred, output_dict=True, zero_division=0) if true else {}
    micro = report.get("micro avg", {})
    for name, key in (("f1", "f1-score"), ("precision", "precision"), ("recall", "recall")):
        out[name] = float(micro.get(key, 0.0))
    for kind in sorted(k for k in report if k not in _AVERAGES):
        for name, key in (("f1", "f1-score"), ("precision", "precision"), ("recall", "recall")):
            out[f"{name}/{metric_key(kind)}"] = float(report[kind][key])
    return out


# ----------------------------------------------------------------------------- the module
class TokenClassifier(TextClassifier):
    """A token classifier trained with per-token cross-entropy, scored by entity with seqeval.

    Metrics (``split/name``): ``f1``, ``precision``, ``recall``, ``acc`` (token accuracy),
    ``loss`` and per entity type ``f1/<TYPE>`` (``precision/``, ``recall/``) on validation
    and test. The test pass's tags per sentence are kept in ``test_tag_rows``.
    """

    main_metric = "f1"
    auto_model = "AutoModelForTokenClassification"
    head_rows = "token"

    def _build_metrics(self) -> None:
        from torchmetrics import MeanMetric

        # (row, true tag ids, predicted tag ids) per sentence, gathered over ranks at epoch end
        self._rows: dict[str, list] = {"val": [], "test": []}
        self.test_tag_rows: list[tuple[int, list[str], list[str]]] = []
        self.val_loss = MeanMetric()  # weighted by labelled tokens: the single-process mean
        self.test_loss = MeanMetric()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: v for k, v in batch.items() if k not in _NOT_INPUTS}).logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not bool((labels != IGNORE).any()):  # nothing labelled (cannot happen with real words)
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=self.label_smoothing)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # None (the per-batch mean) without a data module that knows its train split
        divisor = getattr(self.trainer.datamodule, "token_loss_divisor", None)
        self.loss_divisor: float | None = divisor() if callable(divisor) else None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        labelled = int((labels != IGNORE).sum())
        mean = self._loss(self(batch), labels)
        divisor = getattr(self, "loss_divisor", None)
        # token_mean: sum over the batch's labelled tokens / a constant (module docstring)
        loss = mean if divisor is None else mean * (labelled / divisor)
        # the per-token mean is what the progress bar and the logs show, either way
        self.log("train/loss", mean, prog_bar=True, batch_size=max(labelled, 1))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        logits = self(batch)
        labels = batch["labels"]
        loss = self._loss(logits, labels)
        getattr(self, f"{split}_loss").update(loss.detach(), weight=int((labels != IGNORE).sum()))
        preds, labels = logits.argmax(-1).cpu(), labels.cpu()
        starts = batch["word_starts"].cpu().bool()
        rows = batch["idx"].cpu().tolist()
        for i, row in enumerate(rows):
            self._rows[split].append((row, labels[i][starts[i]].tolist(), preds[i][starts[i]].tolist()))

    def _eval_epoch_end(self, split: str) -> dict[str, float]:
        rows = sorted(_gather_lists(self._rows[split]))  # every rank's sentences, each once
        self._rows[split] = []
        names = self.label_names
        true = [[names[t] for t in r[1]] for r in rows]
        pred = [[names[p] for p in r[2]] for r in rows]
        prefix = {"val": "val/", "test": "test/"}[split]
        metrics = {prefix + k: v for k, v in tag_metrics(true, pred).items()}
        loss = getattr(self, f"{split}_loss")
        main = metrics.pop(prefix + self.main_metric)
        self.log_dict(metrics, sync_dist=True)
        self.log(prefix + self.main_metric, main, prog_bar=True, sync_dist=True)
        self.log(prefix + "loss", loss.compute(), sync_dist=True)
        loss.reset()
        if split == "test":
            self.test_tag_rows = [(r[0], t, p) for r, t, p in zip(rows, true, pred, strict=True)]
        return metrics

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self._rows["test"] = []
        self.test_tag_rows = []

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
