"""Deployment: write a trained classifier as a self-describing folder.

Why a plain Hugging Face folder: whoever receives the model should not need sftlab to use it.
``export_model`` writes exactly what ``transformers.pipeline("text-classification", model=dir)``
loads (safetensors weights, ``config.json`` with the label names, the tokenizer), plus three
files for people and for sftlab: ``sftlab_config.yaml`` (the resolved training config, secrets
dropped, so a result can be reproduced), ``metrics.json`` and a model card ``README.md``
(:mod:`sftlab.deploy.card`). :mod:`sftlab.deploy.predictor` loads such a folder back.

torch and transformers are imported inside functions so that importing sftlab stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftlab.deploy.card import model_card
from sftlab.errors import ConfigError, SftlabError
from sftlab.files import atomic_write_text, write_json
from sftlab.secrets import scrub_secrets

log = logging.getLogger(__name__)

CONFIG_FILE = "sftlab_config.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"


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
    from sftlab.pooling import CONFIG_KEY

    pooling = getattr(model.config, CONFIG_KEY, None)
    if pooling:
        extra["pooling"] = pooling
        log.warning("The export records model.pooling=%s (config.json: %s): sftlab's Classifier, predict.py, "
                    "serve.py and eval.py reproduce the run; stock transformers/pipeline would read the "
                    "head differently (README, Pooling).", pooling, CONFIG_KEY)
    # save_pretrained writes safetensors by default (transformers >= 4.35; the only format in 5.x)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "model.safetensors").is_file() and not list(out.glob("model-*.safetensors")):
        raise SftlabError(f"No safetensors weights were written to {out}; check the disk and the model.")

    clean = scrub_secrets(_plain(dict(config))) if config is not None else None
    if clean is not None:
        import yaml

        atomic_write_text(out / CONFIG_FILE,
                          yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))
    if metrics is not None:
        write_json(out / METRICS_FILE, _plain(dict(metrics)))
    card = model_card(
        labels=[model.config.id2label[i] for i in range(int(model.config.num_labels))],
        config=clean or {},
        metrics=dict(metrics or {}),
        extra=extra,
        model_type=getattr(model.config, "model_type", None),
    )
    atomic_write_text(out / CARD_FILE, card)
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


# ----------------------------------------------------------------------------- finding a folder
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
