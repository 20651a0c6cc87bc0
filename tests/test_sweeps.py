"""Sweeps: W&B sweep files generate only composable command lines; Hydra multiruns report.

The multirun tests run real sweeps of the tiny model through the CLI (``python train.py -m``),
as a user would (~12 s each on a quiet 2-core machine; the optuna one is marked slow), because what can break is between the pieces: Hydra's sweeper and launcher, a job
that fails in the middle of a sweep, the files each job leaves, and the report that reads them.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT


def sweep_command_lines(path: Path) -> list[list[str]]:
    """What `wandb agent` would run: ${args_no_hyphens} is key=value for each parameter.

    Grid sweeps: every combination. Bayes/random: each categorical value with the bounds of
    each numeric range (the extremes are where a bad value would show).
    """
    spec = yaml.safe_load(path.read_text())
    axes = []
    for key, p in spec["parameters"].items():
        if "values" in p:
            axes.append([(key, v) for v in p["values"]])
        elif "value" in p:
            axes.append([(key, p["value"])])
        else:
            axes.append([(key, p["min"]), (key, p["max"])])
    tail = [c for c in spec["command"] if not c.startswith("${")]
    assert spec["command"][:4] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    return [[f"{k}={v}" for k, v in combo] + tail for combo in itertools.product(*axes)]


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_wandb_sweep_command_composes(compose, sweep_file):
    """Each command line composes, the swept value lands where the sweep meant it, and the
    strategy it names accepts every swept key (a misspelt key or a strategy without
    ``lr_decay`` would only show on the agent's machine, one failed run at a time)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    spec = yaml.safe_load(sweep_file.read_text())
    assert spec["program"] == "train.py" and (ROOT / spec["program"]).is_file()
    assert spec["metric"]["name"] == "val/acc"  # what train.py logs each validation, and returns
    lines = sweep_command_lines(sweep_file)
    assert lines
    strategies = {p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")}
    for args in lines:
        cfg = compose(*args, tiny=False)
        assert "wandb" in cfg.logger, args  # the sweep's runs report to W&B
        for arg in args:
            key, value = arg.split("=", 1)
            if key in ("strategy", "logger"):  # config groups: the option was chosen
                continue
            assert OmegaConf.select(cfg, key) == pytest.approx(float(value)), (arg, OmegaConf.select(cfg, key))
        chosen = dict(a.split("=", 1) for a in args)["strategy"]
        assert chosen in strategies
        strategy = instantiate(cfg.strategy)  # the strategy accepts every swept key
        assert strategy.name == chosen
        assert cfg.optimizer.lr > 0


def test_hparams_search_presets_compose_and_name_one_group(compose):
    """Both presets compose, run as a multirun, and give every job the same W&B group."""
    for preset in ("lr_strategy", "optuna"):
        cfg = compose(f"hparams_search={preset}", tiny=False)
        assert cfg.sweep_group and cfg.sweep_group.startswith(f"{cfg.task_name}-"), preset


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(tmp_path: Path, tiny_model_dir: Path, tiny_data: dict) -> list[str]:
    return [
        f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={tiny_data['train']}",
        f"data.validation_file={tiny_data['validation']}", f"data.test_file={tiny_data['test']}",
        "model.max_length=32", "~callbacks.progress_bar", "export=false",
    ]


def test_multirun_lr_strategy_then_report(tmp_path, tiny_model_dir, tiny_data):
    """The lr × strategy grid with a third, invalid LR: 6 jobs, the 2 with lr=-1 fail (train.py
    refuses the LR after the job's dir exists), the sweep goes on, and the report shows the 4
    completed rows with numbers and the 2 failed ones with their error."""
    from sftlab.report import main as report_main

    proc = run_cli("-m", "hparams_search=lr_strategy", "debug=fast", "optimizer.lr=1e-5,5e-5,-1",
                   "strategy=full,head_only", *tiny_args(tmp_path, tiny_model_dir, tiny_data), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]  # one bad job does not fail the sweep
    [sweep] = list((tmp_path / "debug" / "multirun").iterdir())
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 6

    assert report_main([str(sweep)]) == 0
    out = sweep / "report"
    with open(out / "results.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    done = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert {(r["strategy"], float(r["lr"])) for r in done} == {
        (s, lr) for s in ("full", "head_only") for lr in (1e-5, 5e-5)}
    assert {(r["strategy"], float(r["lr"])) for r in failed} == {("full", -1.0), ("head_only", -1.0)}
    for r in done:
        m = json.loads((sweep / r["job"] / "metrics.json").read_text())
        assert float(r["val/acc"]) == pytest.approx(m["val/acc"]) and 0 <= m["val/acc"] <= 1
        assert int(r["trainable_params"]) == m["trainable_params"]
    # head_only trains far fewer parameters than full, and the table says so
    tp = {r["strategy"]: int(r["trainable_params"]) for r in done}
    assert tp["head_only"] < tp["full"]
    for r in failed:
        assert "optimizer.lr must be a positive number" in r["error"]
    md = (out / "results.md").read_text()
    assert "6 jobs, 4 completed." in md and md.count("| failed |") >= 1 and "## Failed jobs" in md
    for png in ("val_acc_vs_lr.png", "params_vs_acc.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # the preset's W&B group is one name for the whole sweep (resolved once, like the sweep dir)
    groups = {yaml.safe_load((sweep / r["job"] / "config.yaml").read_text())["sweep_group"] for r in done}
    assert groups == {f"debug-{sweep.name}"}


@pytest.mark.slow
def test_optuna_three_trials_report_the_best(tmp_path, tiny_model_dir, tiny_data):
    """hydra-optuna-sweeper (with the optuna installed here) runs 3 TPE trials, maximises the
    val/acc train.main returns, and writes the best trial to optimization_results.yaml."""
    proc = run_cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "debug=fast",
                   *tiny_args(tmp_path, tiny_model_dir, tiny_data), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sweep] = list((tmp_path / "debug" / "multirun").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 3
    vals = [json.loads((j / "metrics.json").read_text())["val/acc"] for j in jobs]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and best["best_value"] == pytest.approx(max(vals))
    assert set(best["best_params"]) == {"optimizer.lr", "strategy", "strategy.lr_decay"}
    assert 1e-5 <= float(best["best_params"]["optimizer.lr"]) <= 2e-4
    # the trials' own choices are what ran
    winner = jobs[vals.index(max(vals))]
    overrides = yaml.safe_load((winner / ".hydra" / "overrides.yaml").read_text())
    assert f"strategy={best['best_params']['strategy']}" in overrides

    from sftlab.report import report

    rows = (report(sweep) / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(",completed," in r for r in rows)
