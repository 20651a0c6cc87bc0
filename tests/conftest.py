"""Shared fixtures: tiny data, a tiny model folder, and configs composed the way train.py does.

Tests never touch the network (HF_HUB_OFFLINE=1) and never write outside ``tmp_path``: the
composed config points ``paths.output_dir`` and ``paths.cache_dir`` into it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import sftlab  # noqa: E402,F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
AG_NEWS = ROOT / "data" / "ag_news"


def write_rows(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


LABELS = ["World", "Sports", "Business", "Sci/Tech"]


TINY_CONFIG = {"model": {"max_length": 32}}


def build_tiny_export(out: Path, config: dict | None = TINY_CONFIG, metrics: dict | None = None) -> Path:
    """A tiny random BERT exported with ``export_model``, as a trained run would leave it.

    Weights are initialised wide (initializer_range=0.3) so that texts get different labels
    with clear margins: label agreement between two code paths then means something.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sftlab.deploy import export_model
    from sftlab.resolvers import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=128, initializer_range=0.3, num_labels=4,
    )
    model = BertForSequenceClassification(cfg)
    return export_model(model, tok, out, config=config,
                        metrics=metrics, extra={"label_names": LABELS})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """48 / 24 / 24 rows of the shipped AG News sample (all four classes in each split)."""
    out = tmp_path_factory.mktemp("tiny_ag_news")
    files = {}
    for split, n in (("train", 48), ("validation", 24), ("test", 24)):
        with open(AG_NEWS / f"{split}.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))[:n]
        files[split] = write_rows(out / f"{split}.csv", rows)
    return files


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the embedded model's tokenizer, saved like a checkpoint.

    Random weights: honest for plumbing tests (shapes, freezing, files, reproducibility);
    accuracy claims only ever come from the real pretrained model.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sftlab.resolvers import embedded_model_path

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- a toy run that separates
# A keyword task: every text is 2-10 words of its class's vocabulary plus 0-3 neutral words, so
# a tiny BERT can learn it in a few epochs. Label ids are the AG News ones (data=ag_news names
# them World, Sports, Business, Sci/Tech). Every word is one token of the embedded tokenizer.
TOY_KEYWORDS = [["election", "embassy", "treaty"], ["football", "tennis", "olympics"],
                ["stocks", "profit", "bank"], ["software", "robot", "galaxy"]]
TOY_FILLER = ("the a report said today this week new people city more about many after "
              "officials early late local story update").split()
TOY_SPLITS = (("train", 48, 1), ("validation", 24, 2), ("test", 24, 3))


def toy_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 4
        words = rng.choices(TOY_KEYWORDS[label], k=rng.randint(2, 10))
        words += rng.choices(TOY_FILLER, k=rng.randint(0, 3))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    """48 / 24 / 24 rows of the keyword task (balanced, shuffled, texts of 2-13 words)."""
    out = tmp_path_factory.mktemp("toy_keywords")
    return {split: write_rows(out / f"{split}.csv", toy_rows(n, seed)) for split, n, seed in TOY_SPLITS}


def compose_config(overrides: list[str], config: str = "train"):
    """A config composed the way train.py does, for module- and session-scoped fixtures (the
    ``compose`` fixture is function-scoped)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=config, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    return cfg


def tiny_overrides(run: Path, cache: Path, model_dir: Path) -> list[str]:
    """An isolated run of a tiny model (``model_dir``) on CPU, into ``run``; for NER runs."""
    return [f"paths.output_dir={run}", f"hydra.run.dir={run}", f"paths.cache_dir={cache}",
            f"model.name_or_path={model_dir}", "trainer.accelerator=cpu", "+trainer.num_sanity_val_steps=0",
            "+trainer.enable_progress_bar=false", "~callbacks.progress_bar", "optimizer.lr=5e-3"]


@dataclass
class ToyRun:
    """A finished run and what its test pass wrote, in the test file's row order."""

    run: Path                  # the run dir (holds model/, test_predictions.csv, metrics.json)
    texts: list[str]           # the test file's texts
    labels: list[str]          # class names in id order (the p_<name> columns)
    expected: list[list[float]]  # per row: the test pass's class probabilities
    predicted: list[str]       # per row: the test pass's label
    metrics: dict


def read_test_pass(run: Path, test_file: Path) -> ToyRun:
    """``test_predictions.csv`` of ``run`` next to the texts of ``test_file``, in file row order."""
    import json

    with open(test_file, encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    with open(run / "test_predictions.csv", encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["idx"]))
    assert [int(r["idx"]) for r in rows] == list(range(len(texts)))
    labels = [c[2:] for c in rows[0] if c.startswith("p_")]
    return ToyRun(run=run, texts=texts, labels=labels,
                  expected=[[float(r[f"p_{n}"]) for n in labels] for r in rows],
                  predicted=[r["label"] for r in rows],
                  metrics=json.loads((run / "metrics.json").read_text()))


def assert_rows_agree(labels: list[str], got_labels: list[str], got_probs: list[list[float]],
                      want: ToyRun, tol: float = 1e-4) -> None:
    """Another way to predict agrees with the test pass row by row: same label and class
    probabilities within ``tol`` for each row, in the test file's order; and the rows really
    differ (at least 3 of the 4 labels occur), so a shuffle of rows cannot go unnoticed."""
    assert labels == want.labels
    assert len(got_labels) == len(got_probs) == len(want.expected)
    assert len(set(want.predicted)) >= 3, f"the test pass predicts too few classes: {want.predicted}"
    assert got_labels == want.predicted
    for i, (got, exp) in enumerate(zip(got_probs, want.expected, strict=True)):
        assert max(abs(a - b) for a, b in zip(got, exp, strict=True)) < tol, (i, got, exp)


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """The tiny BERT of ``tiny_model_dir`` initialised wider (initializer_range=0.1, also the
    head's), which learns the keyword task in a few epochs."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sftlab.resolvers import embedded_model_path

    out = tmp_path_factory.mktemp("toy_bert")
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=128, initializer_range=0.1,
    )
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory, toy_model_dir, toy_data) -> ToyRun:
    """The toy model trained through ``sftlab.train.train`` (6 epochs, ~10 s) until it separates
    the keyword task: its test predictions differ between rows and are mostly right, so the
    deploy checks that compare prediction paths row by row mean something."""
    import torch

    from sftlab.train import train

    root = tmp_path_factory.mktemp("toy_run")
    run = root / "run"
    cfg = compose_config([
        f"paths.output_dir={run}", f"hydra.run.dir={run}", f"paths.cache_dir={root / 'cache'}",
        f"model.name_or_path={toy_model_dir}", f"data.train_file={toy_data['train']}",
        f"data.validation_file={toy_data['validation']}", f"data.test_file={toy_data['test']}",
        "model.max_length=32", "data.batch_size=8", "data.eval_batch_size=16",
        "trainer.max_epochs=6", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "optimizer.lr=5e-3", "+trainer.num_sanity_val_steps=0", "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from more on a shared box
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    toy = read_test_pass(run, toy_data["test"])
    # the fixture's own honesty: the model learned the task, so its labels follow the texts
    assert toy.metrics["test/acc"] >= 0.9, toy.metrics["test/acc"]
    assert len(set(toy.predicted)) == 4, toy.predicted
    return toy


@pytest.fixture
def compose(tmp_path, tiny_model_dir, tiny_data):
    """compose(*overrides, config="train") -> DictConfig for a tiny, fast, isolated run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(*overrides: str, config: str = "train", tiny: bool = True, out=None):
        out = Path(out or tmp_path / "run")
        base = [
            f"paths.output_dir={out}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={out}",
        ]
        if tiny:
            base += [
                f"model.name_or_path={tiny_model_dir}" if config == "train" else "",
                f"data.train_file={tiny_data['train']}",
                f"data.validation_file={tiny_data['validation']}",
                f"data.test_file={tiny_data['test']}",
                "trainer.max_epochs=1",
                "trainer.accelerator=cpu",
                "trainer.log_every_n_steps=1",
                "+trainer.num_sanity_val_steps=0",
                "+trainer.enable_progress_bar=false",
                "data.batch_size=8",
                "data.eval_batch_size=16",
                # auto picks by timing: on a tiny model's matmuls a toss-up from run to run, and
                # these tests compare runs and code paths (tests of auto ask for it)
                "trainer.precision=32-true",
            ]
            if config == "train":
                base += ["model.max_length=32", "~callbacks.progress_bar", "optimizer.lr=1e-3"]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose(
                config_name=config, overrides=[o for o in base if o] + list(overrides),
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@contextmanager
def served(model_dir: Path, startup_s: float = 90):
    """``serve.py model_dir=...`` on a free port, as users start it; yields its base URL once
    ``/health`` answers (startup_s at most), and stops it after."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "serve.py", f"model_dir={model_dir}", f"port={port}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_s
        while True:
            assert proc.poll() is None, "serve.py exited"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve.py did not come up"
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=15)
