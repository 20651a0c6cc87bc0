"""Tasks: what differs between sequence and token classification, one module each.

A task names its LightningModule (the head, loss and metrics), its data module (readers and
label alignment), the metric the best checkpoint is chosen on, and the transformers pipeline
that loads its export. The data config declares the task (``data.task``; ``conf/data/
conll2003.yaml`` says ``token_classification``), and the pipelines build the task's objects
from the same ``data`` and ``model`` configs through :func:`build_datamodule` and
:func:`build_module`. Sequence classification is the default, and for it those configs are
instantiated exactly as they are written.

This module stays light (no torch): config composition reads :func:`main_metric` through the
``${sftlab.main_metric:...}`` resolver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftlab.errors import ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    module: str  # the LightningModule's _target_
    datamodule: str  # the data module's _target_
    auto_model: str  # the transformers Auto class of the head
    pipeline: str  # the transformers pipeline that loads the export
    main_metric: str  # checkpoints, sweeps and studies select on val/<main_metric>
    # data config keys only this task reads (the other tasks' modules are not given them)
    own_keys: tuple[str, ...] = ()
    # data config keys this task does not take
    ignores: tuple[str, ...] = ()
    # the inputs come as words already split (``is_split_into_words``): a byte-level BPE
    # tokenizer then needs its prefix space (sftlab.pretrained.load_tokenizer)
    split_into_words: bool = False


DEFAULT = "sequence_classification"
_TOKEN_KEYS = ("tokens_field", "tags_field", "tag_column", "tag_scheme", "label_all_subwords",
               "token_loss")

TASKS = {
    "sequence_classification": Task(
        "sequence_classification", "sftlab.model.TextClassifier",
        "sftlab.data.TextClassificationDataModule", "AutoModelForSequenceClassification",
        "text-classification", "acc"),
    "token_classification": Task(
        "token_classification", "sftlab.tasks.token_classification.TokenClassifier",
        "sftlab.data.TokenClassificationDataModule", "AutoModelForTokenClassification",
        "token-classification", "f1", own_keys=_TOKEN_KEYS,
        ignores=("text_field", "text_pair_field", "label_field"), split_into_words=True),
}


def get_task(name: str | None) -> Task:
    """The task called ``name`` (None: sequence classification)."""
    task = TASKS.get(name or DEFAULT)
    if task is None:
        raise ConfigError(f"data.task={name!r} is not one of {', '.join(TASKS)}.")
    return task


def task_of(cfg: Any) -> Task:
    """The task a composed config (train, eval) declares in ``data.task``."""
    data = cfg.get("data") if hasattr(cfg, "get") else None
    return get_task(data.get("task") if data is not None else None)


def task_of_model(hf_config: Any) -> Task:
    """The task of a saved transformers model, from its architecture (``BertForTokenClassification``)."""
    archs = getattr(hf_config, "architectures", None) or []
    for task in TASKS.values():
        if any(str(a).endswith(task.auto_model.removeprefix("AutoModel")) for a in archs):
            return task
    return TASKS[DEFAULT]


def main_metric(name: str | None = None) -> str:
    """The task's main metric name (``acc``, ``f1``): the ``${sftlab.main_metric:}`` resolver."""
    return get_task(name).main_metric


def data_config(data, task: Task):
    """``data`` as the task's data module takes it: other tasks' keys left out, its target set
    when the config names the default one (``data=local data.task=token_classification``)."""
    from omegaconf import open_dict

    data = data.copy()
    drop = {"task", *task.ignores} | {k for t in TASKS.values() if t is not task for k in t.own_keys}
    drop -= set(task.own_keys)
    with open_dict(data):
        for key in drop:
            if key in data.keys():
                del data[key]
        if task.name != DEFAULT and data.get("_target_") == TASKS[DEFAULT].datamodule:
            data["_target_"] = task.datamodule
    return data


def build_datamodule(data, task: Task, **kwargs: Any):
    from sftlab.config import instantiate

    return instantiate(data_config(data, task), **kwargs)


def build_module(model, task: Task, **kwargs: Any):
    """The task's LightningModule from the ``model`` config (its ``_target_`` swapped for the
    task's when the config names the default classifier)."""
    from omegaconf import open_dict

    from sftlab.config import instantiate

    if task.name != DEFAULT and model.get("_target_") == TASKS[DEFAULT].module:
        model = model.copy()
        with open_dict(model):
            model["_target_"] = task.module
    return instantiate(model, **kwargs)
