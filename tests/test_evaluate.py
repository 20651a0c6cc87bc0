"""eval.py on a file of your own, run exactly as the README shows it.

``python eval.py model_dir=<run> data=local data.test_file=new.csv`` must need nothing else:
``data=local`` marks ``train_file`` mandatory for training, but scoring reads only the scored
file, and the labels come from the model's ``id2label``. The entry script runs as a process
from another folder (relative paths resolve against the cwd; SFTLAB_ROOT keeps its run dir
inside tmp_path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import LABELS, ROOT, build_tiny_export, write_rows


def run_eval(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFTLAB_ROOT": str(cwd),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def only_run_dir(root: Path) -> Path:
    runs = sorted((root / "outputs" / "eval" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_eval_new_file_of_a_classification_run(tmp_path, tiny_data):
    import csv

    from sftlab import Classifier

    run = tmp_path / "run"
    build_tiny_export(run / "model")  # a run dir as training leaves it (wide random weights)
    with open(tiny_data["test"], encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    # string labels: the names of the model's id2label, not ids
    write_rows(tmp_path / "new.csv", [{"text": r["text"], "label": LABELS[int(r["label"])]} for r in rows])

    proc = run_eval(tmp_path, "model_dir=run", "data=local", "data.test_file=new.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    # the same model through the Python API: the accuracy eval.py reports is the one of its labels
    preds = [r["label"] for r in Classifier.load(run).predict([r["text"] for r in rows])]
    assert len(set(preds)) >= 2  # the wide random weights do tell rows apart
    want = sum(p == LABELS[int(r["label"])] for p, r in zip(preds, rows, strict=True)) / len(rows)
    assert abs(metrics["test/acc"] - want) < 1e-6, (metrics["test/acc"], want)


def test_eval_new_file_with_a_label_the_model_does_not_know(tmp_path):
    build_tiny_export(tmp_path / "run" / "model")
    write_rows(tmp_path / "new.csv", [{"text": "stocks rallied", "label": "Business"},
                                      {"text": "a new galaxy", "label": "Astronomy"}])
    proc = run_eval(tmp_path, "model_dir=run", "data=local", "data.test_file=new.csv")
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "'Astronomy'" in error[0] and "the model does not know" in error[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_eval_without_the_scored_file_says_which_key(tmp_path):
    build_tiny_export(tmp_path / "run" / "model")
    proc = run_eval(tmp_path, "model_dir=run", "data=local")
    assert proc.returncode == 2
    assert "data.test_file" in proc.stderr and "Traceback" not in proc.stderr
