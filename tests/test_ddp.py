"""DDP correctness on CPU: two gloo processes score every example exactly once, and only rank 0 writes.

The 2-process run goes through ``train.py trainer=ddp ...``, the way users start it:
Lightning re-launches the script for rank 1 inside rank 0's Hydra run dir. The script runs
under an audit hook that records every file each process writes, so "only rank 0 writes" is
checked on the files themselves.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT
from test_reliability import cli, tiny_args

# train.py run with an audit hook (PEP 578) that records, per process, every path it opens for
# writing, renames onto, creates or removes. Lightning re-launches ``sys.argv[0]`` for rank 1,
# so rank 1 runs under the hook too, and what it wrote is on record, not inferred from a log.
RECORDING_TRAIN = """
import os, sys

rank = os.environ.get("LOCAL_RANK", "0")  # Lightning sets it for the ranks it launches
record = open(os.environ["SFTLAB_TEST_WRITES"], "a", buffering=1, encoding="utf-8")
record.write(f"{rank}\\tstart\\t{os.getpid()}\\n")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
TARGET_ARG = {"os.rename": 1, "os.link": 1, "os.symlink": 1, "shutil.copyfile": 1,
              "shutil.move": 1, "os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.truncate": 0,
              "shutil.rmtree": 0, "os.chmod": 0, "os.utime": 0}


def hook(event, args):
    try:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode else bool((flags or 0) & WRITE_FLAGS)
        elif event in TARGET_ARG:
            path, writing = args[TARGET_ARG[event]], True
        else:
            return
        if writing and isinstance(path, str | bytes | os.PathLike):
            record.write(f"{rank}\\t{event}\\t{os.path.abspath(os.fsdecode(path))}\\n")
    except Exception:  # never disturb the run (e.g. the record closed at shutdown)
        pass


sys.addaudithook(hook)
script = os.path.join(ROOT, "train.py")
sys.path[0] = ROOT  # as when train.py itself is the script
with open(script, encoding="utf-8") as fh:
    code = compile(fh.read(), script, "exec")
exec(code, {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__})
"""


def writes_by_rank(record: Path) -> dict[str, list[tuple[str, Path]]]:
    out = defaultdict(list)
    for line in record.read_text(encoding="utf-8").splitlines():
        rank, event, path = line.split("\t")
        out[rank].append((event, Path(path)))
    return out


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny BERT with wide random weights, so its predictions differ between examples.

    With the default init a random tiny model predicts one class for everything, and then a
    duplicated or missing example would hardly move the metrics; here it would.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("varied_bert")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=128, initializer_range=0.5)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def assert_equals_single_process(metrics: dict, compose, tmp_path: Path) -> None:
    """The val/test metrics a multi-process run recorded are those of its best checkpoint scored
    by one process (other eval batches, so no batch-level coincidence)."""
    from sftlab.evaluate import evaluate

    for split, prefix in (("test", "test"), ("validation", "val")):
        ecfg = compose(f"ckpt_path={metrics['best_checkpoint']}", f"split={split}", "trainer.precision=32-true",
                       "data.eval_batch_size=7", config="eval", out=tmp_path / f"eval_{split}")
        single = evaluate(ecfg)
        keys = [k for k in single if k.startswith(prefix + "/")]
        assert {f"{prefix}/acc", f"{prefix}/f1_macro", f"{prefix}/loss"} <= set(keys)
        for key in keys:
            assert metrics[key] == pytest.approx(single[key], abs=1e-6), key


@pytest.mark.ddp  # ~25 s on 2 busy cores: in the default set
def test_two_process_metrics_equal_a_single_process_evaluation(tmp_path, tiny_data, varied_model_dir, compose):
    logs = tmp_path / "logs"
    script = tmp_path / "recording_train.py"
    script.write_text(f"ROOT = {str(ROOT)!r}\n" + RECORDING_TRAIN, encoding="utf-8")
    record = tmp_path / "writes.tsv"
    proc = cli(tiny_args(varied_model_dir, tiny_data, tmp_path) + [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        # 24 validation/test rows in batches of 10: rank 0 scores 10 + 4, rank 1 scores 10; a
        # sampler that padded ranks to equal length would count 6 of them twice
        "data.eval_batch_size=10", "optimizer.lr=1e-4", f"paths.log_dir={logs}",
    ], timeout=540, script=str(script), env={"SFTLAB_TEST_WRITES": str(record)})
    assert proc.returncode == 0, proc.stderr[-4000:]

    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 ran inside rank 0's dir and made none of its own
    run = runs[0]
    # one set of results in the whole log tree
    for name, where in (("metrics.json", {run, run / "model"}), ("config.yaml", {run, run / ".hydra"}),
                        ("test_predictions.csv", {run}), ("confusion_matrix.csv", {run}),
                        ("model.safetensors", {run / "model"}), ("*.ckpt", {run / "checkpoints"})):
        assert {p.parent for p in logs.rglob(name)} == where, name

    # only rank 0 wrote into the run dir: every write of both processes is on record
    writes = writes_by_rank(record)
    assert [e for e, _ in writes["0"]].count("start") == 1
    assert [e for e, _ in writes["1"]].count("start") == 1  # rank 1 ran, and under the hook
    written0 = {p.relative_to(run) for _, p in writes["0"] if p.is_relative_to(run)}
    assert {Path("config.yaml"), Path("metrics.json"), Path("test_predictions.csv"),
            Path("model/config.json"), Path("checkpoints/last.ckpt")} <= written0  # the hook sees
    written1 = {(e, p.relative_to(run)) for e, p in writes["1"] if p.is_relative_to(run)}
    # Hydra's start-up in every process: make the run dir (it exists: a no-op) and open the
    # run's log for appending; sftlab detaches that log on rank 1 before anything is logged
    # (the log's text is checked below)
    assert written1 <= {("os.mkdir", Path(".")), ("open", Path("train.log"))}, sorted(written1)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"

    # every test example once, in the gathered predictions and in the confusion matrix
    with open(run / "test_predictions.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["idx"]) for r in rows) == list(range(24))
    assert len({r["label_id"] for r in rows}) > 1  # varied predictions: the comparison below means something
    confusion = (run / "confusion_matrix.csv").read_text().splitlines()[1:]
    assert sum(int(x) for line in confusion for x in line.split(",")[1:]) == 24

    # the same checkpoint scored by one process gives the same numbers
    assert_equals_single_process(metrics, compose, tmp_path)

    # only rank 0 wrote: its log has no line of rank 1
    log = (run / "train.log").read_text()
    assert "Seed set to 42" in log and "[rank: 1]" not in log


@pytest.mark.ddp  # two processes on 2 busy cores: like the test above, in the default set
def test_ner_two_process_metrics_count_each_sentence_once(tmp_path, varied_model_dir):
    """Token classification under DDP: the sentences of both ranks are gathered before seqeval,
    so the entity F1 of two processes equals one process's on the same checkpoint."""
    from conftest import compose_config

    from sftlab.evaluate import evaluate

    logs = tmp_path / "logs"
    proc = cli([f"model.name_or_path={varied_model_dir}", "data=conll2003", "debug=fast",
                "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                # 32 validation/test sentences in batches of 10: rank 0 scores 10 + 6, rank 1 10 + 6
                "data.eval_batch_size=10", "optimizer.lr=1e-4", f"paths.log_dir={logs}",
                f"paths.cache_dir={tmp_path / 'cache'}", "+trainer.enable_progress_bar=false",
                "~callbacks.progress_bar"], timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (logs / "debug" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == list(range(32))  # each test sentence once
    assert 0 < metrics["test/f1"] < 1  # varied tags: a duplicated or missing sentence would move it
    for split, prefix in (("test", "test"), ("validation", "val")):
        out = tmp_path / f"eval_{split}"
        ecfg = compose_config([f"ckpt_path={metrics['best_checkpoint']}", f"split={split}", "data=conll2003",
                               "data.max_eval_samples=32", "data.eval_batch_size=7", "trainer.accelerator=cpu",
                               "trainer.precision=32-true", f"paths.output_dir={out}", f"hydra.run.dir={out}",
                               f"paths.cache_dir={tmp_path / 'cache'}"], config="eval")
        single = evaluate(ecfg)
        keys = [k for k in single if k.startswith(prefix + "/")]
        assert {f"{prefix}/f1", f"{prefix}/precision", f"{prefix}/recall", f"{prefix}/acc"} <= set(keys)
        for key in keys:
            assert metrics[key] == pytest.approx(single[key], abs=1e-6), key


# ------------------------------------------------------------------ beyond one process tree
# torchrun and srun start every rank themselves, on every "node"; the audit hook then keys the
# record by the global rank (LOCAL_RANK is 0 on every node)
RECORDING_BY_GLOBAL_RANK = RECORDING_TRAIN.replace(
    'os.environ.get("LOCAL_RANK", "0")', 'os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"')
assert RECORDING_BY_GLOBAL_RANK != RECORDING_TRAIN
DDP_ARGS = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "data.eval_batch_size=10",
            "optimizer.lr=1e-4"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(**extra: str) -> dict[str, str]:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def assert_only_rank0_wrote(run: Path, record: Path) -> None:
    writes = writes_by_rank(record)
    for rank in ("0", "1"):
        assert [e for e, _ in writes[rank]].count("start") == 1, rank  # each rank ran, under the hook
    written0 = {p.relative_to(run) for _, p in writes["0"] if p.is_relative_to(run)}
    assert {Path("config.yaml"), Path("metrics.json"), Path(".hydra/overrides.yaml"),
            Path("checkpoints/last.ckpt")} <= written0
    written1 = {(e, p.relative_to(run)) for e, p in writes["1"] if p.is_relative_to(run)}
    # Hydra's start-up: make the run dir (it exists) and open the log, which rank 1 detaches;
    # no .hydra/ (hydra.output_subdir is rank 0's only)
    assert written1 <= {("os.mkdir", Path(".")), ("open", Path("train.log"))}, sorted(written1)
    log = (run / "train.log").read_text()
    assert "Seed set to 42" in log and "[rank: 1]" not in log


@pytest.mark.slow
@pytest.mark.ddp
def test_two_torchrun_nodes_train_one_run_equal_to_a_single_process(tmp_path, tiny_data, varied_model_dir, compose):
    """#18 item 2: two torchrun invocations on localhost as 2 nodes × 1 process (node ranks 0
    and 1, gloo): one run dir, only rank 0 writes, a 2-rank world over 2 nodes, and the
    metrics equal a single-process evaluation of the same checkpoint."""
    import subprocess
    import sys

    logs = tmp_path / "logs"
    run = logs / "run"
    script = tmp_path / "recording_train.py"
    script.write_text(f"ROOT = {str(ROOT)!r}\n" + RECORDING_BY_GLOBAL_RANK, encoding="utf-8")
    record = tmp_path / "writes.tsv"
    args = tiny_args(varied_model_dir, tiny_data, tmp_path) + DDP_ARGS + [
        "trainer.devices=1", "trainer.num_nodes=2", f"paths.log_dir={logs}", f"hydra.run.dir={run}"]
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
         "--master-addr=127.0.0.1", f"--master-port={port}", str(script), *args],
        cwd=ROOT, env=rank_env(SFTLAB_TEST_WRITES=str(record)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    assert [p.name for p in logs.iterdir()] == ["run"]  # one run dir, named by the command
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert (metrics["world_size"], metrics["num_nodes"], metrics["cluster"]) == (2, 2, "TorchElasticEnvironment")
    assert_only_rank0_wrote(run, record)
    assert_equals_single_process(metrics, compose, tmp_path)


# What sbatch + srun do for a submitit job, on one machine: pickle the job as submitit's
# executor does, start one process per task with the environment srun gives a task, each
# running submitit's own job runner (python -m submitit.core._submit, the command submitit's
# sbatch script passes to srun), and read back every task's result. Everything above the
# executor is the real hydra/launcher=slurm.
SIM_SLURM = '''
import os
import pickle
import subprocess
import sys
from pathlib import Path

from hydra_plugins.sftlab_launchers.slurm import SftlabSlurmLauncher


class _Job:
    def __init__(self, results):
        self._results = results

    def results(self):
        return self._results


class _SbatchSrun:
    def __init__(self, params):
        self.params = params

    def map_array(self, fn, *iterables):
        from submitit.core.utils import DelayedSubmission

        nodes, per_node = int(self.params["nodes"]), int(self.params["tasks_per_node"])
        ntasks, jobs = nodes * per_node, []
        for i, args in enumerate(zip(*iterables)):
            job_id, fmt = str(4242 + i), self.params["submitit_folder"]
            folder = Path(fmt.replace("%j", job_id))
            folder.mkdir(parents=True, exist_ok=True)
            delayed = DelayedSubmission(fn, *args)
            delayed.set_timeout(self.params["timeout_min"], self.params["max_num_timeout"])
            delayed.dump(folder / f"{job_id}_submitted.pkl")
            results = None
            for _attempt in range(3):  # a requeued job (scontrol requeue) runs again
                requeues = _requeues()
                results = self._run_tasks(job_id, fmt, folder, ntasks, nodes, per_node)
                if results is not None or _requeues() == requeues:
                    break
            assert results is not None, "a task ended without a result, and the job was not requeued"
            jobs.append(_Job(results))
        return jobs

    def _run_tasks(self, job_id, fmt, folder, ntasks, nodes, per_node):
        import socket

        with socket.socket() as sock:  # each attempt its own port, as a requeued job's would be
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = []
        for rank in range(ntasks):
            # the sbatch script submitit writes exports SUBMITIT_EXECUTOR=slurm; srun the rest
            env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id,
                   "SLURM_JOB_NAME": str(self.params["name"]),
                   "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(per_node),
                   "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
                   "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",
                   "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
                   "SLURM_NODEID": str(rank // per_node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, "-u", "-m", "submitit.core._submit", fmt], env=env))
        for p in procs:
            p.wait(timeout=900)
        results = []
        for rank in range(ntasks):
            path = folder / f"{job_id}_{rank}_result.pkl"
            if not path.is_file():
                return None
            with open(path, "rb") as fh:
                outcome, value = pickle.load(fh)
            assert outcome == "success", value
            results.append(value)
        return results


def _requeues():
    log = Path(os.environ["SIM_SCONTROL_LOG"])
    return log.read_text().splitlines() if log.is_file() else []


class SimulatedSlurmLauncher(SftlabSlurmLauncher):
    def executor(self):
        return _SbatchSrun(self.params)
'''


def simulated_slurm(tmp_path: Path) -> dict[str, str]:
    """The simulated SLURM's plugin and a fake scontrol (it records requeues); the env to run under."""
    import os

    plugin = tmp_path / "plugins" / "hydra_plugins"
    plugin.mkdir(parents=True)
    (plugin / "sim_slurm.py").write_text(SIM_SLURM, encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SIM_SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    return {"SIM_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
@pytest.mark.ddp
def test_slurm_tasks_join_one_ddp_world_equal_to_a_single_process(tmp_path, tiny_data, varied_model_dir, compose):
    """#18 item 3: a sweep job through hydra/launcher=slurm, SLURM simulated at the executor:
    2 tasks (2 nodes × 1) with srun's environment run submitit's job runner; Lightning's
    SLURMEnvironment joins them into one 2-rank world (no process of its own started), the run
    equals a single-process evaluation, and the sweeper gets task 0's val/acc."""
    import pickle

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = simulated_slurm(tmp_path)
    sweep = tmp_path / "sweep"
    proc = cli(slurm_args(sweep, tmp_path) + tiny_args(varied_model_dir, tiny_data, tmp_path) + DDP_ARGS,
               env=env, pythonpath=tmp_path / "plugins", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = sweep / "0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert (metrics["world_size"], metrics["num_nodes"], metrics["cluster"]) == (2, 2, "SLURMEnvironment")
    # each task is one rank of the two (SLURMEnvironment creates no process of its own)
    out = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "MEMBER: 3/" not in out
    # what the sweeper got from submitit: task 0's return, the run's val/acc
    [folder] = (sweep / ".submitit").iterdir()
    with open(folder / f"{folder.name}_0_result.pkl", "rb") as fh:
        outcome, ret = pickle.load(fh)
    assert outcome == "success" and ret.return_value == pytest.approx(metrics["val/acc"])
    assert not (tmp_path / "logs").exists()  # no run dir outside the sweep
    log = (run / "train.log").read_text()
    assert "Seed set to 42" in log and "[rank: 1]" not in log
    assert_equals_single_process(metrics, compose, tmp_path)


def slurm_args(sweep: Path, tmp_path: Path) -> list[str]:
    return ["-m", "hydra/launcher=slurm", "hydra.launcher._target_=hydra_plugins.sim_slurm.SimulatedSlurmLauncher",
            "hydra.launcher.gpus_per_node=null", f"hydra.sweep.dir={sweep}", "trainer.devices=1",
            "trainer.num_nodes=2", f"paths.log_dir={tmp_path / 'logs'}"]


@pytest.mark.slow
@pytest.mark.ddp
def test_a_slurm_job_requeued_on_submitits_signal_resumes_in_its_dir_with_its_wandb_id(
        tmp_path, tiny_data, varied_model_dir):
    """#18 item 1, requeue: both tasks get submitit's signal (USR2, as SLURM sends it before the
    time limit) at step 2; CrashSafeCheckpoint saves last.ckpt at the next step, submitit
    requeues the job (scontrol requeue), the job comes back with the same number and resumes
    in its own dir from that checkpoint, logging to the same W&B run id."""
    import os
    import signal

    from test_reliability import KILLER

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = simulated_slurm(tmp_path)
    (tmp_path / "plugins" / "killer.py").write_text(KILLER)
    sweep = tmp_path / "sweep"
    proc = cli(slurm_args(sweep, tmp_path) + tiny_args(varied_model_dir, tiny_data, tmp_path, epochs=2) + DDP_ARGS + [
        "logger=wandb", "+callbacks.usr2._target_=killer.SignalAt", "+callbacks.usr2.step=2",
        f"+callbacks.usr2.marker={tmp_path}/usr2_${{oc.env:SLURM_PROCID}}", f"+callbacks.usr2.sig={int(signal.SIGUSR2)}",
    ], env={**env, "WANDB_MODE": "offline"}, pythonpath=tmp_path / "plugins", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert (tmp_path / "usr2_0").is_file() and (tmp_path / "usr2_1").is_file()  # both tasks got it
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # by task 0, once
    assert "Handing SIGUSR2 to submitit" in out

    run = sweep / "0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 6 and metrics["world_size"] == 2
    assert metrics["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert [p.name for p in sweep.iterdir() if p.name.isdigit()] == ["0"]  # the same dir
    # the same W&B run: both attempts wrote under the id the first one recorded
    wandb_id = yaml_load(run / "config.yaml")["logger"]["wandb"]["id"]
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in attempts), attempts
    assert os.environ.get("SUBMITIT_FOLDER") is None  # nothing leaked into this process


@pytest.mark.slow
@pytest.mark.ddp
def test_a_sweep_of_two_process_ddp_jobs_under_torchrun(tmp_path, tiny_data, varied_model_dir, compose):
    """#18 item 5: hydra/launcher=torchrun runs each job of a 2-job sweep as a 2-process DDP
    job (torchrun --standalone) in its sweep subdir; each job is one run of a 2-rank world,
    the sweep's report covers both, and a job's metrics equal a single-process evaluation."""
    from sftlab.report import main as report_main

    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=lr_strategy", "optimizer.lr=1e-4", "strategy=full,head_only",
            "hydra/launcher=torchrun", f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path / 'logs'}",
            *tiny_args(varied_model_dir, tiny_data, tmp_path), *DDP_ARGS, "trainer.devices=2"]
    proc = cli(args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]  # one dir per job, none per rank
    assert not (tmp_path / "logs").exists()
    metrics = {j: json.loads((sweep / j / "metrics.json").read_text()) for j in jobs}
    for j, m in metrics.items():
        assert m["status"] == "completed", j
        assert (m["world_size"], m["cluster"]) == (2, "TorchElasticEnvironment"), j
    assert {m["strategy"] for m in metrics.values()} == {"full", "head_only"}
    groups = {yaml_load(sweep / j / "config.yaml")["sweep_group"] for j in jobs}
    assert groups == {f"train-{sweep.name}"}  # one W&B group: the jobs know their sweep
    assert report_main([str(sweep)]) == 0
    with open(sweep / "report" / "results.csv", encoding="utf-8") as fh:
        assert sorted((r["job"], r["status"]) for r in csv.DictReader(fh)) == [("0", "completed"), ("1", "completed")]
    assert_equals_single_process(metrics["0"], compose, tmp_path)

    # the same command again: both jobs finished, nothing is started
    before = {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in jobs}
    again = cli(args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "skipped #0: completed" in out and "skipped #1: completed" in out and "torch.distributed" not in out
    assert {j: (sweep / j / "metrics.json").stat().st_mtime_ns for j in jobs} == before


def yaml_load(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_ranks_started_by_torchrun_or_srun_must_share_a_named_run_dir(tmp_path, monkeypatch):
    """Each process torchrun/srun starts would resolve its own runs/<time>_<pid>: without
    hydra.run.dir the run stops with one sentence naming the fix; with it, or a single process,
    or srun in an interactive shell, it goes on."""
    from conftest import compose_config

    from sftlab.cluster import check_shared_run_dir
    from sftlab.errors import ConfigError

    for var in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    unnamed = compose_config([f"paths.log_dir={tmp_path}"])
    named = compose_config([f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    check_shared_run_dir(unnamed)  # one process
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    compose_config([f"paths.log_dir={tmp_path}"])  # the HydraConfig of the unnamed run
    with pytest.raises(ConfigError, match="hydra.run.dir=outputs/train/runs/<name>"):
        check_shared_run_dir(unnamed)
    compose_config([f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    check_shared_run_dir(named)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    compose_config([f"paths.log_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="2 processes were started by torchrun/srun"):
        check_shared_run_dir(unnamed)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc + python: one process
    check_shared_run_dir(unnamed)


def test_srun_tasks_must_match_the_trainers_world(compose, monkeypatch):
    """SLURM_NTASKS other than trainer.num_nodes × trainer.devices would mis-size the DDP world
    (Lightning #20391): one sentence instead."""
    from sftlab.cluster import check_slurm_world
    from sftlab.errors import ConfigError

    cfg = compose("trainer.devices=4", "trainer.num_nodes=2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    check_slurm_world(cfg)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(ConfigError, match="SLURM started 2 tasks but trainer.num_nodes × trainer.devices = 2 × 4 = 8"):
        check_slurm_world(cfg)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    check_slurm_world(cfg)
