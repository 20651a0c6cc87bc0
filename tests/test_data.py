"""The data room: reading, label mapping, validation carving, caching and batching."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import write_rows

from sftlab.data import LengthGroupedBatchSampler, TextClassificationDataModule
from sftlab.data.read import read_table
from sftlab.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_dm(tokenizer, tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("max_length", 32)
    return TextClassificationDataModule(tokenizer, **kw)


def test_ag_news_labels_and_batches(tokenizer, tiny_data, tmp_path):
    dm = make_dm(tokenizer, tmp_path, train_file=str(tiny_data["train"]),
                 validation_file=str(tiny_data["validation"]), test_file=str(tiny_data["test"]),
                 label_names=["World", "Sports", "Business", "Sci/Tech"], batch_size=8)
    assert dm.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    dm.setup()
    # each split holds its own file's rows, in file order: texts (as tokens) and labels
    for split in ("train", "validation", "test"):
        with open(tiny_data[split], encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        ds = dm.datasets[split]
        assert len(ds) == len(rows) == {"train": 48, "validation": 24, "test": 24}[split], split
        assert [int(i) for i in ds["idx"]] == list(range(len(rows)))
        assert [int(y) for y in ds["labels"]] == [int(r["label"]) for r in rows], split
        expected = tokenizer([r["text"] for r in rows], truncation=True, max_length=32)["input_ids"]
        assert [x.tolist() for x in ds["input_ids"]] == expected, split
    batches = list(dm.train_dataloader())
    seen = sorted(i for b in batches for i in b["idx"].tolist())
    assert seen == list(range(48))  # every example once per epoch
    b = batches[0]
    # padded per batch to its longest member, never beyond max_length
    assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max()) <= 32
    assert set(b["labels"].tolist()) <= {0, 1, 2, 3}


def test_string_labels_tsv_and_carved_validation(tokenizer, tmp_path):
    rows = [{"sentence": f"text number {i} " + ("good" if i % 2 else "bad"),
             "label": "pos" if i % 2 else "neg"} for i in range(40)]
    train = write_rows(tmp_path / "train.tsv", rows, delimiter="\t")
    dm = make_dm(tokenizer, tmp_path, train_file=str(train), text_field="sentence",
                 val_fraction=0.25, seed=3)
    assert dm.label_names == ["neg", "pos"]  # sorted, saved with the model as id2label
    dm.setup()
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["validation"]) == 10
    val_labels = [int(x) for x in dm.datasets["validation"]["labels"]]
    assert val_labels.count(0) == val_labels.count(1) == 5  # stratified
    # carving is seeded: the same seed carves the same rows
    dm2 = make_dm(tokenizer, tmp_path / "other", train_file=str(train), text_field="sentence",
                  val_fraction=0.25, seed=3)
    dm2.setup()
    assert [int(i) for i in dm2.datasets["validation"]["idx"]] == [int(i) for i in dm.datasets["validation"]["idx"]]


def test_second_identical_setup_hits_the_cache(tokenizer, tiny_data, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    kw = dict(train_file=str(tiny_data["train"]), validation_file=str(tiny_data["validation"]))
    first = make_dm(tokenizer, tmp_path, **kw)
    first.setup()
    assert first.cache_hit is False
    # a fresh tokenizer, as a new run has: every split hits (tokenizing train once stored the
    # truncation settings in the tokenizer, which used to change the key of validation)
    second = make_dm(AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path, **kw)
    second.setup()
    assert second.cache_hit is True
    assert second.datasets["train"][0]["input_ids"].tolist() == first.datasets["train"][0]["input_ids"].tolist()
    # anything that changes the tokens changes the key
    third = make_dm(tokenizer, tmp_path, max_length=16, **kw)
    third.setup()
    assert third.cache_hit is False


def test_a_fresh_process_hits_what_a_tokenizing_one_wrote(tiny_model_dir, tiny_data, tmp_path):
    """Tokenizing sets the fast tokenizer's truncation state; the keys must not depend on it, or
    a process that tokenized train (a miss) keys validation differently than a fresh process."""
    from transformers import AutoTokenizer

    kw = dict(train_file=str(tiny_data["train"]), validation_file=str(tiny_data["validation"]),
              test_file=str(tiny_data["test"]))
    first = make_dm(AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path, max_length=24, **kw)
    first.setup()
    assert first.cache_hit is False
    fresh = make_dm(AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path, max_length=24, **kw)
    assert [fresh.fingerprint(s) for s in ("train", "validation", "test")] == [
        first.fingerprint(s) for s in ("train", "validation", "test")]
    fresh.setup()
    assert fresh.cache_hit is True


@pytest.mark.parametrize("labels", ["ints", "names"])
def test_jsonl_and_parquet_read_the_same_rows_as_csv(tokenizer, tmp_path, labels):
    import pandas as pd

    names = ["eel", "cat", "dog"]  # unsorted: ids come from the sorted names
    texts = [f'Row {i}, "quoted", É{"!" * i}' for i in range(12)]
    label_col = [i % 3 if labels == "ints" else names[i % 3] for i in range(12)]
    df = pd.DataFrame({"text": texts, "label": label_col})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True, force_ascii=False)
    df.to_parquet(tmp_path / "d.parquet")
    label_names = ["0", "1", "2"] if labels == "ints" else sorted(names)
    ids = [label_names.index(str(v)) for v in label_col]
    expected = tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    for name in ("d.csv", "d.jsonl", "d.parquet"):
        path = str(tmp_path / name)
        raw = read_table(path, "train")  # the exact texts and labels (tokens are lower-cased)
        assert raw["text"].tolist() == texts, name
        assert [str(v) for v in raw["label"]] == [str(v) for v in label_col], name
        dm = make_dm(tokenizer, tmp_path / f"for_{name}", train_file=path, validation_file=path,
                     test_file=path)
        assert dm.label_names == label_names, name
        dm.setup()
        for split in ("train", "validation", "test"):
            ds = dm.datasets[split]
            assert [int(y) for y in ds["labels"]] == ids, (name, split)
            assert [x.tolist() for x in ds["input_ids"]] == expected, (name, split)
            assert tokenizer.decode(ds["input_ids"][5], skip_special_tokens=True) == \
                tokenizer.decode(expected[5], skip_special_tokens=True)


@pytest.mark.parametrize(
    "rows, kw, message",
    [
        ([{"text": "a", "label": 0}, {"text": "b", "label": 7}], {"label_names": ["x", "y"]}, "label 7"),
        ([{"txt": "a", "label": 0}, {"txt": "b", "label": 1}], {}, "no column 'text'"),
        ([{"text": "a", "label": 0}, {"text": " ", "label": 1}], {}, "1 empty or null texts"),
    ],
)
def test_bad_data_is_one_sentence(tokenizer, tmp_path, rows, kw, message):
    path = write_rows(tmp_path / "t.csv", rows)
    with pytest.raises(DataError, match=message):
        _ = make_dm(tokenizer, tmp_path, train_file=str(path), validation_file=str(path), **kw).label_names


def test_sampler_groups_by_length_and_shards_ranks():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000)
    grouped = LengthGroupedBatchSampler(lengths, 16, shuffle=True, group_by_length=True, seed=1)
    plain = LengthGroupedBatchSampler(lengths, 16, shuffle=True, group_by_length=False, seed=1)

    def padded(sampler):
        return sum(len(b) * lengths[b].max() for b in sampler)

    assert padded(grouped) < 0.8 * padded(plain)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    grouped.set_epoch(1)
    assert list(grouped)[0] != list(LengthGroupedBatchSampler(lengths, 16, shuffle=True, seed=1))[0]
    # two training ranks: equal step counts, together covering everything
    ranks = [list(LengthGroupedBatchSampler(lengths, 16, shuffle=True, seed=1, num_replicas=2, rank=r))
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(LengthGroupedBatchSampler(lengths, 16, shuffle=True, num_replicas=2))
    assert set().union(*[set(i for b in r for i in b) for r in ranks]) == set(range(1000))
    # evaluation: no example counted twice across ranks
    ev = [list(LengthGroupedBatchSampler(lengths, 64, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    flat = [i for r in ev for b in r for i in b]
    assert sorted(flat) == list(range(1000))


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_like_the_hf_collator(tokenizer, tmp_path, side):
    """Our tensor padding gives exactly DataCollatorWithPadding's batch (pairs, both sides)."""
    import copy

    import torch
    from transformers import DataCollatorWithPadding

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = side
    rows = [{"a": "short " * (1 + i % 7), "b": "the other half " * (1 + i % 3), "label": i % 2} for i in range(20)]
    dm = make_dm(tok, tmp_path, train_file=str(write_rows(tmp_path / "t.csv", rows)), text_field="a",
                 text_pair_field="b", val_fraction=0.2)
    dm.setup()
    ds = dm.datasets["train"]
    features = ds.__getitems__(list(range(9)))  # what the DataLoader hands to collate_fn
    assert len({len(f["input_ids"]) for f in features}) > 1  # really ragged
    ours, hf = dm.collate(features), DataCollatorWithPadding(tok)(features)
    assert set(ours) == set(hf) >= {"input_ids", "token_type_ids", "attention_mask", "labels", "idx"}
    for key in hf:
        assert ours[key].dtype == hf[key].dtype and torch.equal(ours[key], hf[key]), key
    pad_col = 0 if side == "left" else -1  # the shortest row is padded on the tokenizer's side
    shortest = int(ours["attention_mask"].sum(1).argmin())
    assert ours["attention_mask"][shortest, pad_col] == 0
    assert ours["input_ids"][shortest, pad_col] == tok.pad_token_id


def test_collate_without_pad_token_defers_to_hf(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    dm = make_dm(tok, tmp_path, train_file=str(write_rows(
        tmp_path / "t.csv", [{"text": "word " * (1 + i), "label": i % 2} for i in range(10)])))
    dm.setup()
    features = dm.datasets["train"].__getitems__([0, 1, 2])
    tok.pad_token = None  # the HF collator's own error, not a silent pad id
    with pytest.raises(ValueError, match="pad"):
        dm.collate(features)
