"""model.pooling: auto keeps the stock (exportable) head; cls/mean/last are computed by us,
carried by the export and honoured by sftlab's predictor."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sftlab.errors import ConfigError  # noqa: E402
from sftlab.pooling import declared_pooling, native_pooling, pool, resolve_pooling  # noqa: E402
from tests.test_layers import tiny_model  # noqa: E402


def test_pool_on_hand_made_states():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # right padding
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])  # left padding
    torch.testing.assert_close(pool(hidden, right, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, right, "mean"),
                               torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]))
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    torch.testing.assert_close(pool(hidden, left, "last"), hidden[:, 3])
    torch.testing.assert_close(pool(hidden, left, "mean"),
                               torch.stack([hidden[0, 1:].mean(0), hidden[1, 2:].mean(0)]))


@pytest.mark.parametrize(("arch", "native"), [("bert", "pooler"), ("gpt2", "last"), ("xlnet", "last"),
                                              ("roberta", "cls"), ("distilbert", "cls")])
def test_native_pooling_per_architecture(arch, native):
    model = tiny_model(arch)
    assert native_pooling(model) == native
    assert resolve_pooling(model, "auto") is None  # auto: the stock head runs untouched
    assert resolve_pooling(model, native) is None


def test_declared_pooling_of_a_sentence_transformers_folder(tmp_path):
    from sftlab.resolvers import embedded_model_path

    assert declared_pooling(embedded_model_path()) == "mean"  # all-MiniLM-L6-v2
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert declared_pooling(tmp_path) == "cls"
    assert declared_pooling(tmp_path / "nowhere") is None
    assert declared_pooling("bert-base-uncased") is None


@pytest.mark.parametrize("mode", ["cls", "mean", "last"])
def test_bert_pooled_logits_are_the_linear_head_on_the_pooled_vector(mode):
    from sftlab.model import TextClassifier

    model = tiny_model("bert")
    module = TextClassifier("tiny", ["a", "b", "c"], model=model, pooling=mode).eval()
    assert module.pooling == mode
    assert model.bert.pooler is None  # bypassed, so removed (no gradient-less parameters)
    assert model.config.sftlab_pooling == mode  # what the export carries
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        got = module({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])})
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        vec = {"cls": hidden[:, 0],
               "mean": torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)]),
               "last": torch.stack([hidden[0, 4], hidden[1, 2]])}[mode]
        want = model.classifier(vec)
    torch.testing.assert_close(got, want)


def test_gpt2_mean_pooling_feeds_the_score_layer():
    from sftlab.model import TextClassifier

    model = tiny_model("gpt2")
    module = TextClassifier("tiny", ["a", "b", "c"], model=model, pooling="mean", max_length=32).eval()
    ids = torch.tensor([[5, 6, 7], [8, 9, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model.score(torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)]))
        torch.testing.assert_close(module({"input_ids": ids, "attention_mask": mask}), want)


@pytest.mark.parametrize(("arch", "mode", "words"), [
    ("gpt2", "pooler", "has no pooler"),
    ("roberta", "mean", "own pooling head"),
    ("bert", "max", "not one of"),
])
def test_poolings_a_model_cannot_do_are_one_sentence(arch, mode, words):
    with pytest.raises(ConfigError, match=words):
        resolve_pooling(tiny_model(arch), mode)


def test_mean_pooling_trains_exports_and_predicts_like_the_run(compose, tmp_path):
    """A mean-pooled run: the pooler is not trained, the export records the pooling and
    sftlab's Classifier reproduces the run's test probabilities."""
    import csv

    from sftlab.deploy import Classifier
    from sftlab.train import train

    cfg = compose("model.pooling=mean", out=tmp_path / "run")
    train(cfg)
    run = tmp_path / "run"
    exported = json.loads((run / "model" / "config.json").read_text())
    assert exported["sftlab_pooling"] == "mean"
    assert "## Pooling" in (run / "model" / "README.md").read_text()
    with open(run / "test_predictions.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(cfg.data.test_file, encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    clf = Classifier.load(run / "model")
    assert clf.pooling == "mean"
    probs = clf.predict_proba([texts[int(r["idx"])] for r in rows])
    prob_cols = [k for k in rows[0] if k.startswith("p_")]
    want = torch.tensor([[float(r[k]) for k in prob_cols] for r in rows])
    torch.testing.assert_close(torch.from_numpy(probs), want, atol=1e-4, rtol=1e-3)
