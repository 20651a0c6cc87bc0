"""``evaluate(cfg)``: score a trained model on one split of any configured dataset.

The model comes from an exported folder (``model_dir``, what users keep) or from a Lightning
checkpoint of a run (``ckpt_path``; the run's own config rebuilds the module, strategy
included, so a LoRA checkpoint loads too). Only the evaluated split is read and tokenized.
Labels are mapped with the model's own ``id2label``, so a file with string labels is scored
against the names the model was trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sftlab.errors import ConfigError

log = logging.getLogger(__name__)

_PREFIX = {"test": "test", "validation": "val"}


def _trained_config(model_dir: Path | None, ckpt: Path | None) -> DictConfig | None:
    candidates = []
    if model_dir is not None:
        candidates.append(model_dir / "sftlab_config.yaml")
    if ckpt is not None:  # train.py writes the resolved config.yaml at the run dir's root
        candidates += [ckpt.parent.parent / "config.yaml", ckpt.parent.parent / ".hydra" / "config.yaml"]
    for c in candidates:
        if c.is_file():
            return OmegaConf.load(c)
    return None


def load_module(cfg: DictConfig):
    """(module, tokenizer, trained config, task) from model_dir or ckpt_path."""
    import torch
    import transformers
    from hydra.utils import get_class

    from sftlab.config import instantiate
    from sftlab.pretrained import load_tokenizer
    from sftlab.tasks import build_module, task_of, task_of_model

    if bool(cfg.get("model_dir")) == bool(cfg.get("ckpt_path")):
        raise ConfigError("Give exactly one of model_dir=<run dir or model folder> or ckpt_path=<.ckpt file>.")
    if cfg.get("model_dir"):
        from sftlab.deploy import resolve_model_dir

        model_dir = resolve_model_dir(cfg.model_dir)
        trained = _trained_config(model_dir, None)
        task = task_of_model(transformers.AutoConfig.from_pretrained(model_dir))
        model = getattr(transformers, task.auto_model).from_pretrained(model_dir)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        tokenizer = load_tokenizer(str(model_dir), split_into_words=task.split_into_words)
        module = get_class(task.module)(str(model_dir), labels, model=model)
        return module, tokenizer, trained, task
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={str(ckpt)!r} does not exist; point it at a run's checkpoints/*.ckpt.")
    trained = _trained_config(None, ckpt)
    if trained is None:
        raise ConfigError(f"No run config next to {str(ckpt)!r} (expected <run dir>/config.yaml).")
    from sftlab.runs import upgrade_config

    mcfg = upgrade_config(trained).model
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    task = task_of(trained)
    tokenizer = load_tokenizer(**mcfg, split_into_words=task.split_into_words)
    labels = _labels_from_state(state)
    module = build_module(mcfg, task, label_names=labels, strategy=instantiate(trained.strategy),
                          pad_token_id=tokenizer.pad_token_id, _convert_="all")
    module.load_state_dict(state["state_dict"])
    return module, tokenizer, trained, task


def _labels_from_state(state: dict[str, Any]) -> list[str]:
    """The label names ``TextClassifier.on_save_checkpoint`` stores under ``sftlab``."""
    labels = state.get("sftlab", {}).get("label_names")
    if not labels:
        raise ConfigError("The checkpoint does not record its label names; evaluate its exported model_dir instead.")
    return list(labels)


def _eval_precision(cfg: DictConfig, model, trained: DictConfig | None) -> None:
    """``trainer.precision=auto``: the precision the model was trained with, so the run's test
    metrics reproduce; the calibrated faster one when the run's config does not say."""
    from omegaconf import open_dict

    from sftlab.perf.precision import resolve_precision

    if str(cfg.trainer.get("precision", "auto")) != "auto":
        return
    used = OmegaConf.select(trained, "trainer.precision", default=None,
                            throw_on_resolution_failure=False) if trained is not None else None
    if used is not None and str(used) != "auto":
        with open_dict(cfg):
            cfg.trainer.precision = str(used)
        return
    resolve_precision(cfg, model)


def data_config(data: DictConfig, split: str) -> DictConfig:
    """``data`` with the files eval does not read left out, so ``data=local`` needs only one.

    ``conf/data/local.yaml`` marks ``train_file`` mandatory (``???``) because training needs
    it; scoring a file needs only that file (and train only to carve a missing validation
    split), and the labels come from the model. So an unset file becomes null, and a split
    with nothing to score is one sentence instead of omegaconf's error.
    """
    data = data.copy()
    with open_dict(data):
        for name in ("train", "validation", "test"):
            key = f"{name}_file"
            if key in data.keys() and OmegaConf.is_missing(data, key):
                data[key] = None
    carve = split == "validation" and data.get("train_file")
    if not (data.get(f"{split}_file") or data.get("hub_name") or carve):
        raise ConfigError(f"No {split} data to score: add data.{split}_file=<file>.")
    return data


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from sftlab.perf import blas

    blas.from_config(cfg)  # before anything imports torch: MKL's fast path on AMD CPUs
    import lightning.pytorch as pl

    from sftlab.config import instantiate, output_dir, route_lightning_logs
    from sftlab.console import print_metrics_table
    from sftlab.files import write_json
    from sftlab.results import save_confusion, scalar_metrics
    from sftlab.tasks import build_datamodule

    route_lightning_logs()
    split = cfg.get("split", "test")
    if split not in _PREFIX:
        raise ConfigError(f"split={split!r} is not one of test, validation.")
    pl.seed_everything(cfg.seed, workers=True)
    module, tokenizer, trained, task = load_module(cfg)
    max_length = cfg.model.get("max_length") or (trained.model.max_length if trained is not None else None)
    max_length = int(max_length or min(getattr(tokenizer, "model_max_length", 512), 512))
    # the model's task, whatever data.task says: its head decides what a file must hold
    datamodule = build_datamodule(
        data_config(cfg.data, split), task, tokenizer=tokenizer, splits=[split],
        max_length=max_length, label_names=module.label_names, label_names_from="the model",
    )
    _eval_precision(cfg, module.model, trained)
    trainer: pl.Trainer = instantiate(cfg.trainer, use_distributed_sampler=False)
    if split == "test":
        results = trainer.test(module, datamodule=datamodule, verbose=False)
    else:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = scalar_metrics(results[0])
    if trainer.is_global_zero:
        out = output_dir(cfg)
        if split == "test" and getattr(module, "test_confusion", None) is not None:
            save_confusion(module.test_confusion, module.label_names, out)
        write_json(out / "metrics.json", metrics)
        print_metrics_table(metrics, title=f"eval · {split}")
    return metrics


def main(cfg: DictConfig) -> float:
    metrics = evaluate(cfg)
    prefix = _PREFIX.get(cfg.get("split", "test"), "test")
    main = metrics.get(f"{prefix}/f1") if f"{prefix}/f1" in metrics else metrics.get(f"{prefix}/acc")
    return float(main if main is not None else float("nan"))
