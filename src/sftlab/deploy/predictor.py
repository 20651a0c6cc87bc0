"""``Classifier``: load an exported folder (or a run dir) and predict, ``Classifier.load(dir)``.

Why ``Classifier`` when the transformers pipeline exists: it reads the training ``max_length``
from ``sftlab_config.yaml`` (the pipeline would not truncate at all and fail on long texts),
sorts texts by token length before batching (far less padding, same outputs, original order
kept), accepts a run dir as well as the model folder, and returns every class probability in one
flat, JSON-ready record. ``predict.py`` and ``serve.py`` are thin shells around it.

torch and transformers are imported inside functions so that importing sftlab stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sftlab.deploy.export import CONFIG_FILE, resolve_model_dir
from sftlab.errors import ConfigError, SftlabError, checked

log = logging.getLogger(__name__)

_PRECISIONS = ("fp32", "bf16")
# the tokenizer outputs a model forward takes (others, e.g. offsets, are dropped)
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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

        _check_precision(precision)
        self.device = torch.device(device) if device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        from sftlab.pooling import resolve_pooling

        # a run trained with model.pooling=mean/cls/last exported it in config.json (sftlab_pooling)
        self.pooling = resolve_pooling(model, "auto")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.precision = precision
        self.source = source
        cfg = model.config
        self.labels: list[str] = [str(cfg.id2label[i]) for i in range(int(cfg.num_labels))]
        self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification" or cfg.num_labels == 1
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # as training did (sftlab.pretrained)
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else 0)
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
        """Load an exported folder or a run dir holding ``model/`` (raises SftlabError if neither).

        A token-classification folder (NER) gives an :class:`EntityTagger`, whose ``predict``
        returns entities instead of a label.
        """
        _check_precision(precision)
        model_dir = resolve_model_dir(path)
        import transformers
        from transformers import AutoTokenizer

        from sftlab.tasks import task_of_model

        try:
            task = task_of_model(transformers.AutoConfig.from_pretrained(model_dir))
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = getattr(transformers, task.auto_model).from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SftlabError(
                f"Could not load the model in {str(model_dir)!r} ({first}); re-export it with "
                "sftlab.deploy.export_model or model.save_pretrained + tokenizer.save_pretrained."
            ) from None
        max_length = max_length or _trained_max_length(model_dir)
        kind = EntityTagger if task.name == "token_classification" else cls
        return kind(model, tokenizer, max_length=max_length, device=device,
                    precision=precision, source=str(model_dir))

    # -- inference
    def predict_proba(self, texts: str | Iterable[str], batch_size: int = 64):
        """Class probabilities, shape (n_texts, n_labels), rows in input order (numpy float32)."""
        import numpy as np

        texts = self._as_list(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        batch_size = checked("batch_size", batch_size, int, positive=True)
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
        top_k = checked("top_k", top_k, int, positive=True, allow_none=True)
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
        """Probabilities for ``texts`` (input order), forwarded in batches of similar length."""
        import numpy as np
        import torch

        from sftlab.data.batching import collate
        from sftlab.pooling import logits_of

        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        keys = [k for k in enc.keys() if k in _MODEL_INPUTS]
        features = [{k: torch.tensor(enc[k][i]) for k in keys} for i in range(len(texts))]
        order = sorted(range(len(texts)), key=lambda i: len(features[i]["input_ids"]), reverse=True)
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.precision == "bf16" else None)
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                # the training collate: a served batch is padded exactly like a trained one
                batch = collate([features[i] for i in idx], self.tokenizer)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if autocast is not None:
                    with autocast:
                        logits = logits_of(self.model, batch, self.pooling)
                else:
                    logits = logits_of(self.model, batch, self.pooling)
                logits = logits.float()
                probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
                out[idx] = probs.cpu().numpy()
        return out


class EntityTagger:
    """A loaded token classifier (NER): ``Classifier.load(dir).predict(["some text", ...])``.

    Each text gives ``{"text": ..., "entities": [{"entity_group", "word", "start", "end",
    "score"}]}``, character offsets into the text. The entities are those of
    ``transformers.pipeline("token-classification", aggregation_strategy="simple")`` on the
    same folder, because they come from it: grouping sub-word tags into spans and mapping them
    back to characters is subtle (offsets, ``##`` pieces, B-/I- runs), and the pipeline is what
    anyone else loading the export runs. sftlab adds the run-dir lookup, batching, bf16 and a
    flat JSON-ready record. Texts longer than the tokenizer's limit are cut there.
    """

    task = "token_classification"

    def __init__(self, model, tokenizer, *, max_length: int | None = None, device=None,
                 precision: str = "fp32", source: str | None = None):
        import torch
        from transformers import pipeline

        _check_precision(precision)
        self.device = torch.device(device) if device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.precision = precision
        self.source = source
        self.max_length = max_length
        cfg = model.config
        self.labels: list[str] = [str(cfg.id2label[i]) for i in range(int(cfg.num_labels))]
        self.pipe = pipeline("token-classification", model=self.model, tokenizer=tokenizer,
                             aggregation_strategy="simple", device=self.device)

    def predict(self, texts: str | Iterable[str], batch_size: int = 64,
                top_k: int | None = None) -> list[dict[str, Any]]:
        """One record per text, in input order: the text and its entities."""
        import torch

        if top_k is not None:
            raise ConfigError("top_k applies to text classification; a token classifier returns entities.")
        batch_size = checked("batch_size", batch_size, int, positive=True)
        texts = Classifier._as_list(texts)
        if not texts:
            return []
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    groups = self.pipe(texts, batch_size=batch_size)
            else:
                groups = self.pipe(texts, batch_size=batch_size)
        return [{"text": text, "entities": [
            {"entity_group": str(e["entity_group"]), "word": str(e["word"]), "start": int(e["start"]),
             "end": int(e["end"]), "score": float(e["score"])} for e in ents]}
            for text, ents in zip(texts, groups, strict=True)]

    __call__ = predict

    def __repr__(self) -> str:
        return (f"EntityTagger(source={self.source!r}, tags={self.labels}, device={self.device}, "
                f"precision={self.precision})")


def _check_precision(precision: str) -> None:
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(_PRECISIONS)}.")


def _trained_max_length(model_dir: Path) -> int | None:
    """``model.max_length`` from the folder's saved training config, if it is there and sane."""
    cfg_file = model_dir / CONFIG_FILE
    if not cfg_file.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        log.warning("Could not parse %s; max_length falls back to the tokenizer's.", cfg_file)
        return None
    model = cfg.get("model") if isinstance(cfg, Mapping) else None
    value = model.get("max_length") if isinstance(model, Mapping) else None
    return int(value) if isinstance(value, int) and value > 0 else None
