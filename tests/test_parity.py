"""benchmarks/parity.py: the per-task aggregation matches a direct scipy computation, and the
script runs both arms end to end on a tiny model (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def parity():
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summarize_matches_scipy():
    import numpy as np
    from scipy import stats

    sft = {1: 0.90, 2: 0.88, 3: 0.91}
    hf = {1: 0.89, 2: 0.885, 3: 0.895}
    results = {"t": {"sftlab": {s: {"test_acc": v, "wall_s": 10.0 * s} for s, v in sft.items()},
                     "hf": {s: {"test_acc": v, "wall_s": 5.0} for s, v in hf.items()}}}
    (row,) = parity().summarize(results)
    a = np.array(list(sft.values()))
    lo, hi = stats.t.interval(0.95, 2, loc=a.mean(), scale=stats.sem(a))
    assert row["sftlab_mean"] == pytest.approx(a.mean())
    assert (row["sftlab_ci_low"], row["sftlab_ci_high"]) == pytest.approx((lo, hi))
    d = a - np.array(list(hf.values()))
    dlo, dhi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert (row["diff_mean"], row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((d.mean(), dlo, dhi))
    assert row["verdict"] == "within noise" and row["pairs"] == 3
    assert row["sftlab_wall_s"] == pytest.approx(20.0)


def test_one_seed_gives_no_verdict():
    results = {"t": {"sftlab": {1: {"test_acc": 0.9, "wall_s": 1.0}}, "hf": {1: {"test_acc": 0.8, "wall_s": 1.0}}}}
    assert parity().summarize(results)[0]["verdict"] == "too few seeds"


@pytest.mark.slow
def test_parity_runs_both_arms_and_keeps_finished_cells(tmp_path, tiny_model_dir, tiny_data):
    task = ("toy=data=local data.train_file={train} data.validation_file={validation} data.test_file={test} "
            "trainer.max_epochs=1").format(**tiny_data)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "parity.py"), "--tasks", "", "--task", task, "--seeds", "1",
           "--out", str(tmp_path / "p"),
           "--overrides", f"model.name_or_path={tiny_model_dir} model.max_length=32 data.batch_size=8"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for arm in ("sftlab", "hf"):
        cell = json.loads((tmp_path / "p" / "toy" / arm / "seed1.json").read_text())
        assert 0.0 <= cell["test_acc"] <= 1.0 and cell["wall_s"] > 0
    md = (tmp_path / "p" / "parity.md").read_text()
    assert "| toy |" in md and "torch" in md
    before = (tmp_path / "p" / "toy" / "hf" / "seed1.json").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "p" / "toy" / "hf" / "seed1.json").stat().st_mtime_ns == before


def test_cells_before_ner_and_ner_cells_are_both_scored():
    # cells written before NER carry only test_acc; NER cells carry test_score and metric f1
    results = {"ner": {"sftlab": {1: {"metric": "f1", "test_score": 0.8, "wall_s": 1.0},
                                  2: {"metric": "f1", "test_score": 0.9, "wall_s": 1.0}},
                       "hf": {1: {"metric": "f1", "test_score": 0.7, "wall_s": 1.0},
                              2: {"metric": "f1", "test_score": 0.7, "wall_s": 1.0}}},
               "old": {"sftlab": {1: {"test_acc": 0.5, "wall_s": 1.0}}, "hf": {1: {"test_acc": 0.4, "wall_s": 1.0}}}}
    ner, old = parity().summarize(results)
    assert ner["metric"] == "f1" and ner["sftlab_mean"] == pytest.approx(0.85)
    assert ner["diff_mean"] == pytest.approx(0.15)
    assert old["metric"] == "acc" and old["diff_mean"] == pytest.approx(0.1)


@pytest.mark.slow
def test_parity_scores_ner_by_entity_f1_in_both_arms(tmp_path, tiny_model_dir):
    """A CoNLL task (a slice of the shipped sample): both arms write seqeval F1 cells."""
    src = ROOT / "data" / "conll2003"
    for split, n in (("train", 48), ("validation", 16), ("test", 16)):
        lines = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = (f"ner=data=conll2003 data.train_file={tmp_path}/train.jsonl data.validation_file={tmp_path}/validation.jsonl "
            f"data.test_file={tmp_path}/test.jsonl trainer.max_epochs=1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "parity.py"), "--tasks", "", "--task", task, "--seeds", "1",
           "--out", str(tmp_path / "p"),
           "--overrides", f"model.name_or_path={tiny_model_dir} model.max_length=32 data.batch_size=8"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for arm in ("sftlab", "hf"):
        cell = json.loads((tmp_path / "p" / "ner" / arm / "seed1.json").read_text())
        assert cell["metric"] == "f1" and 0.0 <= cell["test_score"] <= 1.0, cell
    assert "| ner | f1 |" in (tmp_path / "p" / "parity.md").read_text()
