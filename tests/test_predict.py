"""predict.py end to end: JSON lines on stdout (nothing else there), every input kind, clean errors.

The entry script runs as a subprocess from the repo root, the way users run it; its records
are compared with Classifier in this process. File readers are unit-tested in-process.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from conftest import LABELS, build_tiny_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Stocks rallied on Wall Street, led by tech shares (again).",
    'The "Red Sox" won the World Series ${not.an.interpolation} [1,2]',
    "NASA launches a new probe to study the Sun",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return build_tiny_export(tmp_path_factory.mktemp("predict") / "model")


@pytest.fixture(scope="module")
def clf(exported):
    from sftlab.deploy import Classifier

    return Classifier.load(exported)


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "predict.py", *args], cwd=ROOT, env=env, text=True, capture_output=True,
        input=stdin if stdin is not None else "", timeout=120,
    )


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]  # every stdout line is JSON


def assert_matches(recs: list[dict], texts: list[str], clf) -> None:
    expected = clf.predict(texts)
    if len(texts) > 1:  # the rows differ, so records out of order would not match
        assert len({e["label"] for e in expected}) == len(texts), expected
    assert [r["text"] for r in recs] == texts
    for r, e in zip(recs, expected, strict=True):
        assert (r["label"], r["label_id"]) == (e["label"], e["label_id"])
        assert abs(r["score"] - e["score"]) < 1e-4
        assert all(abs(r["probabilities"][k] - e["probabilities"][k]) < 1e-4 for k in LABELS)


def test_text_argument_is_literal(exported, clf):
    res = run(f"model_dir={exported}", f"text={TEXTS[1]}")
    assert res.returncode == 0, res.stderr
    recs = records(res.stdout)
    assert len(recs) == 1
    assert set(recs[0]) == {"text", "label", "label_id", "score", "probabilities"}
    assert_matches(recs, [TEXTS[1]], clf)
    assert not (ROOT / ".hydra").exists() and not (ROOT / "predict.log").exists()


def test_txt_input_to_output_file_with_top_k(exported, clf, tmp_path):
    src = tmp_path / "texts.txt"
    src.write_text(TEXTS[0] + "\n\n" + TEXTS[2] + "\n", encoding="utf-8")
    out = tmp_path / "sub" / "preds.jsonl"
    res = run(f"model_dir={exported.parent}", f"input={src}", f"output={out}", "top_k=2",
              "batch_size=1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    recs = records(out.read_text(encoding="utf-8"))
    assert_matches(recs, [TEXTS[0], TEXTS[2]], clf)  # the blank line is skipped
    assert all(len(r["top_k"]) == 2 and r["top_k"][0] == [r["label"], r["score"]] for r in recs)


def test_csv_input_with_text_field(exported, clf, tmp_path):
    src = tmp_path / "data.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "sentence"])
        w.writerows([[i, t] for i, t in enumerate(TEXTS)])
    res = run(f"model_dir={exported}", f"input={src}", "text_field=sentence")
    assert res.returncode == 0, res.stderr
    assert_matches(records(res.stdout), TEXTS, clf)


def test_stdin(exported, clf):
    res = run(f"model_dir={exported}", stdin="\n".join(TEXTS) + "\n")
    assert res.returncode == 0, res.stderr
    assert_matches(records(res.stdout), TEXTS, clf)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model_dir=/no/such/folder", "text=hi"], "does not exist"),
        (["text=hi"], "model_dir is required"),
        (["model_dir={model}", "input=data/ag_news/test.csv", "text_field=sentence"],
         "no column 'sentence'"),
        (["model_dir={model}", "input=/no/such/file.txt"], "does not exist"),
    ],
)
def test_errors_are_one_line(exported, args, message):
    res = run(*(a.format(model=exported) for a in args))
    assert res.returncode == 2
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_read_file_formats(tmp_path):
    from sftlab.deploy.predict import read_file
    from sftlab.errors import SftlabError

    (tmp_path / "a.tsv").write_text("label\ttext\n1\thello, world\n2\tbye\n", encoding="utf-8")
    assert read_file(tmp_path / "a.tsv") == ["hello, world", "bye"]
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n\n{"body": "y"}\n"z"\n', encoding="utf-8")
    assert read_file(tmp_path / "a.jsonl", "body") == ["x", "y", "z"]
    (tmp_path / "a.json").write_text(json.dumps([{"text": "p"}, "q"]), encoding="utf-8")
    assert read_file(tmp_path / "a.json") == ["p", "q"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(SftlabError, match="line 2 is not valid JSON"):
        read_file(tmp_path / "bad.jsonl")
    with pytest.raises(SftlabError, match="no field 'text'"):
        read_file(tmp_path / "a.jsonl")
    (tmp_path / "a.parquet").write_bytes(b"")
    with pytest.raises(SftlabError, match="unsupported extension"):
        read_file(tmp_path / "a.parquet")


def test_quote_text_args():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from sftlab.deploy.predict import quote_text_args

    parser = OverridesParser.create()
    for text in ["Hello, world", "It's \"fine\"", "a\\b", "x=${y}", "[1,2]", "ends\\", "null", "",
                 "{a: 1}", "12"]:
        (arg,) = quote_text_args([f"text={text}"])
        value = parser.parse_override(arg).value()
        assert OmegaConf.create({"text": value}).text == text
    assert quote_text_args(["text='a, b'", "top_k=2"]) == ["text='a, b'", "top_k=2"]
