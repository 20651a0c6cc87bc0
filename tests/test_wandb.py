"""W&B: an offline run, read back with wandb's own reader, holds what a dashboard needs.

Why read the run back instead of mocking ``wandb``: the failure modes that matter are in the
hand-off (Lightning's logger, our factory, ``wandb.finish``), and only the files wandb wrote
show whether the group, the config or a metric actually arrived. ``wandb leet inspect`` (wandb
0.31) reads a run's ``.wandb`` transaction log: ``--summary --json`` gives state, exit code,
project, tags, the config and the summary (last value of every key); ``--json`` gives the raw
records, among them the ``run`` record with the group and job type.

Everything stays in ``tmp_path``: the run's files (``logger.wandb.save_dir``) and wandb's own
cache, config and artifact-staging dirs (``WANDB_*_DIR``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# a made-up credential: it must not appear in anything the run writes
FAKE_KEY = "local-" + "0123456789abcdef" * 2 + "deadbeef"


def wandb_exe() -> str:
    here = Path(sys.executable).with_name("wandb")
    return str(here) if here.is_file() else (shutil.which("wandb") or "wandb")


def run_dirs(run: Path) -> list[Path]:
    """The offline W&B run folders under one sftlab run dir."""
    return sorted((run / "wandb").glob("offline-run-*"))


def inspect_summary(wandb_run: Path) -> dict:
    proc = subprocess.run([wandb_exe(), "leet", "inspect", "--summary", "--json", str(wandb_run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def inspect_run_record(wandb_run: Path) -> dict:
    """The ``run`` record of the transaction log: group, job type, tags as wandb.init got them."""
    proc = subprocess.run([wandb_exe(), "leet", "inspect", "--json", str(wandb_run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    runs = [r["run"] for r in records if r.get("type") == "run"]
    assert runs, "no run record in the .wandb log"
    return runs[0]


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """Offline W&B with every wandb dir inside tmp_path, a fake key in the environment, and one
    intra-op thread (a tiny model on a shared 2-core box runs ~100x faster with one)."""
    import torch

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_offline_run_holds_metrics_config_names_lrs_and_confusion(compose, tmp_path, wandb_env):
    from omegaconf import OmegaConf

    from sftlab.train import train

    run = tmp_path / "run"
    cfg = compose("logger=wandb", "logger.wandb.project=sftlab-test", "logger.wandb.group=g-test",
                  "tags=[t1,t2]", out=run)
    metrics = train(cfg)

    [wrun] = run_dirs(run)
    s = inspect_summary(wrun)
    assert s["state"] == "finished" and s["exit_code"] == 0
    assert s["project"] == "sftlab-test" and s["tags"] == ["t1", "t2"]
    rec = inspect_run_record(wrun)
    assert rec["run_group"] == "g-test" and rec["job_type"] == cfg.task_name

    summary = s["summary"]
    for key in ("val/acc", "val/f1_macro", "test/acc", "test/f1_macro"):
        assert summary[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert summary["trainable_params"] == metrics["trainable_params"] == metrics["total_params"]
    # each parameter group's LR by name (LearningRateMonitor reads the names optim.py keeps)
    parts = {"embeddings", "block.0", "block.1", "pooler", "head"}
    lrs = {k.split("/", 1)[1] for k in summary if k.startswith("lr-")}
    assert parts <= lrs and {f"{p}/no_decay" for p in parts} <= lrs, sorted(lrs)

    # the resolved config, exactly what train.py saved as config.yaml
    logged = {k: v for k, v in s["config"].items() if not k.startswith("_")}
    saved = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    assert logged == json.loads(json.dumps(saved))
    assert logged["optimizer"]["lr"] == cfg.optimizer.lr and logged["logger"]["wandb"]["group"] == "g-test"

    # the test confusion matrix: a W&B table whose counts are the run's confusion_matrix.csv
    assert summary["test/confusion_matrix_table"]["_type"] == "table-file"
    [table] = wrun.glob("files/media/table/test/confusion_matrix_table*.table.json")
    data = json.loads(table.read_text())
    cols = data["columns"]
    counts = {(r[cols.index("Actual")], r[cols.index("Predicted")]): r[cols.index("nPredictions")]
              for r in data["data"]}
    lines = (run / "confusion_matrix.csv").read_text().splitlines()
    labels = lines[0].split(",")[1:]
    for line in lines[1:]:
        true, *row = line.split(",")
        for pred, n in zip(labels, row, strict=True):
            assert counts.get((true, pred), 0) == int(n), (true, pred)
    assert sum(counts.values()) == 24

    # no secret anywhere the run wrote: not in W&B's files, the config or the run dir
    for path in run.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert "api_key" not in json.dumps(logged).lower()


def test_a_failing_run_is_finished_as_failed(compose, tmp_path, wandb_env):
    """A NaN mid-fit raises, and the W&B run is closed with exit code 1 (not left running, so
    the next multirun job starts a run of its own)."""
    import wandb

    from sftlab.errors import TrainingError
    from sftlab.train import train

    run = tmp_path / "run"
    cfg = compose("logger=wandb", "optimizer.lr=1e30", "export=false", out=run)
    with pytest.raises(TrainingError, match="loss is nan"):
        train(cfg)
    assert wandb.run is None
    [wrun] = run_dirs(run)
    s = inspect_summary(wrun)
    assert (s["state"], s["exit_code"]) == ("failed", 1)


def test_single_run_has_no_group_and_multirun_group_is_the_sweep_dir(compose):
    """The factory's default group: none for a single run; ``<task>-<sweep dir name>`` in a
    multirun job (the same name the hparams_search presets give)."""
    from sftlab.loggers import multirun_group

    compose("hydra.sweep.dir=/x/multirun/2026-01-01_00-00-00_ab12")  # sets HydraConfig (mode RUN)
    assert multirun_group("train") is None
    compose("hydra.mode=MULTIRUN", "hydra.sweep.dir=/x/multirun/2026-01-01_00-00-00_ab12")
    assert multirun_group("train") == "train-2026-01-01_00-00-00_ab12"


def test_two_job_multirun_makes_two_runs_in_one_group(tmp_path, tiny_model_dir, tiny_data):
    """``python train.py -m logger=wandb ...`` with no sweep_group: two distinct W&B runs, one
    group, named after the sweep dir."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "WANDB_API_KEY": FAKE_KEY}
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "wandb_home" / var.lower())
    args = [
        "-m", "logger=wandb", "debug=fast", "optimizer.lr=1e-3,2e-3", "export=false",
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={tiny_data['train']}",
        f"data.validation_file={tiny_data['validation']}", f"data.test_file={tiny_data['test']}",
        "model.max_length=32", "~callbacks.progress_bar",
    ]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sweep] = list((tmp_path / "logs" / "debug" / "multirun").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    records = []
    for job in jobs:
        [wrun] = run_dirs(job)
        s = inspect_summary(wrun)
        assert s["state"] == "finished" and s["exit_code"] == 0
        assert s["summary"]["val/acc"] == pytest.approx(json.loads((job / "metrics.json").read_text())["val/acc"])
        records.append((s["run_id"], inspect_run_record(wrun)["run_group"], s["config"]["optimizer"]["lr"]))
    (id0, group0, lr0), (id1, group1, lr1) = records
    assert id0 != id1 and (lr0, lr1) == (1e-3, 2e-3)
    assert group0 == group1 == f"debug-{sweep.name}"
