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
