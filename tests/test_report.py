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
    # no metrics.json: running, or killed before writing one (not a Python failure)
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "unfinished", "completed"]
    assert rows[1]["val/acc"] == "0.85" and rows[0]["strategy"] == "full"
    md = (out / "results.md").read_text()
    assert "| full | 0.8000 | 0.8500 |" in md
    assert "loss is nan" in md and "unfinished: no metrics.json (still running" in md
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


def test_an_ner_sweep_is_ranked_on_entity_f1(tmp_path):
    """Token-classification jobs record main_metric f1: the best job and the grid are by val/f1,
    not by val/acc (token accuracy, which ranks these two jobs the other way)."""
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, "full", 1e-5, {"status": "completed", "main_metric": "f1", "val/f1": 0.7,
                                      "val/acc": 0.95, "test/f1": 0.65})
    fake_job(sweep, 1, "full", 5e-5, {"status": "completed", "main_metric": "f1", "val/f1": 0.8,
                                      "val/acc": 0.94, "test/f1": 0.75})
    md = (report(sweep) / "results.md").read_text()
    assert "Best val/f1: job 1 (full, lr 5e-05): val/f1 0.8000, test/f1 0.7500." in md
    assert "## val/f1: strategy × lr" in md and "| full | 0.7000 | 0.8000 |" in md


def study_job(sweep: Path, num: int, strategy: str, lr: float, seed: int, metrics: dict | None,
              lr_scale: float | None = None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"strategy={strategy}", f"seed={seed}"]))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"strategy": strategy}}}}))
    optimizer = {"lr": lr} if lr_scale is None else {"lr": "${strategy.lr}", "lr_scale": lr_scale}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "optimizer": optimizer, "strategy": {"lr": lr}}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"status": "completed", **metrics}))


def test_study_means_cis_and_paired_differences_match_scipy(tmp_path):
    """cells.csv / strategies.csv on hand-made numbers equal a direct scipy computation."""
    import numpy as np
    from scipy import stats

    sweep = tmp_path / "sweep"
    full = {1: (0.90, 0.895), 2: (0.91, 0.902), 3: (0.905, 0.899)}     # seed: (val, test)
    lora_lo = {1: (0.85, 0.84), 2: (0.86, 0.85), 3: (0.84, 0.845)}      # lora at 1e-4
    lora_hi = {1: (0.89, 0.88), 2: (0.895, 0.889), 3: (0.9, 0.884)}     # lora at 4e-4: chosen
    num = 0
    for name, lr, table, t in (("full", 2e-5, full, 300.0), ("lora", 1e-4, lora_lo, 200.0),
                               ("lora", 4e-4, lora_hi, 200.0)):
        for seed, (val, test) in table.items():
            # lora's LR through the interpolation and lr_scale (0.5 x 8e-4 = 4e-4)
            scale = 0.5 if (name, lr) == ("lora", 4e-4) else None
            study_job(sweep, num, name, lr * 2 if scale else lr, seed,
                      {"val/acc": val, "test/acc": test, "train_time_s": t + seed, "trainable_params": 7},
                      lr_scale=scale)
            num += 1
    study_job(sweep, num, "lora", 4e-4, 4, None)  # died: counted as failed, never averaged
    out = report(sweep)
    with open(out / "cells.csv", encoding="utf-8") as fh:
        cells = {(r["strategy"], float(r["lr"])): r for r in csv.DictReader(fh)}
    assert set(cells) == {("full", 2e-5), ("lora", 1e-4), ("lora", 4e-4)}
    hi = cells[("lora", 4e-4)]
    assert (hi["n"], hi["failed"]) == ("3", "1")
    test = np.array([lora_hi[s][1] for s in (1, 2, 3)])
    mean, sem = test.mean(), stats.sem(test)
    lo_ci, hi_ci = stats.t.interval(0.95, len(test) - 1, loc=mean, scale=sem)
    assert float(hi["test/acc_mean"]) == pytest.approx(mean)
    assert float(hi["test/acc_std"]) == pytest.approx(test.std(ddof=1))
    assert (float(hi["test/acc_ci_low"]), float(hi["test/acc_ci_high"])) == pytest.approx((lo_ci, hi_ci))
    assert float(hi["train_time_s_mean"]) == pytest.approx(202.0)

    with open(out / "strategies.csv", encoding="utf-8") as fh:
        strat = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert float(strat["lora"]["lr"]) == pytest.approx(4e-4)  # chosen on validation, not test
    diffs = np.array([lora_hi[s][1] - full[s][1] for s in (1, 2, 3)])
    d_lo, d_hi = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert float(strat["lora"]["diff_vs_full_mean"]) == pytest.approx(diffs.mean())
    assert (float(strat["lora"]["diff_vs_full_ci_low"]), float(strat["lora"]["diff_vs_full_ci_high"])) \
        == pytest.approx((d_lo, d_hi))
    assert strat["lora"]["verdict"] == ("worse" if d_hi < 0 else "within noise")
    assert strat["full"]["verdict"] == "baseline"
    md = (out / "README.md").read_text()
    assert "Recommended: **" in md and "1 failed or unfinished" in md
    for png in ("val_vs_lr.png", "cost_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_recommendation_is_the_cheapest_within_noise_on_validation():
    from sftlab.report.study import cells, recommend, strategies

    rows = []
    for name, vals, t in (("full", [0.90, 0.91, 0.92], 300), ("head_only", [0.905, 0.90, 0.925], 30),
                          ("bitfit", [0.80, 0.81, 0.82], 10)):
        for seed, v in enumerate(vals):
            rows.append({"job": f"{name}{seed}", "strategy": name, "lr": 1e-3, "seed": seed, "status": "completed",
                         "metrics": {"val/acc": v, "test/acc": v - 0.01}, "train_time_s": t, "trainable_params": 1})
    pick, sentence = recommend(strategies(cells(rows), "acc"), "acc")
    # bitfit is cheapest but clearly worse; head_only is within noise of full and 10x cheaper
    assert pick["strategy"] == "head_only" and "head_only" in sentence


def test_study_is_logged_to_the_jobs_wandb_group(tmp_path, monkeypatch):
    """Jobs that logged to W&B: the report becomes a job_type=report run in their group,
    with the tables, the charts and the recommendation (offline files, read back)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_wandb import inspect_run_record, inspect_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    sweep = tmp_path / "sweep"
    for num, (name, seed, val) in enumerate((("full", 1, 0.9), ("full", 2, 0.91), ("head_only", 1, 0.8),
                                             ("head_only", 2, 0.82))):
        study_job(sweep, num, name, 1e-3, seed, {"val/acc": val, "test/acc": val - 0.01, "train_time_s": 10.0})
        (sweep / str(num) / "config.yaml").write_text(yaml.safe_dump(
            {"task_name": "train", "logger": {"wandb": {"_target_": "sftlab.loggers.wandb_logger",
                                                        "project": "sftlab-test", "group": "study-g"}}}))
    out = report(sweep)
    [wrun] = sorted((out / "wandb").glob("offline-run-*"))
    rec = inspect_run_record(wrun)
    assert rec["run_group"] == "study-g" and rec["job_type"] == "report"
    s = inspect_summary(wrun)
    assert s["project"] == "sftlab-test" and s["state"] == "finished"
    assert s["summary"]["recommended_strategy"] == "full"
    assert "Recommended: **full**" in s["summary"]["recommendation"]
    for key in ("study/strategies", "study/cells", "study/val_vs_lr", "study/cost_accuracy"):
        assert key in s["summary"], key
    # a sweep whose jobs did not use W&B is not logged unless asked
    plain = tmp_path / "plain"
    study_job(plain, 0, "full", 1e-3, 1, {"val/acc": 0.9, "test/acc": 0.9})
    assert not (report(plain) / "wandb").exists()
