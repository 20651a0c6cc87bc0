"""How the NER training loss weighs tokens (``data.token_loss``).

``token_mean`` (the default) gives every labelled token of the train split the same weight,
whatever batch it lands in: a batch's summed cross-entropy over one constant, the mean labelled
tokens per training batch. ``batch_mean`` is the HF Trainer's per-batch mean, under which the
few tokens of a short-sentence batch weigh several times more than those of a long one.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import compose_config, tiny_overrides

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _module(tiny_model_dir):
    from sftlab.tasks.token_classification import TokenClassifier

    return TokenClassifier(str(tiny_model_dir), TAGS)


def _batch(tiny_model_dir, words: list[list[str]], tags: list[list[int]]):
    """A padded batch with the first sub-word of each word labelled (as the data module does)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tok(words, is_split_into_words=True, padding=True, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    for i, row in enumerate(tags):
        prev = None
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w != prev:
                labels[i, j] = row[w]
            prev = w
    return {**enc, "labels": labels}


def _token_losses(module, batch):
    """Each labelled token's cross-entropy, unreduced."""
    import torch.nn.functional as F

    logits = module(batch).float()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="none")
    return ce[batch["labels"].flatten() != -100]


def test_token_mean_weighs_every_token_alike_across_batches(tiny_model_dir):
    import torch

    torch.manual_seed(0)
    module = _module(tiny_model_dir).eval()  # no dropout: the same logits on every call
    short = _batch(tiny_model_dir, [["Paris"], ["Anna", "ran"]], [[3], [1, 0]])  # 3 labelled tokens
    long = _batch(tiny_model_dir, [["John", "Smith", "went", "to", "Rome", "and", "Milan", "today"]],
                  [[1, 2, 0, 0, 3, 0, 3, 0]])  # 8 labelled tokens
    ce_short, ce_long = _token_losses(module, short), _token_losses(module, long)
    assert (len(ce_short), len(ce_long)) == (3, 8)

    module.loss_divisor = 5.5  # the mean labelled tokens per batch, as the data module gives it
    with torch.no_grad():
        got = module.training_step(short, 0) + module.training_step(long, 1)
    # every token's weight is 1 / 5.5, in the short batch and the long one alike
    torch.testing.assert_close(got, (ce_short.sum() + ce_long.sum()) / 5.5)

    module.loss_divisor = None  # batch_mean: the short batch's tokens weigh 1/3, the long's 1/8
    with torch.no_grad():
        per_batch = module.training_step(short, 0) + module.training_step(long, 1)
    torch.testing.assert_close(per_batch, ce_short.mean() + ce_long.mean())
    assert not torch.allclose(per_batch, got)  # the two weightings differ on these batches


def test_the_divisor_is_the_mean_labelled_tokens_per_training_batch(tmp_path, tiny_model_dir):
    """First sub-words only: a word is a labelled token, so the divisor is words per sentence
    times the batch size; with every sub-word labelled, the non-special sub-words count."""
    from transformers import AutoTokenizer

    from sftlab.data import TokenClassificationDataModule
    from sftlab.errors import ConfigError

    rows = [{"tokens": ["EU", "rejects", "German", "call"], "ner_tags": ["B-ORG", "O", "B-MISC", "O"]},
            {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]},
            {"tokens": ["Brusselsification", "of", "Unterschleissheim"], "ner_tags": ["B-LOC", "O", "B-LOC"]}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def dm(**kw):
        return TokenClassificationDataModule(tok, train_file=str(train), validation_file=str(train),
                                             batch_size=4, max_length=32, cache_dir=str(tmp_path / "cache"), **kw)

    assert dm().token_loss_divisor() == pytest.approx((4 + 2 + 3) / 3 * 4)
    subwords = sum(len(tok(r["tokens"], is_split_into_words=True, add_special_tokens=False)["input_ids"]) for r in rows)
    assert subwords > 9  # the long words split, so the two counts differ
    assert dm(label_all_subwords=True).token_loss_divisor() == pytest.approx(subwords / 3 * 4)
    assert dm(token_loss="batch_mean").token_loss_divisor() is None
    with pytest.raises(ConfigError, match="data.token_loss='sum' is not one of token_mean, batch_mean"):
        dm(token_loss="sum")


@pytest.mark.parametrize("weighting", ["token_mean", "batch_mean"])
def test_a_fit_uses_the_data_modules_divisor(weighting, tmp_path, tiny_model_dir):
    """Through the composed config: ``data=conll2003`` trains with the train split's divisor
    (the default), ``data.token_loss=batch_mean`` with none; the sequence task's data module is
    never given the key."""
    import lightning.pytorch as pl

    from sftlab.config import instantiate
    from sftlab.pretrained import load_tokenizer
    from sftlab.tasks import build_datamodule, build_module, task_of

    cfg = compose_config(["data=conll2003", f"data.token_loss={weighting}", "data.max_train_samples=32",
                          "data.max_eval_samples=16", *tiny_overrides(tmp_path / "run", tmp_path / "cache", tiny_model_dir)])
    task = task_of(cfg)
    tok = load_tokenizer(**cfg.model, split_into_words=True)
    dm = build_datamodule(cfg.data, task, tokenizer=tok)
    dm.setup()
    module = build_module(cfg.model, task, label_names=dm.label_names,
                          strategy=instantiate(cfg.strategy), optimizer=instantiate(cfg.optimizer))
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               limit_val_batches=0).fit(module, datamodule=dm)
    expected = dm.token_loss_divisor()
    assert module.loss_divisor == expected
    if weighting == "token_mean":
        assert expected is not None and math.isfinite(expected) and expected > cfg.data.batch_size
    else:
        assert expected is None
    # sequence classification's module is never given the key (data_config drops it)
    from sftlab.tasks import data_config, get_task

    assert "token_loss" not in data_config(compose_config(["data=local"]).data, get_task(None))
