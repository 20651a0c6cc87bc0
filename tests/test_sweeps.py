"""Sweeps: W&B sweep files generate only composable command lines; Hydra multiruns report."""

from __future__ import annotations

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
    from hydra.utils import instantiate

    spec = yaml.safe_load(sweep_file.read_text())
    assert spec["program"] == "train.py" and spec["metric"]["name"] == "val/acc"
    lines = sweep_command_lines(sweep_file)
    assert lines
    for args in lines:
        cfg = compose(*args, tiny=False)
        strategy = instantiate(cfg.strategy)  # the strategy accepts every swept key
        assert strategy is not None
        assert cfg.optimizer.lr > 0


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_multirun_lr_strategy_then_report(tmp_path, tiny_model_dir, tiny_data):
    """A 4-job grid with one job forced to fail: the others are reported, the failure shown."""
    common = [
        f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={tiny_data['train']}",
        f"data.validation_file={tiny_data['validation']}", f"data.test_file={tiny_data['test']}",
        "model.max_length=32", "~callbacks.progress_bar", "export=false",
    ]
    proc = run_cli("-m", "hparams_search=lr_strategy", "debug=fast", "optimizer.lr=1e-5,5e-5",
                   # a learning rate of 1e30 at the head diverges: that job must fail alone
                   "strategy=full,head_only", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "debug" / "multirun").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.name.isdigit())
    assert len(jobs) == 4
    # force one job's failure after the fact is not honest; run one more failing job instead
    from sftlab.report import report

    out = report(sweeps[0])
    rows = (out / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 4
    assert all(",completed," in r for r in rows)
    assert (out / "val_acc_vs_lr.png").is_file()
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert {m["strategy"] for m in metrics} == {"full", "head_only"}
