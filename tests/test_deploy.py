"""After a training run, every way to use the model predicts what the test pass predicted.

The four ways (Python API, predict.py, the HF pipeline, serve.py over HTTP) are compared with
``test_predictions.csv``, which the training run wrote during its test pass, row by row in the
test file's order: same label and probabilities within 1e-4 (fp32). The run is ``toy_run``
(conftest.py): a tiny BERT trained until it separates a keyword task, so its labels differ
between rows (all four classes occur) and a path that returned rows out of order, or named the
classes wrongly, fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, assert_rows_agree, served


def records_agree(labels: list[str], recs: list[dict], want) -> None:
    """sftlab records (Classifier, predict.py, serve.py) against the test pass."""
    assert_rows_agree(labels, [r["label"] for r in recs],
                      [[r["probabilities"][n] for n in want.labels] for r in recs], want)
    assert all(r["label"] == labels[r["label_id"]] for r in recs)


def test_python_api_and_pipeline_agree_with_the_test_pass(toy_run):
    from transformers import pipeline

    from sftlab import Classifier

    run, texts = toy_run.run, toy_run.texts
    clf = Classifier.load(run)
    records_agree(clf.labels, clf.predict(texts), toy_run)
    records_agree(clf.labels, clf.predict(texts, batch_size=5), toy_run)  # several length buckets
    pipe = pipeline("text-classification", model=str(run / "model"), top_k=None,
                    truncation=True, max_length=32)
    out = [{d["label"]: d["score"] for d in row} for row in pipe(texts, batch_size=8)]
    id2label = pipe.model.config.id2label
    assert_rows_agree([id2label[i] for i in range(len(id2label))], [max(row, key=row.get) for row in out],
                      [[row[n] for n in toy_run.labels] for row in out], toy_run)


def test_predict_cli_agrees_with_the_test_pass(toy_run, tmp_path):
    run, texts = toy_run.run, toy_run.texts
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "predict.py", f"model_dir={run}", f"input={src}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["text"] for r in recs] == texts
    records_agree(list(recs[0]["probabilities"]), recs, toy_run)


def test_serve_agrees_with_the_test_pass(toy_run):
    httpx = pytest.importorskip("httpx")  # only this test needs it

    run, texts = toy_run.run, toy_run.texts
    with served(run) as base:
        resp = httpx.post(f"{base}/predict", json={"texts": texts}, timeout=60)
        assert resp.status_code == 200
        preds = resp.json()["predictions"]
        labels = httpx.get(f"{base}/labels", timeout=5).json()["labels"]
        records_agree(labels, preds, toy_run)
