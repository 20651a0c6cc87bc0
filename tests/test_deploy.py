"""After a training run, every way to use the model predicts what the test pass predicted.

The four ways (Python API, predict.py, the HF pipeline, serve.py over HTTP) are compared with
``test_predictions.csv``, which the training run wrote during its test pass: same labels and
probabilities within 1e-4 (fp32).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_data):
    """A tiny run trained with the same code path as `python train.py debug=fast`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sftlab.train import train

    out = tmp_path_factory.mktemp("deploy") / "run"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "debug=fast", f"paths.output_dir={out}", f"hydra.run.dir={out}",
            f"paths.cache_dir={out.parent / 'cache'}", f"model.name_or_path={tiny_model_dir}",
            f"data.train_file={tiny_data['train']}", f"data.validation_file={tiny_data['validation']}",
            f"data.test_file={tiny_data['test']}", "model.max_length=32", "optimizer.lr=1e-3",
            "trainer.precision=32-true", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
        ])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    train(cfg)
    GlobalHydra.instance().clear()
    with open(tiny_data["test"], encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    with open(out / "test_predictions.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels = [c[2:] for c in rows[0] if c.startswith("p_")]
    expected = [[float(r[f"p_{n}"]) for n in labels] for r in sorted(rows, key=lambda r: int(r["idx"]))]
    return out, texts, labels, expected


def close(probs: list[list[float]], expected: list[list[float]]) -> None:
    assert len(probs) == len(expected)
    for got, want in zip(probs, expected, strict=True):
        assert max(range(len(got)), key=got.__getitem__) == max(range(len(want)), key=want.__getitem__)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


def test_python_api_and_pipeline_agree_with_the_test_pass(trained):
    from transformers import pipeline

    from sftlab import Classifier

    run, texts, labels, expected = trained
    clf = Classifier.load(run)
    assert clf.labels == labels
    close([[r["probabilities"][n] for n in labels] for r in clf.predict(texts)], expected)
    pipe = pipeline("text-classification", model=str(run / "model"), top_k=None,
                    truncation=True, max_length=32)
    out = pipe(texts, batch_size=8)
    close([[{d["label"]: d["score"] for d in row}[n] for n in labels] for row in out], expected)


def test_predict_cli_agrees_with_the_test_pass(trained, tmp_path):
    run, texts, labels, expected = trained
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "predict.py", f"model_dir={run}", f"input={src}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["text"] for r in recs] == texts
    close([[r["probabilities"][n] for n in labels] for r in recs], expected)


def test_serve_agrees_with_the_test_pass(trained):
    import socket

    run, texts, labels, expected = trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "serve.py", f"model_dir={run}", f"port={port}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "serve.py exited"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve.py did not come up"
            time.sleep(0.25)
        resp = httpx.post(f"{base}/predict", json={"texts": texts}, timeout=60)
        assert resp.status_code == 200
        preds = resp.json()["predictions"]
        close([[p["probabilities"][n] for n in labels] for p in preds], expected)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
