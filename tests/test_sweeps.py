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
    assert "6 jobs, 4 completed." in md and md.count("| failed |") >= 1 and "## Failed or unfinished jobs" in md
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


# ------------------------------------------------------------------ sweeps that resume
# A callback that SIGKILLs the whole sweep (the basic launcher runs jobs in its own process) at
# one optimizer step of one job, once: "the machine died while job 2 was training".
KILL_IN_JOB = '''
import os
from pathlib import Path

import lightning.pytorch as pl


class KillInJob(pl.Callback):
    def __init__(self, job, at_job, step, marker):
        self.job, self.at_job, self.step, self.marker = int(job), int(at_job), int(step), Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.job == self.at_job and trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), 9)
'''


def kill_in_job_args(tmp_path: Path, job: int = 2, step: int = 3) -> list[str]:
    (tmp_path / "kill_in_job.py").write_text(KILL_IN_JOB)
    return ["+callbacks.kill._target_=kill_in_job.KillInJob", "+callbacks.kill.job=${hydra:job.num}",
            f"+callbacks.kill.at_job={job}", f"+callbacks.kill.step={step}",
            f"+callbacks.kill.marker={tmp_path / 'killed'}",
            # 6 steps per job, last.ckpt every 2: killed at step 3, job 2 resumes from step 2
            "data.batch_size=8", "checkpoint.every_n_steps=2"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content hash and mtime."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_killed_sweep_rerun_runs_only_the_jobs_that_did_not_finish(tmp_path, tiny_model_dir, tiny_data):
    """Acceptance (#18): a 4-job debug=fast sweep SIGKILLed while job 2 trains; the same command
    again skips jobs 0 and 1 (one "skipped" line each, their dirs untouched, every file's bytes
    and mtime), resumes job 2 from its last checkpoint, runs job 3, and the report has all 4."""
    from sftlab.report import main as report_main

    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=lr_strategy", "debug=fast", "optimizer.lr=1e-5,5e-5",
            "strategy=full,head_only", f"hydra.sweep.dir={sweep}",
            *tiny_args(tmp_path, tiny_model_dir, tiny_data), *kill_in_job_args(tmp_path)]
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    first = run_cli(*args, cwd=tmp_path, env_extra=env)
    assert first.returncode == -9, first.stderr[-3000:]  # SIGKILL: nothing recorded the end
    status = {j: json.loads((sweep / j / "metrics.json").read_text())["status"] for j in ("0", "1")}
    assert status == {"0": "completed", "1": "completed"}
    assert not (sweep / "2" / "metrics.json").exists() and (sweep / "2" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep / "3").exists()
    before = {j: snapshot(sweep / j) for j in ("0", "1")}
    values = {j: json.loads((sweep / j / "metrics.json").read_text())["val/acc"] for j in ("0", "1")}

    second = run_cli(*args, cwd=tmp_path, env_extra=env)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    skipped = [line for line in out.splitlines() if "skipped #" in line]
    assert len(skipped) == 2, out[-3000:]
    for j in ("0", "1"):
        [line] = [s for s in skipped if f"skipped #{j}:" in s]
        assert f"val/acc {values[j]:.4f}" in line and str(sweep / j) in line
        assert snapshot(sweep / j) == before[j], j  # not a byte, not an mtime changed
    # only jobs 2 and 3 ran: Hydra logged exactly those two as launched
    assert "#0 :" not in out and "#1 :" not in out and "#2 :" in out and "#3 :" in out
    m2 = json.loads((sweep / "2" / "metrics.json").read_text())
    m3 = json.loads((sweep / "3" / "metrics.json").read_text())
    assert m2["status"] == m3["status"] == "completed"
    assert m2["resumed_from"] == str(sweep / "2" / "checkpoints" / "last.ckpt") and m2["global_step"] == 6
    assert "resumed_from" not in m3
    overrides = yaml.safe_load((sweep / "2" / ".hydra" / "overrides.yaml").read_text())
    assert "optimizer.lr=5e-05" in overrides and "strategy=full" in overrides  # Hydra writes the sweep value so

    assert report_main([str(sweep)]) == 0
    with open(sweep / "report" / "results.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"]
    assert all(r["status"] == "completed" for r in rows)
    # one W&B group for the whole sweep, the resumed and the new jobs included
    groups = {yaml.safe_load((sweep / j / "config.yaml").read_text())["sweep_group"] for j in "0123"}
    assert groups == {f"debug-{sweep.name}"}


@pytest.mark.slow
def test_a_killed_optuna_study_continues_with_the_trials_it_had(tmp_path, tiny_model_dir, tiny_data):
    """Optuna: 4 trials, SIGKILLed while trial 2 trains. The same command again loads the study
    from <sweep dir>/optuna.db, runs only what is missing (trial 2 again, resumed in its own dir
    from its checkpoint, and trial 3), and the best value covers all 4 jobs."""
    import optuna

    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=4", "debug=fast", f"hydra.sweep.dir={sweep}",
            *tiny_args(tmp_path, tiny_model_dir, tiny_data), *kill_in_job_args(tmp_path)]
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    first = run_cli(*args, cwd=tmp_path, env_extra=env)
    assert first.returncode == -9, first.stderr[-3000:]
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    trials = optuna.load_study(study_name="sftlab_lr_strategy", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    before = {j: snapshot(sweep / j) for j in ("0", "1")}
    interrupted_params = trials[2].params

    second = run_cli(*args, cwd=tmp_path, env_extra=env)
    assert second.returncode == 0, second.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    assert all(snapshot(sweep / j) == before[j] for j in ("0", "1"))
    metrics = {j: json.loads((sweep / j / "metrics.json").read_text()) for j in jobs}
    assert all(m["status"] == "completed" for m in metrics.values())
    assert metrics["2"]["resumed_from"] == str(sweep / "2" / "checkpoints" / "last.ckpt")
    trials = optuna.load_study(study_name="sftlab_lr_strategy", storage=storage).trials
    # the interrupted trial is failed in the study and asked again with the same parameters
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[3].params == interrupted_params
    # the study's values are the jobs' own: trials 0, 1 from the first run, 2 (resumed) and 3
    assert sorted(t.value for t in trials if t.value is not None) == pytest.approx(
        sorted(m["val/acc"] for m in metrics.values()))
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(m["val/acc"] for m in metrics.values()))


def test_slurm_launcher_sizes_every_job_from_the_trainer(tmp_path):
    """#18: hydra/launcher=slurm with trainer.devices=4 trainer.num_nodes=2 asks SLURM for 2
    nodes × 4 tasks × 4 GPUs per job (tasks_per_node = gpus_per_node = devices: hydra #2231),
    each overridable, and says which launcher class runs it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def launcher(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=["hparams_search=lr_strategy", "hydra/launcher=slurm", *overrides],
                          return_hydra_config=True)
        GlobalHydra.instance().clear()
        return cfg.hydra.launcher

    got = launcher("trainer.devices=4", "trainer.num_nodes=2")
    assert (got.tasks_per_node, got.gpus_per_node, got.nodes) == (4, 4, 2)
    assert got._target_ == "hydra_plugins.sftlab_launchers.slurm.SftlabSlurmLauncher"
    assert got.max_num_timeout > 0 and got.signal_delay_s > 0  # submitit's requeue is the one on
    got = launcher("trainer.devices=4", "hydra.launcher.gpus_per_node=null", "hydra.launcher.partition=cpu")
    assert (got.tasks_per_node, got.gpus_per_node, got.nodes, got.partition) == (4, None, 1, "cpu")

    # the acceptance command line; --cfg hydra prints the interpolations, resolved they are
    # the numbers
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    base = ["hparams_search=lr_strategy", "hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"]
    shown = run_cli(*base, "--cfg", "hydra", cwd=tmp_path, env_extra=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    launcher_yaml = yaml.safe_load(shown.stdout)["hydra"]["launcher"]
    assert launcher_yaml["tasks_per_node"] == launcher_yaml["gpus_per_node"] == "${trainer.devices}"
    assert launcher_yaml["nodes"] == "${trainer.num_nodes}"
    resolved = run_cli(*base, "--cfg", "all", "--resolve", "-p", "hydra.launcher", cwd=tmp_path, env_extra=env)
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    launcher_yaml = yaml.safe_load(resolved.stdout)
    assert (launcher_yaml["tasks_per_node"], launcher_yaml["gpus_per_node"], launcher_yaml["nodes"]) == (4, 4, 2)


def test_a_sweep_dir_of_other_jobs_is_refused_not_reused(tmp_path):
    """A job dir holding a job of other overrides (another grid into the same sweep dir) is
    refused with one sentence; `sweep.*` keys (how to sweep) do not make a job another one."""
    from sftlab.errors import ConfigError
    from sftlab.sweeps import RESUME, SKIP, START, plan

    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optimizer.lr=1e-05", "strategy=full"]))
    assert plan(job, ["strategy=full", "optimizer.lr=1e-05"])[0] == START  # order does not matter
    assert plan(job, ["strategy=full", "optimizer.lr=1e-05", "+sweep.rerun_failed=true"], True)[0] == START
    with pytest.raises(ConfigError, match="other overrides .* give a new hydra.sweep.dir"):
        plan(job, ["optimizer.lr=2e-05", "strategy=full"])
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert plan(job, ["optimizer.lr=1e-05", "strategy=full"])[0] == RESUME  # killed: no record
    (job / "metrics.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    assert plan(job, ["optimizer.lr=1e-05", "strategy=full"])[0] == SKIP
    assert plan(job, ["optimizer.lr=1e-05", "strategy=full"], rerun_failed=True)[0] == START
    (job / "metrics.json").write_text(json.dumps({"status": "completed", "val/acc": 0.75}))
    action, state = plan(job, ["optimizer.lr=1e-05", "strategy=full"], rerun_failed=True)
    assert action == SKIP and state.value == 0.75


@pytest.mark.slow
def test_failed_sweep_jobs_rerun_only_when_asked(tmp_path, tiny_model_dir, tiny_data):
    """A job that failed (its training file was missing) stays failed on a plain re-run (one
    "skipped" line, the record untouched); with sweep.rerun_failed=true it runs again in its dir,
    the failed attempt kept aside under failed_attempts/0/."""
    import shutil

    sweep = tmp_path / "sweep"
    late = tmp_path / "late" / "train.csv"
    args = ["-m", "hparams_search=lr_strategy", "debug=fast", "optimizer.lr=1e-4", "strategy=head_only",
            f"hydra.sweep.dir={sweep}", *tiny_args(tmp_path, tiny_model_dir, tiny_data), f"data.train_file={late}"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    record = (sweep / "0" / "metrics.json").read_text()
    assert json.loads(record)["status"] == "failed"
    late.parent.mkdir()
    shutil.copy(tiny_data["train"], late)  # the cause is gone now

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in (again.stdout + again.stderr).splitlines() if "skipped #0: failed" in line]
    assert (sweep / "0" / "metrics.json").read_text() == record

    rerun = run_cli(*args, "sweep.rerun_failed=true", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "completed"
    assert (sweep / "0" / "failed_attempts" / "0" / "metrics.json").read_text() == record
