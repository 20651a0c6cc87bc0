"""export_model writes a folder that plain transformers loads, and Classifier predicts like it.

The model is a tiny random BERT with the embedded tokenizer. Its weights are initialised wide
(initializer_range=0.3) so that texts get different labels with clear margins: label equality
with the HF pipeline then means something, and is not decided by float noise.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from conftest import LABELS, build_tiny_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "model": {"name_or_path": "prajjwal1/bert-tiny", "max_length": 48, "pad_token_from_eos": False},
    "data": {"_target_": "sftlab.data.TextClassificationDataModule", "train_file": "/x/train.csv",
             "test_file": "/x/test.csv", "text_field": "text", "batch_size": 16},
    "strategy": {"_target_": "sftlab.strategies.Discriminative", "name": "discriminative",
                 "decay": 0.9},
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3e-5, "weight_decay": 0.01},
    "scheduler": {"_target_": "sftlab.optim.build_scheduler", "name": "linear", "warmup_ratio": 0.1},
    "trainer": {"max_epochs": 2, "precision": "32-true"},
    "seed": 7,
    "logger": {"wandb": {"api_key": "xxx", "project": "sftlab"}},
    "hub": {"hf_token": "hf_secret", "password": "p"},
}
METRICS = {
    "val/acc": 0.81, "val/f1_macro": 0.8, "test/acc": 0.79, "test/f1_macro": 0.78,
    "test/f1/World": 0.9, "test/f1/Sports": 0.95, "test/f1/Business": 0.6, "test/f1/Sci_Tech": 0.67,
    "test/precision/World": 0.88, "strategy": "discriminative", "train_time_s": 1.5,
}


def ag_news_texts(n: int) -> list[str]:
    with open(ROOT / "data" / "ag_news" / "test.csv", encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)][:n]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return build_tiny_export(tmp_path_factory.mktemp("export") / "model", config=CONFIG,
                             metrics=METRICS)


def test_folder_contents(exported):
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "sftlab_config.yaml", "metrics.json", "README.md"} <= files
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert cfg["label2id"] == {name: i for i, name in enumerate(LABELS)}
    assert json.loads((exported / "metrics.json").read_text())["test/acc"] == 0.79


def test_config_drops_secrets(exported):
    import yaml

    text = (exported / "sftlab_config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert "api_key" not in saved["logger"]["wandb"] and saved["logger"]["wandb"]["project"] == "sftlab"
    assert saved["hub"] == {}
    assert "xxx" not in text and "hf_secret" not in text
    # keys that merely mention tokens are configuration, not credentials
    assert saved["model"] == CONFIG["model"]
    assert saved["optimizer"]["lr"] == 3e-5


def test_model_card(exported):
    import yaml

    card = (exported / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-classification"
    assert front["base_model"] == "prajjwal1/bert-tiny"
    assert "discriminative" in front["tags"] and front["metrics"]
    for section in ("## Base model", "## Data", "## Strategy", "## Hyperparameters", "## Results",
                    "### Per-class (test)", "## How to use"):
        assert section in card
    assert "| acc | 0.8100 | 0.7900 |" in card
    assert "| Sci/Tech |" in card and "0.6700" in card  # per-class key Sci_Tech -> label Sci/Tech
    assert "| learning rate | `3e-05` |" in card and "| seed | `7` |" in card
    assert "Classifier.load" in card and "python predict.py" in card and 'pipeline("text-classification"' in card


def test_minimal_export_without_config_or_metrics(tmp_path):
    out = build_tiny_export(tmp_path / "bare", config=None)
    assert not (out / "sftlab_config.yaml").exists() and not (out / "metrics.json").exists()
    card = (out / "README.md").read_text()
    assert "No metrics were recorded" in card and "base_model" not in card


def test_classifier_matches_transformers(exported):
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, pipeline

    from sftlab import Classifier

    texts = ag_news_texts(24)
    clf = Classifier.load(exported)
    assert clf.labels == LABELS and clf.max_length == 48
    preds = clf.predict(texts, batch_size=8)
    assert len({p["label"] for p in preds}) > 1, "the fixture should give varied labels"

    pipe = pipeline("text-classification", model=str(exported), top_k=None, device="cpu")
    hf = pipe(texts, truncation=True, max_length=48, batch_size=4)
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    enc = clf.tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = model(**enc).logits.softmax(-1).numpy()
    for p, h, d in zip(preds, hf, direct, strict=True):
        scores = {x["label"]: x["score"] for x in h}
        assert p["label"] == h[0]["label"] == LABELS[int(d.argmax())]
        assert p["label_id"] == LABELS.index(p["label"])
        assert p["score"] == max(p["probabilities"].values())
        for name in LABELS:
            assert abs(p["probabilities"][name] - scores[name]) < 1e-4
        assert np.allclose([p["probabilities"][n] for n in LABELS], d, atol=1e-4)
    proba = clf.predict_proba(texts)
    assert proba.shape == (24, 4) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_order_preserved_with_length_sorting(exported):
    import numpy as np

    from sftlab.deploy import Classifier

    base = ag_news_texts(12)
    rng = random.Random(3)
    texts = [t[: rng.randint(1, len(t))] for t in base] + ["x", "a " * 200]
    rng.shuffle(texts)
    clf = Classifier.load(exported)
    batched = clf.predict_proba(texts, batch_size=3)
    one_by_one = np.stack([clf.predict_proba([t], batch_size=1)[0] for t in texts])
    assert np.allclose(batched, one_by_one, atol=1e-5)


def test_classifier_api_details(exported, tmp_path):
    from sftlab.deploy import Classifier
    from sftlab.errors import SftlabError

    run = tmp_path / "run"
    shutil.copytree(exported, run / "model")
    clf = Classifier.load(run)  # a run dir holding model/
    one = clf("Stocks rallied on Wall Street.")  # a single string, __call__
    assert len(one) == 1 and set(one[0]) == {"label", "label_id", "score", "probabilities"}
    assert clf.predict([]) == [] and clf.predict_proba([]).shape == (0, 4)
    rec = clf.predict(["Stocks rallied."], top_k=2)[0]
    assert len(rec["top_k"]) == 2 and rec["top_k"][0] == (rec["label"], rec["score"])
    assert rec["top_k"][0][1] >= rec["top_k"][1][1]
    with pytest.raises(SftlabError, match="does not exist"):
        Classifier.load(tmp_path / "nowhere")
    with pytest.raises(SftlabError, match="no config.json"):
        Classifier.load(tmp_path)
    with pytest.raises(SftlabError, match="precision"):
        Classifier.load(run, precision="fp8")
    with pytest.raises(SftlabError, match="not a string"):
        clf.predict(["ok", 3])


def test_bf16_runs_in_bf16_and_is_close(exported):
    """bf16 really computes in bfloat16 (every Linear's output, seen by a forward hook), so its
    probabilities move, by float noise only; fp32 stays float32 throughout."""
    import torch

    from sftlab.deploy import Classifier

    def probs_and_dtypes(precision: str):
        clf = Classifier.load(exported, precision=precision)
        seen = []
        for m in clf.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        return clf.predict_proba(texts), set(seen), len(seen)

    texts = ag_news_texts(8)
    fp32, fp32_dtypes, n32 = probs_and_dtypes("fp32")
    bf16, bf16_dtypes, n16 = probs_and_dtypes("bf16")
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert n32 == n16 > 0  # the same forwards, the head included
    assert fp32.dtype == bf16.dtype == "float32"  # the probabilities come back as float32
    diff = abs(fp32 - bf16).max()
    assert 1e-5 < diff < 0.05, diff


def test_deploy_does_not_import_lightning():
    """A deployed model needs torch and transformers only: the deploy package stays off Lightning."""
    import subprocess
    import sys

    code = ("import sys, sftlab.deploy, sftlab.deploy.predict, sftlab.deploy.serve; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
