"""An NER export, four ways: the stock transformers pipeline (``aggregation_strategy="simple"``),
the Python API, predict.py and serve.py agree on the entities of three sentences (type, span,
word, score), with character offsets into the input.

The model is a tiny BERT token classifier with wide random weights: it tags words with
entities of every kind, so the comparison sees many spans; agreement is about plumbing
(offsets, grouping, order of texts), not about the tags being right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, served

TAGS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
TEXTS = ["Peter Blackburn spoke to the European Commission in Brussels on Thursday.",
         "Shatskiku scored for Uzbekistan at the Asian Cup finals.",
         "Nothing much happened, said officials in New York."]


@pytest.fixture(scope="module")
def ner_export(tmp_path_factory) -> Path:
    """A run dir holding model/: a tiny random BertForTokenClassification, exported like a run."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from sftlab.deploy import export_model
    from sftlab.resolvers import embedded_model_path

    run = tmp_path_factory.mktemp("ner_export")
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    # seed and init chosen so that, in eval mode, all four entity types occur in TEXTS (with
    # smaller weights the random head tags nearly every word B-MISC)
    torch.manual_seed(1)
    model = BertForTokenClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=128, initializer_range=1.0, num_labels=len(TAGS)))
    metrics = {"test/f1": 0.5, "test/f1/PER": 0.7, "test/precision/PER": 0.6, "test/recall/PER": 0.8}
    export_model(model, tok, run / "model", config={"model": {"max_length": 32}, "data": {"task": "token_classification"}},
                 metrics=metrics, extra={"label_names": TAGS, "task": "token_classification"})
    return run


def pipeline_entities(model_dir: Path) -> list[list[dict]]:
    from transformers import pipeline

    pipe = pipeline("token-classification", model=str(model_dir), aggregation_strategy="simple")
    return [[{k: (float(e[k]) if k == "score" else e[k]) for k in ("entity_group", "word", "start", "end", "score")}
             for e in ents] for ents in pipe(TEXTS)]


def assert_same(records: list[dict], want: list[list[dict]]) -> None:
    assert [r["text"] for r in records] == TEXTS
    for rec, ents in zip(records, want, strict=True):
        got = rec["entities"]
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in got] == \
            [(e["entity_group"], e["start"], e["end"], e["word"]) for e in ents]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(got, ents, strict=True))


def test_pipeline_loads_the_export_and_the_api_agrees(ner_export):
    from sftlab import Classifier
    from sftlab.deploy import EntityTagger

    want = pipeline_entities(ner_export / "model")
    spans = [e for ents in want for e in ents]
    assert len(spans) >= 6 and len({e["entity_group"] for e in spans}) >= 3  # something to compare
    for text, ents in zip(TEXTS, want, strict=True):  # character offsets into the input
        for e in ents:
            assert 0 <= e["start"] < e["end"] <= len(text)
            assert text[e["start"]:e["end"]].lower().replace(" ", "") == e["word"].replace(" ", "")
    tagger = Classifier.load(ner_export)  # a run dir; the folder's head decides the class
    assert isinstance(tagger, EntityTagger) and tagger.labels == TAGS
    assert_same(tagger.predict(TEXTS), want)
    assert_same(tagger.predict(TEXTS, batch_size=1), want)
    card = (ner_export / "model" / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and "Task: token classification" in card
    assert "| PER | 0.6000 | 0.8000 | 0.7000 |" in card


def test_predict_cli_agrees_with_the_pipeline(ner_export, tmp_path):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "predict.py", f"model_dir={ner_export}", f"input={src}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same([json.loads(line) for line in proc.stdout.splitlines() if line.strip()],
                pipeline_entities(ner_export / "model"))


def test_serve_agrees_with_the_pipeline(ner_export):
    httpx = pytest.importorskip("httpx")
    with served(ner_export) as base:
        resp = httpx.post(f"{base}/predict", json={"texts": TEXTS}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert_same(resp.json()["predictions"], pipeline_entities(ner_export / "model"))
        assert httpx.get(f"{base}/labels", timeout=5).json()["labels"] == TAGS
        bad = httpx.post(f"{base}/predict", json={"texts": TEXTS, "top_k": 2}, timeout=60)
        assert bad.status_code == 422 and "top_k" in bad.json()["detail"]
