"""Deployment: write a trained classifier as a self-describing folder, and load it back to predict.

Why a plain Hugging Face folder: whoever receives the model should not need sftlab to use it.
``export_model`` writes exactly what ``transformers.pipeline("text-classification", model=dir)``
loads (safetensors weights, ``config.json`` with the label names, the tokenizer), plus three
files for people and for sftlab: ``sftlab_config.yaml`` (the resolved training config, secrets
dropped, so a result can be reproduced), ``metrics.json`` and a model card ``README.md``.

Why ``Classifier`` when the pipeline exists: it reads the training ``max_length`` from
``sftlab_config.yaml`` (the pipeline would not truncate at all and fail on long texts), sorts
texts by token length before batching (far less padding, same outputs, original order kept),
accepts a run dir as well as the model folder, and returns every class probability in one flat,
JSON-ready record. ``predict.py`` and ``serve.py`` are thin shells around it.

torch and transformers are imported inside functions so that importing sftlab stays fast.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sftlab.errors import ConfigError, SftlabError
from sftlab.secrets import scrub_secrets

log = logging.getLogger(__name__)

CONFIG_FILE = "sftlab_config.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"

# Hub ids of checkpoints that sftlab ships offline (the model card's base_model must be a hub id).
_EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------- export
def export_model(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir`` as a Hugging Face model folder plus config, metrics and model card.

    ``model`` is a plain ``*ForSequenceClassification`` (adapters already merged by the
    strategy) whose ``config.id2label`` names the classes; ``extra["label_names"]`` (names in id
    order) sets them when the caller has not. ``config`` is the resolved training config as a
    plain dict; ``metrics`` the flat run metrics (``val/acc``, ``test/f1/<label>``, ...);
    ``extra["per_class"]`` (label -> f1, or label -> {precision, recall, f1}) may replace the
    per-class metric keys. Returns the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    labels = extra.get("label_names")
    if labels:
        labels = [str(x) for x in labels]
        if int(model.config.num_labels) != len(labels):
            raise ConfigError(
                f"export_model got {len(labels)} label names for a model with "
                f"{model.config.num_labels} outputs; pass the names the head was trained with."
            )
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    # save_pretrained writes safetensors by default (transformers >= 4.35; the only format in 5.x)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "model.safetensors").is_file() and not list(out.glob("model-*.safetensors")):
        raise SftlabError(f"No safetensors weights were written to {out}; check the disk and the model.")

    clean = scrub_secrets(_plain(dict(config))) if config is not None else None
    if clean is not None:
        import yaml

        with open(out / CONFIG_FILE, "w", encoding="utf-8") as fh:
            yaml.safe_dump(clean, fh, sort_keys=False, allow_unicode=True)
    if metrics is not None:
        with open(out / METRICS_FILE, "w", encoding="utf-8") as fh:
            json.dump(_plain(dict(metrics)), fh, indent=2, sort_keys=True)
            fh.write("\n")
    card = model_card(
        labels=[model.config.id2label[i] for i in range(int(model.config.num_labels))],
        config=clean or {},
        metrics=dict(metrics or {}),
        extra=extra,
        model_type=getattr(model.config, "model_type", None),
    )
    (out / CARD_FILE).write_text(card, encoding="utf-8")
    log.info("Exported model to %s", out)
    return out


def _plain(value: Any) -> Any:
    """YAML/JSON-safe builtins (OmegaConf containers, Paths, tensors, numpy scalars -> plain)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


# ----------------------------------------------------------------------------- model card
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


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


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


def model_card(
    *,
    labels: Sequence[str],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    model_type: str | None = None,
) -> str:
    """The README.md of an exported folder: HF front matter, then what a reader needs to reuse it."""
    import yaml

    extra = extra or {}
    base = _get(config, "model.name_or_path")
    base_id = _hub_id(base)
    hub_data = _get(config, "data.hub_name")
    strategy = (metrics.get("strategy") or _get(config, "strategy.name")
                or _short_target(_get(config, "strategy._target_")))
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-classification"}
    if base_id:
        front["base_model"] = base_id
    front["tags"] = ["sftlab", "text-classification"] + ([str(strategy)] if strategy else [])
    if hub_data:
        front["datasets"] = [str(hub_data)]
    front["metrics"] = ["accuracy", "f1"]

    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# Text classifier fine-tuned with sftlab{f' from {base_id}' if base_id else ''}", ""]
    lines += [f"Labels ({len(labels)}, in id order): " + ", ".join(f"`{x}`" for x in labels), ""]

    lines += ["## Base model", ""]
    lines += [f"- checkpoint: `{base_id or base or 'unknown'}`"
              + (f" (loaded from `{base}`)" if base_id and base_id != base else "")]
    if model_type:
        lines.append(f"- architecture: `{model_type}`")
    lines.append("")

    lines += ["## Data", ""]
    data = _get(config, "data", {}) or {}
    n_before = len(lines)
    if hub_data:
        lines.append(f"- hub dataset: `{hub_data}`" + (f" ({data.get('hub_config')})" if data.get("hub_config") else ""))
    for split in ("train", "validation", "test"):
        f = data.get(f"{split}_file") if isinstance(data, Mapping) else None
        if f:
            lines.append(f"- {split}: `{Path(str(f)).name}`")
    for key in ("text_field", "text_pair_field", "label_field"):
        if isinstance(data, Mapping) and data.get(key):
            lines.append(f"- {key}: `{data[key]}`")
    if len(lines) == n_before:
        lines.append("- not recorded")
    lines.append("")

    lines += ["## Strategy", ""]
    strat_cfg = _get(config, "strategy", {}) or {}
    if strategy:
        lines.append(f"- `{strategy}`" + (f" (`{strat_cfg.get('_target_')}`)" if isinstance(strat_cfg, Mapping) and strat_cfg.get("_target_") else ""))
        if isinstance(strat_cfg, Mapping):
            for k, v in strat_cfg.items():
                if k not in ("_target_", "_partial_", "name") and not isinstance(v, Mapping | list):
                    lines.append(f"  - {k}: `{v}`")
    else:
        lines.append("- not recorded")
    lines.append("")

    lines += ["## Hyperparameters", "", "| setting | value |", "|---|---|"]
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
    rows = [(k, v) for k, v in hp if v is not None]
    lines += [f"| {k} | `{v}` |" for k, v in rows] or ["| (not recorded) | |"]
    lines.append("")

    lines += ["## Results", ""]
    splits = [s for s in ("val", "test") if any(str(k).startswith(f"{s}/") for k in metrics)]
    names = [n for n in ("acc", "f1_macro", "loss")
             if any(f"{s}/{n}" in metrics for s in splits)]
    if names:
        lines += ["| metric | " + " | ".join({"val": "validation"}.get(s, s) for s in splits) + " |",
                  "|---|" + "---:|" * len(splits)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(_fmt(metrics.get(f"{s}/{n}", "")) for s in splits) + " |")
    else:
        lines.append("No metrics were recorded for this export.")
    lines.append("")
    per_class = _per_class(labels, metrics, extra)
    if per_class:
        cols = [c for c in ("precision", "recall", "f1") if any(c in r for r in per_class.values())]
        lines += ["### Per-class (test)", "", "| label | " + " | ".join(cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for label, row in per_class.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
        lines.append("")
    run = [(k, metrics.get(k)) for k in ("train_time_s", "train_samples_per_s", "trainable_params",
                                         "total_params", "epochs", "global_step")
           if metrics.get(k) is not None]
    if run:
        lines += ["### Training run", "", "| | |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in run]
        lines.append("")

    lines += [
        "## How to use",
        "",
        "With transformers alone:",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'clf = pipeline("text-classification", model="path/to/this/folder", top_k=None)',
        'print(clf(["Stocks rallied after the earnings report."], truncation=True))',
        "```",
        "",
        "With sftlab (truncates at the training max_length, batches by length, all probabilities):",
        "",
        "```python",
        "from sftlab import Classifier",
        "",
        'clf = Classifier.load("path/to/this/folder")',
        'clf.predict(["Stocks rallied after the earnings report."])',
        "# [{'label': ..., 'label_id': ..., 'score': ..., 'probabilities': {...}}]",
        "```",
        "",
        "From the command line (JSON lines on stdout) or as an HTTP service:",
        "",
        "```bash",
        'python predict.py model_dir=path/to/this/folder text="Stocks rallied after the earnings report."',
        "python predict.py model_dir=path/to/this/folder input=texts.csv text_field=text output=preds.jsonl",
        "python serve.py model_dir=path/to/this/folder port=8000",
        "```",
        "",
        "Files: `model.safetensors`, `config.json` (with `id2label`), the tokenizer, "
        f"`{CONFIG_FILE}` (the resolved training config, secrets removed), `{METRICS_FILE}`.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading
def resolve_model_dir(path: str | Path) -> Path:
    """An exported folder, or a run dir that holds ``model/``, as the folder with config.json."""
    p = Path(path).expanduser()
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise SftlabError(
            f"Model folder {str(p)!r} does not exist; pass an exported model folder or a run dir "
            "that contains model/."
        )
    raise SftlabError(
        f"{str(p)!r} holds no exported model (no config.json, no model/config.json); pass the "
        "model folder, or a run dir trained with export=true."
    )


def _trained_max_length(model_dir: Path) -> int | None:
    cfg_file = model_dir / CONFIG_FILE
    if not cfg_file.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        log.warning("Could not parse %s; max_length falls back to the tokenizer's.", cfg_file)
        return None
    value = _get(cfg, "model.max_length") if isinstance(cfg, Mapping) else None
    return int(value) if isinstance(value, int) and value > 0 else None


class Classifier:
    """A loaded text classifier: ``Classifier.load(dir).predict(["some text", ...])``.

    Outputs equal ``transformers.pipeline("text-classification")`` on the same folder (same
    softmax, within float noise from padding), but texts are truncated at the training
    ``max_length`` and batched by token length, which on CPU is several times faster for
    mixed-length inputs. Results come back in input order.

    ``precision="bf16"`` runs the forward pass under bfloat16 autocast (CUDA, or CPUs with
    bf16 support). It is opt-in because bf16 can flip the label of a near-tie and moves
    probabilities by ~1e-2; fp32 is the default and what the tests compare against.
    """

    def __init__(self, model, tokenizer, *, max_length: int | None = None, device=None,
                 precision: str = "fp32", source: str | None = None):
        import torch

        if precision not in _PRECISIONS:
            raise ConfigError(f"precision={precision!r} is not one of {', '.join(_PRECISIONS)}.")
        self.device = torch.device(device) if device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.precision = precision
        self.source = source
        cfg = model.config
        self.labels: list[str] = [str(cfg.id2label[i]) for i in range(int(cfg.num_labels))]
        self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification" or cfg.num_labels == 1
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._pad_id = int(pad)
        if getattr(cfg, "pad_token_id", None) is None:
            # decoder heads (GPT-2) find the last real token through pad_token_id
            cfg.pad_token_id = self._pad_id
        limits = [512, getattr(tokenizer, "model_max_length", None),
                  getattr(cfg, "max_position_embeddings", None)]
        cap = min(int(x) for x in limits if isinstance(x, int) and x > 0)
        self.max_length = int(max_length) if max_length else cap

    # -- construction
    @classmethod
    def load(cls, path: str | Path, device=None, precision: str = "fp32",
             max_length: int | None = None) -> Classifier:
        """Load an exported folder or a run dir holding ``model/`` (raises SftlabError if neither)."""
        if precision not in _PRECISIONS:
            raise ConfigError(f"precision={precision!r} is not one of {', '.join(_PRECISIONS)}.")
        model_dir = resolve_model_dir(path)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SftlabError(
                f"Could not load the model in {str(model_dir)!r} ({first}); re-export it with "
                "sftlab.export.export_model or model.save_pretrained + tokenizer.save_pretrained."
            ) from None
        max_length = max_length or _trained_max_length(model_dir)
        return cls(model, tokenizer, max_length=max_length, device=device,
                   precision=precision, source=str(model_dir))

    # -- inference
    def predict_proba(self, texts: str | Iterable[str], batch_size: int = 64):
        """Class probabilities, shape (n_texts, n_labels), rows in input order (numpy float32)."""
        import numpy as np

        texts = self._as_list(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer.")
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        # tokenize a few batches' worth at a time: length-sorting works within this window and
        # memory stays flat for files of any size
        window = batch_size * 32
        for start in range(0, len(texts), window):
            chunk = texts[start:start + window]
            out[start:start + len(chunk)] = self._proba_chunk(chunk, batch_size)
        return out

    def predict(self, texts: str | Iterable[str], batch_size: int = 64,
                top_k: int | None = None) -> list[dict[str, Any]]:
        """One record per text: label, label_id, score, probabilities (+ top_k if asked)."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ConfigError(f"top_k={top_k!r} must be a positive integer or null.")
        proba = self.predict_proba(texts, batch_size=batch_size)
        records = []
        for row in proba:
            best = int(row.argmax())
            rec: dict[str, Any] = {
                "label": self.labels[best],
                "label_id": best,
                "score": float(row[best]),
                "probabilities": {name: float(p) for name, p in zip(self.labels, row, strict=True)},
            }
            if top_k is not None:
                order = row.argsort()[::-1][:top_k]
                rec["top_k"] = [(self.labels[int(i)], float(row[int(i)])) for i in order]
            records.append(rec)
        return records

    __call__ = predict

    def __repr__(self) -> str:
        return (f"Classifier(source={self.source!r}, labels={self.labels}, device={self.device}, "
                f"precision={self.precision}, max_length={self.max_length})")

    @staticmethod
    def _as_list(texts: str | Iterable[str]) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise SftlabError(f"Text #{i} is a {type(t).__name__}, not a string; pass strings only.")
        return texts

    def _proba_chunk(self, texts: list[str], batch_size: int):
        import numpy as np
        import torch

        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        keys = [k for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
        ids = enc["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]), reverse=True)
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        pad_values = {"input_ids": self._pad_id, "attention_mask": 0,
                      "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0) or 0}
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.precision == "bf16" else None)
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                width = max(len(ids[i]) for i in idx)
                batch = {}
                for k in keys:
                    rows = []
                    for i in idx:
                        seq = list(enc[k][i])
                        fill = [pad_values[k]] * (width - len(seq))
                        rows.append(fill + seq if left else seq + fill)
                    batch[k] = torch.tensor(rows, dtype=torch.long, device=self.device)
                if autocast is not None:
                    with autocast:
                        logits = self.model(**batch).logits
                else:
                    logits = self.model(**batch).logits
                logits = logits.float()
                probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
                out[idx] = probs.cpu().numpy()
        return out
