"""The model card: the ``README.md`` of an exported folder, built one section at a time.

Why a card at all: an exported folder travels without its run dir, so the card is where a
reader (or the Hugging Face hub, through the YAML front matter) learns what the model is, what
it was trained on, how well it did and how to call it. Each section is a small function that
returns its lines (ending with a blank one) and says "not recorded" when the config is silent,
so a card is always complete; :func:`model_card` joins them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sftlab.console import fmt

# Hub ids of checkpoints that sftlab ships offline (the model card's base_model must be a hub id).
_EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_EXAMPLE = "Stocks rallied after the earnings report."


def model_card(
    *,
    labels: Sequence[str],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    model_type: str | None = None,
) -> str:
    """The README.md of an exported folder: HF front matter, then what a reader needs to reuse it."""
    extra = extra or {}
    token = (extra.get("task") or _get(config, "data.task")) == "token_classification"
    base = _get(config, "model.name_or_path")
    base_id = _hub_id(base)
    strategy = (metrics.get("strategy") or _get(config, "strategy.name")
                or _short_target(_get(config, "strategy._target_")))
    # token classification: scored per entity type (PER), not per tag (B-PER, I-PER)
    classes = sorted({str(x)[2:] for x in labels if str(x) != "O"}) if token else labels
    lines = (_front_matter(labels, config, base_id, strategy, token)
             + _base_model(base, base_id, model_type)
             + _pooling(extra.get("pooling"))
             + _data(config)
             + _strategy(config, strategy)
             + _hyperparameters(config)
             + _results(metrics, token)
             + _per_class_table(classes, metrics, extra, token)
             + _training_run(metrics)
             + (_how_to_use_tagger() if token else _how_to_use()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sections
def _front_matter(labels: Sequence[str], config: Mapping[str, Any], base_id: str | None,
                  strategy: Any, token: bool = False) -> list[str]:
    """HF hub metadata (YAML between ``---``), the title, the task and the labels in id order."""
    import yaml

    hub_data = _get(config, "data.hub_name")
    pipeline = "token-classification" if token else "text-classification"
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": pipeline}
    if base_id:
        front["base_model"] = base_id
    front["tags"] = ["sftlab", pipeline] + (["ner"] if token else []) + ([str(strategy)] if strategy else [])
    if hub_data:
        front["datasets"] = [str(hub_data)]
    front["metrics"] = ["seqeval", "f1", "precision", "recall"] if token else ["accuracy", "f1"]
    what = "Token classifier (named-entity recognition)" if token else "Text classifier"
    task = ("Task: token classification (a tag per word, IOB2; entities are scored with seqeval: "
            "exact span and type)." if token else "Task: sequence classification (one label per text).")
    names = "Tags" if token else "Labels"
    return ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
            f"# {what} fine-tuned with sftlab{f' from {base_id}' if base_id else ''}", "", task, "",
            f"{names} ({len(labels)}, in id order): " + ", ".join(f"`{x}`" for x in labels), ""]


def _base_model(base: Any, base_id: str | None, model_type: str | None) -> list[str]:
    lines = ["## Base model", "",
             f"- checkpoint: `{base_id or base or 'unknown'}`"
             + (f" (loaded from `{base}`)" if base_id and base_id != base else "")]
    if model_type:
        lines.append(f"- architecture: `{model_type}`")
    return [*lines, ""]


def _pooling(pooling: Any) -> list[str]:
    """A warning when the run pooled in a way stock transformers cannot reproduce."""
    if not pooling:
        return []
    return ["## Pooling", "",
            f"Trained with `model.pooling={pooling}` (recorded as `sftlab_pooling` in `config.json`). "
            "Load it with sftlab (`Classifier.load`, `predict.py`, `serve.py`) to get the run's "
            "predictions: stock `AutoModelForSequenceClassification` and `pipeline` ignore that key "
            "and read the head through the architecture's own pooling, which predicts differently.", ""]


def _data(config: Mapping[str, Any]) -> list[str]:
    """The hub dataset or the file names (not their folders: those are the trainer's machine)."""
    data = _get(config, "data", {}) or {}
    if not isinstance(data, Mapping):
        data = {}
    rows = []
    if data.get("hub_name"):
        rows.append(f"- hub dataset: `{data['hub_name']}`"
                    + (f" ({data.get('hub_config')})" if data.get("hub_config") else ""))
    for split in ("train", "validation", "test"):
        if data.get(f"{split}_file"):
            rows.append(f"- {split}: `{Path(str(data[f'{split}_file'])).name}`")
    token = data.get("task") == "token_classification"
    keys = ("tokens_field", "tags_field", "tag_scheme") if token else ("text_field", "text_pair_field", "label_field")
    for key in keys:
        if data.get(key):
            rows.append(f"- {key}: `{data[key]}`")
    return ["## Data", "", *(rows or ["- not recorded"]), ""]


def _strategy(config: Mapping[str, Any], strategy: Any) -> list[str]:
    """The strategy's name and target, and its scalar settings (nested ones are left out)."""
    if not strategy:
        return ["## Strategy", "", "- not recorded", ""]
    cfg = _get(config, "strategy", {}) or {}
    if not isinstance(cfg, Mapping):
        cfg = {}
    lines = ["## Strategy", "",
             f"- `{strategy}`" + (f" (`{cfg.get('_target_')}`)" if cfg.get("_target_") else "")]
    lines += [f"  - {k}: `{v}`" for k, v in cfg.items()
              if k not in ("_target_", "_partial_", "name") and not isinstance(v, Mapping | list)]
    return [*lines, ""]


def _hyperparameters(config: Mapping[str, Any]) -> list[str]:
    sched = _get(config, "scheduler")
    hp = [
        ("learning rate", _get(config, "optimizer.lr")),
        ("weight decay", _get(config, "optimizer.weight_decay")),
        ("epochs", _get(config, "trainer.max_epochs")),
        ("batch size", _get(config, "data.batch_size")),
        ("gradient accumulation", _get(config, "trainer.accumulate_grad_batches")),
        ("max_length", _get(config, "model.max_length")),
        ("seed", _get(config, "seed")),
        ("optimizer", _short_target(_get(config, "optimizer._target_"))),
        ("scheduler", (_get(config, "scheduler.name") or _short_target(_get(config, "scheduler._target_")))
         if isinstance(sched, Mapping) else sched),
        ("warmup ratio", _get(config, "scheduler.warmup_ratio")),
        ("precision", _get(config, "trainer.precision")),
    ]
    rows = [f"| {k} | `{v}` |" for k, v in hp if v is not None]
    return ["## Hyperparameters", "", "| setting | value |", "|---|---|",
            *(rows or ["| (not recorded) | |"]), ""]


def _results(metrics: Mapping[str, Any], token: bool = False) -> list[str]:
    """acc, f1_macro and loss (entity f1, precision, recall, token acc and loss for token
    classification), one column per split that has any."""
    splits = [s for s in ("val", "test") if any(str(k).startswith(f"{s}/") for k in metrics)]
    order = ("f1", "precision", "recall", "acc", "loss") if token else ("acc", "f1_macro", "loss")
    names = [n for n in order if any(f"{s}/{n}" in metrics for s in splits)]
    if not names:
        return ["## Results", "", "No metrics were recorded for this export.", ""]
    lines = ["## Results", "",
             "| metric | " + " | ".join({"val": "validation"}.get(s, s) for s in splits) + " |",
             "|---|" + "---:|" * len(splits)]
    lines += [f"| {n} | " + " | ".join(fmt(metrics.get(f"{s}/{n}", "")) for s in splits) + " |"
              for n in names]
    return [*lines, ""]


def _per_class_table(labels: Sequence[str], metrics: Mapping[str, Any],
                     extra: Mapping[str, Any], token: bool = False) -> list[str]:
    per_class = _per_class(labels, metrics, extra)
    if not per_class:
        return []
    cols = [c for c in ("precision", "recall", "f1") if any(c in r for r in per_class.values())]
    title, what = ("Per entity type (test, seqeval)", "type") if token else ("Per-class (test)", "label")
    lines = [f"### {title}", "", f"| {what} | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |"
              for label, row in per_class.items()]
    return [*lines, ""]


def _training_run(metrics: Mapping[str, Any]) -> list[str]:
    keys = ("train_time_s", "train_samples_per_s", "trainable_params", "total_params", "epochs",
            "global_step")
    run = [(k, metrics.get(k)) for k in keys if metrics.get(k) is not None]
    if not run:
        return []
    return ["### Training run", "", "| | |", "|---|---:|",
            *(f"| {k} | {fmt(v)} |" for k, v in run), ""]


def _how_to_use() -> list[str]:
    """The three ways in: plain transformers, sftlab's Classifier, the CLI and the service."""
    return [
        "## How to use",
        "",
        "With transformers alone:",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'clf = pipeline("text-classification", model="path/to/this/folder", top_k=None)',
        f'print(clf(["{_EXAMPLE}"], truncation=True))',
        "```",
        "",
        "With sftlab (truncates at the training max_length, batches by length, all probabilities):",
        "",
        "```python",
        "from sftlab import Classifier",
        "",
        'clf = Classifier.load("path/to/this/folder")',
        f'clf.predict(["{_EXAMPLE}"])',
        "# [{'label': ..., 'label_id': ..., 'score': ..., 'probabilities': {...}}]",
        "```",
        "",
        "From the command line (JSON lines on stdout) or as an HTTP service:",
        "",
        "```bash",
        f'python predict.py model_dir=path/to/this/folder text="{_EXAMPLE}"',
        "python predict.py model_dir=path/to/this/folder input=texts.csv text_field=text "
        "output=preds.jsonl",
        "python serve.py model_dir=path/to/this/folder port=8000",
        "```",
        "",
        _files_line(),
        "",
    ]


def _files_line() -> str:
    # imported here: export.py imports this module for model_card, and owns the file names
    from sftlab.deploy.export import CONFIG_FILE, METRICS_FILE

    return ("Files: `model.safetensors`, `config.json` (with `id2label`), the tokenizer, "
            f"`{CONFIG_FILE}` (the resolved training config, secrets removed), `{METRICS_FILE}`.")


def _how_to_use_tagger() -> list[str]:
    """Token classification: the pipeline with entity grouping, sftlab's API, CLI and service."""

    text = "Peter Blackburn spoke in Brussels for the European Commission."
    return [
        "## How to use",
        "",
        "With transformers alone (entities with character offsets):",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'ner = pipeline("token-classification", model="path/to/this/folder", aggregation_strategy="simple")',
        f'print(ner("{text}"))',
        "```",
        "",
        "With sftlab (the same entities, for many texts at once):",
        "",
        "```python",
        "from sftlab import Classifier",
        "",
        'tagger = Classifier.load("path/to/this/folder")',
        f'tagger.predict(["{text}"])',
        "# [{'text': ..., 'entities': [{'entity_group': 'PER', 'word': ..., 'start': 0, 'end': 15, "
        "'score': ...}, ...]}]",
        "```",
        "",
        "From the command line (JSON lines on stdout) or as an HTTP service:",
        "",
        "```bash",
        f'python predict.py model_dir=path/to/this/folder text="{text}"',
        "python serve.py model_dir=path/to/this/folder port=8000",
        "```",
        "",
        _files_line(),
        "",
    ]


# ----------------------------------------------------------------------------- helpers
def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _short_target(target: Any) -> str | None:
    return str(target).rsplit(".", 1)[-1] if target else None


def _metric_key(name: str) -> str:
    # the same sanitising as sftlab.model.metric_key (not imported: it pulls in Lightning)
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name)).strip("_") or "label"


def _hub_id(name_or_path: Any) -> str | None:
    """A hub id for the card's ``base_model`` (local folders have none, except the embedded one)."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    try:
        from sftlab.resolvers import embedded_model_path

        if Path(name).resolve() == Path(embedded_model_path()).resolve():
            return _EMBEDDED_HUB_ID
    except Exception:  # the embedded package may be absent; then it is not the embedded model
        pass
    if Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _per_class(labels: Sequence[str], metrics: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """label -> {precision, recall, f1} from ``extra['per_class']`` or ``test/<m>/<label>`` keys."""
    given = extra.get("per_class")
    if isinstance(given, Mapping) and given:
        return {
            str(k): (dict(v) if isinstance(v, Mapping) else {"f1": v}) for k, v in given.items()
        }
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        row = {}
        for m in ("precision", "recall", "f1"):
            for key in (f"test/{m}/{label}", f"test/{m}/{_metric_key(label)}",
                        f"test/{m}_class/{label}", f"test/{m}_class/{_metric_key(label)}"):
                if key in metrics:
                    row[m] = metrics[key]
                    break
        if row:
            out[label] = row
    return out
