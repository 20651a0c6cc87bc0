"""Token-classification data: readers (JSONL/JSON/Parquet lists, CoNLL columns), the tag
scheme, the tag set, sub-word alignment and truncation, and bad inputs as one sentence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sftlab.data.tags import WHERE, map_tags, read_tagged, to_iob2
from sftlab.errors import ConfigError, DataError, SftlabError


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


SENTS = [
    (["Peter", "Blackburn", "visited", "Brussels"], ["B-PER", "I-PER", "O", "B-LOC"]),
    (["The", "European", "Commission", "said"], ["O", "B-ORG", "I-ORG", "O"]),
    (["Nothing", "here"], ["O", "O"]),
]


def conll_text(sents, docstart: bool = True) -> str:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for words, tags in sents:
        lines += [f"{w} NNP I-NP {t}" for w, t in zip(words, tags, strict=True)] + [""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- readers
def test_jsonl_and_conll_read_the_same_sentences(tmp_path):
    a = read_tagged(jsonl(tmp_path / "a.jsonl", [{"words": w, "labels": t} for w, t in SENTS]),
                    "train", "words", "labels")
    (tmp_path / "b.conll").write_text(conll_text(SENTS), encoding="utf-8")
    b = read_tagged(tmp_path / "b.conll", "train", "words", "labels")
    for df in (a, b):
        assert df["words"].tolist() == [w for w, _ in SENTS]
        assert df["labels"].tolist() == [t for _, t in SENTS]
    assert a[WHERE].tolist() == ["a.jsonl line 1", "a.jsonl line 2", "a.jsonl line 3"]
    # the sentence's first token line, after the -DOCSTART- line and the blank after it
    assert b[WHERE].tolist() == ["b.conll line 3", "b.conll line 8", "b.conll line 13"]


def test_json_parquet_and_a_chosen_conll_column(tmp_path):
    import pandas as pd

    rows = [{"tokens": w, "ner_tags": t} for w, t in SENTS]
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n".join(f"{w}\t{t}\tX" for w, t in zip(*SENTS[0], strict=True)) + "\n",
                                    encoding="utf-8")
    for name in ("a.json", "a.parquet"):
        df = read_tagged(tmp_path / name, "train")
        assert df["tokens"].tolist() == [w for w, _ in SENTS] and df["ner_tags"].tolist() == [t for _, t in SENTS]
    df = read_tagged(tmp_path / "a.txt", "train", tag_column=1)
    assert df["ner_tags"].tolist() == [SENTS[0][1]]


def test_integer_tags_are_named_by_label_names(tmp_path):
    names = ["O", "B-PER", "I-PER"]
    path = jsonl(tmp_path / "a.jsonl", [{"tokens": ["Ann", "Lee", "ran"], "ner_tags": [1, 2, 0]}])
    assert read_tagged(path, "train", tag_names=names)["ner_tags"].tolist() == [["B-PER", "I-PER", "O"]]
    with pytest.raises(DataError, match="integer tags; set data.label_names"):
        read_tagged(path, "train")


# ----------------------------------------------------------------------------- tag schemes
def test_iob1_and_bioes_become_iob2():
    iob1 = [["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], ["O", "I-ORG"]]
    assert to_iob2(iob1, ["l1", "l2"]) == [["B-PER", "I-PER", "O", "B-LOC", "B-LOC"], ["O", "B-ORG"]]
    bioes = [["B-PER", "E-PER", "O", "S-LOC"], ["B-ORG", "I-ORG", "E-ORG"]]
    assert to_iob2(bioes, ["l1", "l2"], "bioes") == [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    iob2 = [["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]]
    assert to_iob2(iob2, ["l1"], "iob2") == iob2


def test_stray_inside_tags_of_an_iob2_file_are_read_as_starts(caplog):
    # the hub's CoNLL-2003 has a few "O I-MISC": still IOB2 (B- follows O elsewhere)
    tags = [["O", "I-MISC", "B-PER", "I-PER"], ["B-LOC", "O"]]
    with caplog.at_level(logging.WARNING):
        assert to_iob2(tags, ["l1", "l2"], "iob2") == [["O", "B-MISC", "B-PER", "I-PER"], ["B-LOC", "O"]]
    assert "1 train tag(s) I-X start an entity" in caplog.text and "l1" in caplog.text


def test_declared_iob2_refuses_iob1_and_unknown_schemes_are_refused():
    with pytest.raises(DataError, match=r"IOB1, not IOB2 .*data.tag_scheme=auto"):
        to_iob2([["I-PER", "O", "I-LOC"]], ["f line 1"], "iob2")
    with pytest.raises(DataError, match=r"f line 3 has tag 'PERSON', which is in no tag scheme"):
        to_iob2([["O"], ["PERSON", "O"]], ["f line 1", "f line 3"])
    with pytest.raises(ConfigError, match="data.tag_scheme='bilou2'"):
        to_iob2([["O"]], ["x"], "bilou2")


def test_tag_set_from_train_and_unseen_tags(tmp_path):
    import pandas as pd

    def frame(tags, where):
        return pd.DataFrame({"ner_tags": tags, WHERE: where})

    raw = {"train": frame([["B-PER", "I-PER", "O"], ["B-LOC", "O"]], ["t1", "t2"]),
           "test": frame([["O", "B-LOC"]], ["x1"])}
    names, mapped = map_tags(raw, "ner_tags")
    assert names == ["O", "B-LOC", "B-PER", "I-PER"]  # O, then per type B-, I- (as on the hub)
    assert mapped["test"]["ner_tags"].tolist() == [[0, 1]]
    raw["test"] = frame([["O"], ["B-ORG"]], ["x1", "test.jsonl line 2"])
    with pytest.raises(DataError, match=r"test.jsonl line 2 \(test\) has tag 'B-ORG' never seen in train"):
        map_tags(raw, "ner_tags")
    with pytest.raises(DataError, match=r"'B-ORG' that the model does not know"):
        map_tags({"test": raw["test"]}, "ner_tags", names, names_from="the model")


# ----------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("case,text,match", [
    ("mismatch.jsonl", '{"tokens": ["a", "b"], "ner_tags": ["O"]}\n{"tokens": ["a", "b", "c"], "ner_tags": ["O"]}\n',
     r"mismatch.jsonl line 1 has 2 tokens but 1 tags"),
    ("notags.jsonl", '{"tokens": ["a"], "labels": ["O"]}\n', r"no field 'ner_tags' .*set data.tags_field"),
    ("onecol.conll", "EU B-ORG\nrejects O\n\nGerman\n", r"onecol.conll line 4 \('German'\) has 1 column"),
    ("empty.conll", "\n-DOCSTART- O\n\n", r"is empty \(no sentences\)"),
    ("empty.jsonl", "", r"is empty \(no sentences\)"),
    ("bad.jsonl", '{"tokens": ["a"], "ner_tags": ["O"]}\n{"tokens": \n', r"bad.jsonl line 2 is not valid JSON"),
    ("data.csv", "tokens,ner_tags\n", r"unknown extension '.csv'"),
])
def test_bad_files_are_one_sentence(tmp_path, case, text, match):
    path = tmp_path / case
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=match) as err:
        read_tagged(path, "train")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- alignment
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_dm(tokenizer, tmp_path, files: dict, **kw):
    from sftlab.data import TokenClassificationDataModule

    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("max_length", 32)
    return TokenClassificationDataModule(tokenizer, **{f"{s}_file": str(p) for s, p in files.items()}, **kw)


def test_first_subword_labelled_the_rest_ignored_or_inside(tokenizer, tmp_path):
    rows = [{"tokens": ["Shatskiku", "Krajicek", "visited", "Kolyvanov"], "ner_tags": ["B-PER", "I-PER", "O", "B-LOC"]},
            {"tokens": ["Commission", "said"], "ner_tags": ["B-ORG", "O"]}]
    files = {s: jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("train", "validation")}
    words = [tokenizer.tokenize(w) for w in rows[0]["tokens"]]
    # the test needs multi-piece words: a B- with an I- tag in the set, one without, an I-
    assert len(words[0]) > 1 and len(words[1]) > 1 and len(words[3]) > 1, words
    for all_subwords in (False, True):
        dm = make_dm(tokenizer, tmp_path / str(all_subwords), files, label_all_subwords=all_subwords)
        names = dm.label_names
        assert names == ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]
        dm.setup()
        row = dm.datasets["train"][0]
        ids = row["input_ids"].tolist()
        assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == [p for w in words for p in w]
        want, starts = [-100], [0]  # [CLS]
        for w, tag in zip(words, rows[0]["ner_tags"], strict=True):
            later = names.index("I-" + tag[2:]) if tag != "O" and "I-" + tag[2:] in names else names.index(tag)
            want += [names.index(tag)] + [later if all_subwords else -100] * (len(w) - 1)
            starts += [1] + [0] * (len(w) - 1)
        assert row["labels"].tolist() == want + [-100]
        assert row["word_starts"].tolist() == starts + [0]
    batch = next(iter(dm.val_dataloader()))  # padded: labels with -100, word_starts with 0
    short = int(batch["attention_mask"].sum(1).argmin())
    pad = batch["attention_mask"][short] == 0
    assert pad.any() and (batch["labels"][short][pad] == -100).all() and (batch["word_starts"][short][pad] == 0).all()


def test_truncation_is_one_counted_warning_also_from_the_cache(tiny_model_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    rows = [{"tokens": ["word"] * 40, "ner_tags": ["O"] * 40}, {"tokens": ["a", "b"], "ner_tags": ["O", "B-PER"]},
            {"tokens": ["x"] * 50, "ner_tags": ["O"] * 50}]
    files = {s: jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("train", "validation")}
    for _ in range(2):  # the second data module loads the tokenized splits from the cache
        caplog.clear()
        # a fresh tokenizer, as in a new run (tokenizing stores truncation settings in the
        # tokenizer's state, which its cache digest reads)
        dm = make_dm(AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path, files, max_length=16)
        with caplog.at_level(logging.WARNING):
            dm.setup()
        lines = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
        assert len(lines) == 2, lines  # one per split
        # 14 word positions fit between [CLS] and [SEP]: 26 + 36 words are cut
        assert lines[0].startswith("2 of 3 train sentences") and "(62 words cut in all" in lines[0]
    assert dm.cache_hit


def test_hub_and_pairs_are_refused(tokenizer, tmp_path):
    from sftlab.data import TokenClassificationDataModule

    with pytest.raises(SftlabError, match="reads local files"):
        TokenClassificationDataModule(tokenizer, hub_name="conll2003")
