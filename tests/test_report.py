"""The sweep report reads job dirs (completed and failed) into a table and charts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from sftlab.errors import ConfigError
from sftlab.report import main, report


def fake_job(sweep: Path, num: int, strategy: str, lr: float, metrics: dict | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}", f"strategy={strategy}"]))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"strategy": strategy}}}}))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"lr": lr}}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_report_tables_and_charts(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, "full", 1e-5, {"status": "completed", "val/acc": 0.8, "test/acc": 0.79, "trainable_params": 1000})
    fake_job(sweep, 1, "full", 5e-5, {"status": "completed", "val/acc": 0.85, "test/acc": 0.84, "trainable_params": 1000})
    fake_job(sweep, 2, "head_only", 1e-5, {"status": "failed", "error": "FloatingPointError: loss is nan at step 3"})
    fake_job(sweep, 3, "head_only", 5e-5, None)  # died without writing anything
    fake_job(sweep, 10, "head_only", 1e-4, {"status": "completed", "val/acc": 0.6, "trainable_params": 10})
    assert main([str(sweep)]) == 0
    out = sweep / "report"
    with open(out / "results.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]  # numeric job order
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "failed", "completed"]
    assert rows[1]["val/acc"] == "0.85" and rows[0]["strategy"] == "full"
    md = (out / "results.md").read_text()
    assert "| full | 0.8000 | 0.8500 |" in md
    assert "loss is nan" in md and "no metrics.json" in md
    for png in ("val_acc_vs_lr.png", "params_vs_acc.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "report written to" in capsys.readouterr().out


def test_report_on_a_non_sweep_dir_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="No sweep jobs"):
        report(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2


def test_best_job_optuna_result_and_no_grid_for_continuous_lrs(tmp_path):
    """A Bayesian sweep: every job has its own LR, so no strategy × lr grid (one column per job
    says nothing); the best job and the sweeper's own best trial are stated instead."""
    sweep = tmp_path / "sweep"
    lrs = [1.1e-5, 2.3e-5, 3.7e-5, 4.1e-5, 5.9e-5, 6.2e-5, 7.5e-5, 8.8e-5, 9.4e-5]
    for i, lr in enumerate(lrs):
        fake_job(sweep, i, "full" if i % 2 else "partial", lr,
                 {"status": "completed", "val/acc": 0.5 + (0.3 if i == 4 else 0.01 * i), "test/acc": 0.6})
    (sweep / "optimization_results.yaml").write_text(yaml.safe_dump(
        {"name": "optuna", "best_params": {"optimizer.lr": 5.9e-5, "strategy": "partial"}, "best_value": 0.8}))
    md = (report(sweep) / "results.md").read_text()
    assert "Best val/acc: job 4 (partial, lr 5.9e-05): val/acc 0.8000, test/acc 0.6000." in md
    assert "strategy × lr" not in md
    assert "`optimizer.lr=5.9e-05 strategy=partial` → 0.8000" in md


def test_grid_cells_show_each_jobs_status(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, "full", 1e-5, {"status": "completed", "val/acc": 0.8})
    fake_job(sweep, 1, "full", 5e-5, {"status": "interrupted", "global_step": 7})
    md = (report(sweep) / "results.md").read_text()
    assert "| full | 0.8000 | interrupted |" in md
    assert "Best val/acc: job 0 (full, lr 1e-05)" in md
