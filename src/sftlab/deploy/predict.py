"""``predict(cfg)``: label texts from the command line, a file or stdin; JSON lines out.

Why JSON lines on stdout and nothing else there: the output is meant for pipes
(``... | python predict.py model_dir=run | jq .label``), so every log line, warning and error
goes to stderr, and Hydra is configured (conf/predict.yaml) to write no files and keep the cwd.

Inputs are read (and checked) before the model is loaded, so a wrong path or column fails at
once instead of after loading the weights. Structured files (.csv, .tsv, .jsonl,
.json) give one record per row, in row order, so outputs line up with inputs; in .txt files and
on stdin blank lines are skipped (each record carries its ``text``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig

from sftlab.errors import ConfigError, SftlabError, checked

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".json")
# texts handed to the classifier at a time: records stream out, memory stays flat
_CHUNK = 4096


def _lines(fh: TextIO, source: str) -> list[str]:
    texts, blank = [], 0
    for line in fh:
        line = line.rstrip("\r\n")
        if line.strip():
            texts.append(line)
        else:
            blank += 1
    if blank:
        log.warning("Skipped %d blank line(s) in %s.", blank, source)
    return texts


def _field(row: Any, field: str, where: str, columns_hint: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise SftlabError(f"{where} is a {type(row).__name__}, not an object or a string; "
                          "give one object (or string) per record.")
    if field not in row:
        raise SftlabError(f"{where} has no field {field!r} ({columns_hint}); set text_field=<the field "
                          "that holds the text>.")
    value = row[field]
    if value is None:
        raise SftlabError(f"{where} has an empty {field!r}; fill it or remove the row.")
    if not isinstance(value, str):
        value = str(value)
    return value


def read_file(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts from a .txt/.csv/.tsv/.jsonl/.json file (see the module docstring for the rules)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SftlabError(f"Input file {str(p)!r} does not exist; check input=<path>.")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise SftlabError(f"input={str(p)!r} has an unsupported extension; use one of "
                          f"{', '.join(SUFFIXES)}.")
    try:
        return _read(p, suffix, text_field)
    except UnicodeDecodeError:
        raise SftlabError(f"{p.name} is not UTF-8 text; convert it (e.g. iconv -t utf-8).") from None
    except csv.Error as err:
        raise SftlabError(f"{p.name} is not a well-formed {suffix[1:].upper()} file ({err}); fix it "
                          "or use .jsonl.") from None


def _read(p: Path, suffix: str, text_field: str) -> list[str]:
    with open(p, encoding="utf-8-sig", newline="" if suffix in (".csv", ".tsv") else None) as fh:
        if suffix == ".txt":
            return _lines(fh, str(p))
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            columns = reader.fieldnames or []
            if text_field not in columns:
                raise SftlabError(
                    f"{p.name} has no column {text_field!r} (columns: {', '.join(columns) or 'none'}); "
                    "set text_field=<the column that holds the text>."
                )
            return [_field(row, text_field, f"{p.name} row {i}", "")
                    for i, row in enumerate(reader, start=2)]
        if suffix == ".jsonl":
            texts = []
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SftlabError(f"{p.name} line {i} is not valid JSON ({err.msg}); "
                                      "write one JSON object per line.") from None
                hint = f"fields: {', '.join(map(str, row))}" if isinstance(row, dict) else ""
                texts.append(_field(row, text_field, f"{p.name} line {i}", hint))
            return texts
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise SftlabError(f"{p.name} is not valid JSON ({err.msg} at line {err.lineno}); "
                              "fix it or use .jsonl.") from None
    if not isinstance(data, list):
        raise SftlabError(f"{p.name} holds a JSON {type(data).__name__}; expected a list of objects "
                          "or strings.")
    out = []
    for i, row in enumerate(data):
        hint = f"fields: {', '.join(map(str, row))}" if isinstance(row, dict) else ""
        out.append(_field(row, text_field, f"{p.name} item {i}", hint))
    return out


def quote_text_args(argv: list[str]) -> list[str]:
    """Quote ``text=...`` for Hydra so that any text works as typed: ``text="Hello, world!"``.

    Hydra parses override values (a comma makes a sweep, brackets a list, ``${`` an
    interpolation); a text to classify is always one literal string, so the entry script
    quotes it before Hydra sees it. A value the user already quoted (``'text="a, b"'``) is kept.
    """
    out = []
    for arg in argv:
        if arg.startswith("text=") and not _quoted(arg[5:]):
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, arg[5:])
            value = value.replace("'", "\\'").replace("${", "\\${")
            arg = f"text='{value}'"
        out.append(arg)
    return out


def _quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def read_texts(cfg: DictConfig) -> tuple[list[str], str]:
    """(texts, where they came from) from ``text=``, ``input=`` or stdin, in that order."""
    text = cfg.get("text")
    if text is not None:
        return [str(text)], "text="
    source = cfg.get("input")
    if source is not None and str(source) != "-":
        return read_file(str(source), str(cfg.get("text_field") or "text")), str(source)
    if source is None and (sys.stdin is None or sys.stdin.isatty()):
        raise ConfigError('Nothing to predict: give text="...", input=<file>, or pipe texts on stdin.')
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin
    try:
        return _lines(stdin, "stdin"), "stdin"
    except UnicodeDecodeError:
        raise SftlabError("stdin is not UTF-8 text; convert it (e.g. iconv -t utf-8).") from None


def _open_output(output: Any) -> tuple[TextIO, bool]:
    if output is None or str(output) == "-":
        return sys.stdout, False
    p = Path(str(output)).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, "w", encoding="utf-8"), True
    except OSError as err:
        raise SftlabError(f"Cannot write output={str(p)!r} ({err.strerror}); pick a writable path.") from None


def _chunks(texts: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), n):
        yield texts[i:i + n]


def predict(cfg: DictConfig) -> int:
    """Write one JSON line per text; return how many were written."""
    if not cfg.get("model_dir"):
        raise ConfigError("model_dir is required: python predict.py model_dir=<run dir or model folder> "
                          'text="...".')
    from sftlab.deploy.export import resolve_model_dir

    model_dir = resolve_model_dir(str(cfg.model_dir))
    texts, source = read_texts(cfg)
    if not texts:
        log.warning("No texts in %s; nothing to predict.", source)
        return 0
    top_k = checked("top_k", cfg.get("top_k"), int, positive=True, allow_none=True)
    batch_size = checked("batch_size", cfg.get("batch_size") or 64, int, positive=True)

    from transformers.utils import logging as hf_logging

    from sftlab.deploy.predictor import Classifier

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise for a CLI
    clf = Classifier.load(model_dir, device=cfg.get("device"), precision=cfg.get("precision") or "fp32",
                          max_length=cfg.get("max_length"))
    log.info("Predicting %d text(s) from %s with %s", len(texts), source, clf)
    out, close = _open_output(cfg.get("output"))
    ascii_only = (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "") != "utf8"
    n = 0
    try:
        for chunk in _chunks(texts, _CHUNK):
            for text, rec in zip(chunk, clf.predict(chunk, batch_size=batch_size, top_k=top_k),
                                 strict=True):
                out.write(json.dumps({"text": text, **rec}, ensure_ascii=ascii_only) + "\n")
                n += 1
        out.flush()
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (silences the flush at exit)
        return n
    finally:
        if close:
            out.close()
    if close:
        print(f"Wrote {n} prediction(s) to {cfg.output}", file=sys.stderr)
    return n


def main(cfg: DictConfig) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    return predict(cfg)
