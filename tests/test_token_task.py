"""Token classification end to end: ``python train.py data=conll2003 strategy=S debug=fast``
for every strategy (tiny BERT), its metrics against seqeval recomputed from the written
predictions, checkpoint selection on val/f1, CoNLL files through ``data=local``, and eval.py
on an NER run. Sequence classification's config is unchanged (val/acc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, tiny_overrides

STRATEGIES = ["full", "partial", "gradual", "discriminative", "discriminative_ulmfit", "head_only",
              "bitfit", "lora"]
TYPES = ("LOC", "MISC", "ORG", "PER")


def test_the_task_picks_the_checkpoint_metric():
    ner = compose_config(["data=conll2003"])
    assert ner.data.task == "token_classification"
    assert ner.callbacks.model_checkpoint.monitor == ner.callbacks.early_stopping.monitor == "val/f1"
    assert ner.callbacks.model_checkpoint.filename == "epoch{epoch:02d}-step{step}-val_f1{val/f1:.4f}"
    assert compose_config(["data=local", "data.task=token_classification"]).callbacks.model_checkpoint.monitor == "val/f1"
    clf = compose_config([])
    assert clf.callbacks.model_checkpoint.monitor == "val/acc"
    assert clf.callbacks.model_checkpoint.filename == "epoch{epoch:02d}-step{step}-val_acc{val/acc:.4f}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """``data=conll2003 strategy=S debug=fast`` per strategy, with the tiny BERT; name -> run dir."""
    import torch

    from sftlab.train import train

    root = tmp_path_factory.mktemp("ner_strategies")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_cli_strategies.py: a 32-wide model on a shared box
    try:
        for name in STRATEGIES:
            run = root / name
            overrides = ["data=conll2003", f"strategy={name}", "debug=fast",
                         *tiny_overrides(run, root / "cache", tiny_model_dir)]
            if name == "partial":
                overrides.append("strategy.trainable_layers=2")  # the tiny model has 2 blocks
            train(compose_config(overrides))
            out[name] = run
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_trains_ner(runs, name):
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["main_metric"] == "f1"
    for key in ("val/f1", "val/acc", "val/loss", "test/f1", "test/precision", "test/recall", "test/acc",
                *(f"test/f1/{t}" for t in TYPES)):
        assert key in metrics, key
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    # the best checkpoint is chosen on val/f1 and named after it
    assert "-val_f1" in Path(metrics["best_checkpoint"]).name
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(runs[name] / "model")  # LoRA merged too
    assert model.config.id2label[0] == "O" and len(model.config.id2label) == 9


def test_trainable_parameters_follow_the_strategy(runs):
    n = {s: json.loads((runs[s] / "metrics.json").read_text())["trainable_params"] for s in STRATEGIES}
    assert n["head_only"] < n["bitfit"] < n["full"] and n["head_only"] < n["lora"] < n["full"]
    assert n["head_only"] == 32 * 9 + 9  # the token head: a 32 -> 9 linear layer


def test_metrics_are_seqeval_of_the_written_predictions(runs):
    from seqeval.metrics import accuracy_score, classification_report, f1_score

    run = runs["full"]
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == list(range(32))  # every test sentence once, in file order
    # the gold tags are the file's (its sentences are short enough for max_length 64 but one)
    gold = [json.loads(line)["ner_tags"] for line in (ROOT / "data/conll2003/test.jsonl").open()][:32]
    whole = [i for i, r in enumerate(rows) if len(r["tags"]) == len(gold[i])]
    assert len(whole) >= 30 and all(rows[i]["tags"] == gold[i] for i in whole)
    true, pred = [r["tags"] for r in rows], [r["predicted"] for r in rows]
    assert metrics["test/f1"] == pytest.approx(f1_score(true, pred), abs=1e-6)
    assert metrics["test/acc"] == pytest.approx(accuracy_score(true, pred), abs=1e-6)
    report = classification_report(true, pred, output_dict=True, zero_division=0)
    for t in TYPES:
        assert metrics[f"test/f1/{t}"] == pytest.approx(report[t]["f1-score"], abs=1e-6)
    card = (run / "model" / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and "Per entity type" in card
    assert "`B-PER`" in card and "| PER |" in card


def test_tag_metrics_by_hand():
    from sftlab.tasks.token_classification import tag_metrics

    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    m = tag_metrics(true, pred)
    # entities: gold PER, LOC, ORG; predicted PER, ORG, LOC(wrong place) -> 2 of 3 each way
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["acc"] == pytest.approx(4 / 6)
    assert m["f1/LOC"] == 0 and m["f1/PER"] == m["f1/ORG"] == 1


def test_local_conll_file_trains_and_eval_scores_a_new_file(tmp_path, tiny_model_dir):
    from sftlab.train import train

    src = [json.loads(line) for line in (ROOT / "data/conll2003/train.jsonl").open()][:80]

    def conll(rows, path):
        lines = ["-DOCSTART- -X- O", ""]
        for r in rows:
            lines += [f"{w} X {t}" for w, t in zip(r["tokens"], r["ner_tags"], strict=True)] + [""]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    files = {"train": conll(src[:48], tmp_path / "train.conll"), "validation": conll(src[48:64], tmp_path / "dev.txt")}
    run = tmp_path / "run"
    train(compose_config(["data=local", "data.task=token_classification", f"data.train_file={files['train']}",
                          f"data.validation_file={files['validation']}", "trainer.max_epochs=1",
                          "model.max_length=64", "data.batch_size=8",
                          *tiny_overrides(run, tmp_path / "cache", tiny_model_dir)]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/f1" in metrics and "test/f1" not in metrics  # no test file given

    # the README's command on an NER run: a JSONL file of its own; labels from the model
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps(r) + "\n" for r in src[64:80]), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFTLAB_ROOT": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "model_dir=run", "data=local",
                           "data.test_file=new.jsonl"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "outputs" / "eval" / "runs").iterdir()
    scored = json.loads((out / "metrics.json").read_text())
    assert {"test/f1", "test/precision", "test/recall", "test/acc"} <= set(scored)

    # a tag the model does not know: one sentence, exit code 2
    new.write_text(json.dumps({"tokens": ["Mars"], "ner_tags": ["B-PLANET"]}) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "model_dir=run", "data=local",
                           "data.test_file=new.jsonl"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "'B-PLANET' that the model does not know" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- bad input, CLI
GOOD = ('{"tokens": ["EU", "rejects", "German", "call"], "ner_tags": ["B-ORG", "O", "B-MISC", "O"]}\n'
        '{"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]}\n')


def _ner_case(name, files, overrides, pattern, slow=True):
    return pytest.param(files, overrides, pattern, id=name, marks=pytest.mark.slow if slow else ())


# Each: the files written (name -> text; train.* is also the validation file), the overrides,
# the one sentence expected. Each process stops while reading the data, ~10 s of imports
# (the scheme option before torch loads, ~1 s); one file case and the option case run in the
# default set, the others are marked slow.
BAD_NER = [
    _ner_case("no_tag_column", {"train.conll": "EU B-ORG\nrejects O\n\nGerman\ncall O\n"}, [],
              r"^error: train\.conll line 4 \('German'\) has 1 column\(s\) but the tag is read from "
              r"column -1 \(data\.tag_column\)"),
    _ner_case("no_tags_field", {"train.jsonl": '{"tokens": ["EU", "rejects"], "labels": ["B-ORG", "O"]}\n'}, [],
              r"^error: train\.jsonl line 1 has no field 'ner_tags' \(fields: tokens, labels\); set "
              r"data\.tags_field to the field that holds the tags\.$"),
    _ner_case("count_mismatch", {"train.jsonl": GOOD + '{"tokens": ["a", "b", "c"], "ner_tags": ["O"]}\n'}, [],
              r"^error: train\.jsonl line 3 has 3 tokens but 1 tags; each token needs exactly one tag\.$",
              slow=False),
    _ner_case("unknown_scheme_option", {"train.jsonl": GOOD}, ["data.tag_scheme=bilou"],
              r"^error: data\.tag_scheme='bilou' is not one of auto, iob2, iob1, bioes\.$", slow=False),
    _ner_case("tags_in_no_scheme", {"train.jsonl": '{"tokens": ["EU", "rejects"], "ner_tags": ["ORG", "O"]}\n'},
              [], r"^error: train\.jsonl line 1 has tag 'ORG', which is in no tag scheme sftlab knows; use IOB2"),
    _ner_case("test_tag_unseen_in_train",
              {"train.jsonl": GOOD, "test.jsonl": '{"tokens": ["Mars"], "ner_tags": ["B-PLANET"]}\n'}, [],
              r"^error: test\.jsonl line 1 \(test\) has tag 'B-PLANET' never seen in train \(known: O, "
              r"B-MISC, B-ORG, B-PER, I-PER\); fix the data or list every tag in data\.label_names\.$"),
    _ner_case("empty_file", {"train.jsonl": ""}, [],
              r"^error: The train file '.*train\.jsonl' is empty \(no sentences\); give a file with at "
              r"least one tagged sentence\.$"),
]


@pytest.mark.parametrize("files, overrides, pattern", BAD_NER)
def test_bad_ner_input_is_one_sentence_through_the_cli(files, overrides, pattern, tmp_path, tiny_model_dir):
    """``python train.py data=local data.task=token_classification ...`` with a bad file or
    option: exit code 2, one ``error:`` sentence on stderr, no traceback, nothing trained."""
    import re

    args = ["data=local", "data.task=token_classification", f"model.name_or_path={tiny_model_dir}",
            "trainer.accelerator=cpu", *overrides]
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        split = name.split(".")[0]
        args += [f"data.{split}_file={name}"] + (["data.validation_file=" + name] if split == "train" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFTLAB_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))
