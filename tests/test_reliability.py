"""Issue 7, reliability: bad input fails before work, runs survive kills, NaNs stop, runs never collide.

The bad-input and crash tests go through the real command line (``python train.py ...``) in
subprocesses, because what they promise is about the process: its exit code, what it prints
(one ``error:`` sentence, no traceback), what it leaves on disk, what a signal does to it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, write_rows

# ---------------------------------------------------------------------------------- helpers
KILLER = textwrap.dedent('''
    """Test helper: signal this process at one training step, once (a marker file remembers)."""
    import os
    from pathlib import Path

    import lightning.pytorch as pl


    class SignalAt(pl.Callback):
        def __init__(self, step, marker, sig=9):
            self.step, self.marker, self.sig = int(step), Path(marker), int(sig)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.step and not self.marker.exists():
                self.marker.write_text("sent")
                os.kill(os.getpid(), self.sig)
''')


def cli(args: list[str], *, env: dict | None = None, timeout: int = 240, script: str = "train.py",
        pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    if pythonpath is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_args(model_dir: Path, data: dict[str, Path], tmp: Path, *, epochs: int = 1) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"data.train_file={data['train']}",
        f"data.validation_file={data['validation']}",
        f"data.test_file={data['test']}",
        f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "+trainer.num_sanity_val_steps=0",
        "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "model.max_length=32",
        "optimizer.lr=1e-3",
        f"paths.cache_dir={tmp / 'cache'}",
    ]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_previous_run(logs: Path) -> Path:
    """A finished run's dir, as a later failing run must leave it."""
    run = logs / "train" / "runs" / "2020-01-01_00-00-00_previous"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(os.urandom(4096))
    (run / "config.yaml").write_text(f"seed: 1\npaths:\n  output_dir: {run}\n")
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "val/acc": 0.9}))
    (run / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (run / "train.log").write_text("previous run\n")
    return run


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------- 1. validation first
def _bad_csv(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _string_labels(tmp: Path) -> list[str]:
    train = write_rows(tmp / "s_train.csv", [{"text": f"good film {i}" if i % 2 else f"bad film {i}",
                                             "label": "pos" if i % 2 else "neg"} for i in range(12)])
    val = write_rows(tmp / "s_val.csv", [{"text": "an odd film", "label": "neutral"},
                                         {"text": "a good film", "label": "pos"}])
    return ["data=local", f"data.train_file={train}", f"data.validation_file={val}", "data.test_file=null"]


def _zero_layer_bert(tmp: Path, tiny_model_dir: Path) -> Path:
    """A BERT with no encoder blocks: nothing for a layer strategy to map."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp / "bert0"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=0,
                         num_attention_heads=2, intermediate_size=37)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# Each case: id, overrides (built from tmp_path and the tiny model dir), regexes that the
# message must match, exit code (Hydra's own errors exit 1, ours 2). Errors found before torch
# is imported cost a second; the others ~10 s each (imports), so only a few representatives of
# those run in the default set and the rest are marked slow (``make test-all``).
FAST_CASES = {"unknown_option", "unknown_key", "lr_zero", "lr_negative", "batch_size_zero", "missing_file",
              "missing_text_column", "max_length_beyond_positions", "hub_model_offline"}


def _case(name, build, patterns, code):
    return pytest.param(name, build, patterns, code, id=name,
                        marks=() if name in FAST_CASES else pytest.mark.slow)


BAD_INPUTS = [
    _case("unknown_option", lambda t, m: ["strategy=nope"],
     [r"Could not find 'strategy/nope'", r"Available options in 'strategy'", r"\bpartial\b", r"\bgradual\b"], 1),
    _case("unknown_key", lambda t, m: ["optimizer.lrr=1"],
     [r"Could not override 'optimizer.lrr'", r"Key 'lrr' is not in struct"], 1),
    _case("lr_zero", lambda t, m: ["optimizer.lr=0"],
     [r"^error: optimizer\.lr must be a positive number, got 0; try optimizer\.lr=2e-5\.$"], 2),
    _case("lr_negative", lambda t, m: ["optimizer.lr=-0.001"],
     [r"^error: optimizer\.lr must be a positive number, got -0\.001"], 2),
    _case("batch_size_zero", lambda t, m: ["data.batch_size=0"],
     [r"^error: data\.batch_size must be a positive integer, got 0\.$"], 2),
    _case("trainable_layers_too_many", lambda t, m: ["strategy=partial", "strategy.trainable_layers=5"],
     [r"^error: strategy\.trainable_layers=5 but bert has 2 blocks"], 2),
    _case("unmappable_architecture", lambda t, m: ["strategy=partial", f"model.name_or_path={_zero_layer_bert(t, m)}"],
     [r"^error: Cannot map the layers of model_type 'bert' \(its block list .* is empty\); add a rule"], 2),
    _case("missing_file", lambda t, m: [f"data.train_file={t / 'nope.csv'}"],
     [r"^error: The train file '.*nope\.csv' does not exist; check data\.train_file"], 2),
    _case("missing_text_column", lambda t, m: ["data.text_field=sentence"],
     [r"^error: The train data has no column 'sentence' \(columns: text, label\); set data\.text_field"], 2),
    _case("missing_label_column", lambda t, m: ["data.label_field=topic"],
     [r"^error: The train data has no column 'topic' \(columns: text, label\)"], 2),
    _case("label_out_of_range", lambda t, m: ["data.label_names=[World,Sports]"],
     [r"^error: The train data has label [23] but only 2 labels exist \(0\.\.1: World, Sports\)"], 2),
    _case("label_unseen_in_train", lambda t, m: _string_labels(t),
     [r"^error: The validation data has label 'neutral' never seen in train \(known: neg, pos\)"], 2),
    _case("empty_file", lambda t, m: [f"data.train_file={_bad_csv(t, 'empty.csv', '')}"],
     [r"^error: The train file '.*empty\.csv' is empty; it needs a header and rows\.$"], 2),
    _case("header_only", lambda t, m: [f"data.train_file={_bad_csv(t, 'header.csv', 'text,label' + chr(10))}"],
     [r"^error: The train data has no rows; give a file with at least one example\.$"], 2),
    _case("empty_texts", lambda t, m: [f"data.train_file={_bad_csv(t, 'blank.csv', 'text,label' + chr(10) + 'fine text,0' + chr(10) + ',1' + chr(10) + '   ,2' + chr(10) + 'more text,3' + chr(10))}"],
     [r"^error: The train data has 2 empty or null texts \(first at row 2\); remove them or set data\.empty_texts=drop"], 2),
    _case("not_utf8", lambda t, m: [f"data.train_file={_bad_csv(t, 'latin.csv', b'text,label' + bytes([10]) + b'caf' + bytes([0xE9]) + b' au lait,0' + bytes([10]))}"],
     [r"^error: '.*latin\.csv' is not UTF-8 \(byte \d+\); re-save it as UTF-8"], 2),
    _case("ragged_rows", lambda t, m: [f"data.train_file={_bad_csv(t, 'ragged.csv', 'text,label' + chr(10) + 'ok,0' + chr(10) + 'one,two,three,1' + chr(10))}"],
     [r"^error: '.*ragged\.csv' is malformed \(.*line 3.*\); quote fields"], 2),
    _case("max_length_beyond_positions", lambda t, m: ["model.max_length=512"],
     [r"^error: model\.max_length=512 exceeds the 128 positions of .*; set model\.max_length <= 128\.$"], 2),
    _case("model_path_missing", lambda t, m: [f"model.name_or_path={t / 'no_model'}"],
     [r"^error: model\.name_or_path='.*no_model' is not a model folder"], 2),
    _case("hub_model_offline", lambda t, m: ["model.name_or_path=no-such-org/no-such-model"],
     [r"^error: Cannot load 'no-such-org/no-such-model' from the Hugging Face hub \(the hub is unreachable while HF_HUB_OFFLINE=1\)"], 2),
]


@pytest.mark.parametrize("name, build, patterns, code", BAD_INPUTS)
def test_bad_input_fails_first_with_one_sentence(name, build, patterns, code, tmp_path, tiny_model_dir, tiny_data):
    """Exit code, the one sentence, no traceback, and the previous run's files untouched."""
    logs = tmp_path / "logs"
    previous = make_previous_run(logs)
    before = digest(previous)
    args = tiny_args(tiny_model_dir, tiny_data, tmp_path) + [f"paths.log_dir={logs}"] + build(tmp_path, tiny_model_dir)
    t0 = time.monotonic()
    proc = cli(args)
    elapsed = time.monotonic() - t0
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    text = error_line(proc) if code == 2 else proc.stderr
    for pattern in patterns:
        assert re.search(pattern, text, re.M), (pattern, text[-2000:])
    assert digest(previous) == before
    # nothing was trained: no run dir got a checkpoint
    assert not [p for p in logs.rglob("*.ckpt") if previous not in p.parents]
    if name == "hub_model_offline":
        assert elapsed < 60  # fails at once offline, no retries against an unreachable hub


def test_failure_is_recorded_in_the_new_run_only(tmp_path, tiny_model_dir, tiny_data):
    logs = tmp_path / "logs"
    previous = make_previous_run(logs)
    proc = cli(tiny_args(tiny_model_dir, tiny_data, tmp_path) + [f"paths.log_dir={logs}", "optimizer.lr=0"])
    assert proc.returncode == 2
    runs = [p for p in (logs / "train" / "runs").iterdir() if p != previous]
    assert len(runs) == 1
    failed = json.loads((runs[0] / "metrics.json").read_text())
    assert failed["status"] == "failed" and "optimizer.lr must be a positive number" in failed["error"]
    assert json.loads((previous / "metrics.json").read_text())["status"] == "completed"


def test_new_run_refuses_a_dir_that_holds_a_run(tmp_path, tiny_model_dir, tiny_data):
    """``hydra.run.dir=<old run>`` must not overwrite the old run's results.

    (Hydra itself rewrites ``<dir>/.hydra/`` before any of our code runs; the results are ours.)
    """
    previous = make_previous_run(tmp_path / "logs")
    before = {k: v for k, v in digest(previous).items() if not k.startswith(".hydra")}
    proc = cli(tiny_args(tiny_model_dir, tiny_data, tmp_path) + [f"hydra.run.dir={previous}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"'{previous}' already holds a run" in error_line(proc)
    assert f"resume={previous}" in error_line(proc)
    assert {k: v for k, v in digest(previous).items() if not k.startswith(".hydra")} == before


@pytest.mark.parametrize("case", ["not_a_dir", "completed", "with_overrides"])
def test_resume_refuses_what_it_cannot_continue(case, tmp_path):
    previous = make_previous_run(tmp_path / "logs")
    before = digest(previous)
    args = {"not_a_dir": [f"resume={tmp_path / 'nope'}"],
            "completed": [f"resume={previous}"],
            "with_overrides": [f"resume={previous}", "optimizer.lr=1"]}[case]
    proc = cli(args + [f"hydra.run.dir={tmp_path / 'fresh'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    expected = {"not_a_dir": "is not a folder; give the dir of a run",
                "completed": "has already completed (see its metrics.json); nothing to resume.",
                "with_overrides": "other overrides were given (optimizer.lr=1); drop them"}[case]
    assert expected in error_line(proc)
    assert digest(previous) == before


def test_empty_texts_can_be_dropped_with_a_count(tmp_path, tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    from sftlab.data import TextClassificationDataModule

    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["a", "", "b", "  ", "c", "d"])]
    path = write_rows(tmp_path / "t.csv", rows)
    dm = TextClassificationDataModule(AutoTokenizer.from_pretrained(tiny_model_dir), train_file=str(path),
                                      validation_file=str(path), empty_texts="drop", cache_dir=str(tmp_path / "c"))
    with caplog.at_level("WARNING", logger="sftlab.data"):
        dm.setup()
    assert len(dm.datasets["train"]) == 4
    assert "Dropping 2 empty or null texts from the train data." in caplog.text


def test_trust_remote_code_is_off_unless_the_config_says_so(compose, monkeypatch, tiny_model_dir):
    import transformers

    from sftlab.pretrained import load_pretrained, load_tokenizer

    for option in sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")):
        assert compose(f"model={option}", tiny=False).model.trust_remote_code is False, option
    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForSequenceClassification):
        original = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=original, **kw):
            seen.append(kw.get("trust_remote_code"))
            return _orig(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_tokenizer(str(tiny_model_dir))
    load_pretrained(str(tiny_model_dir), num_labels=2, id2label={0: "a", 1: "b"})
    assert len(seen) >= 3 and set(seen) == {False}


# --------------------------------------------------------------------- 2. crash-safe runs
def test_resume_reads_the_run_config_keeps_the_wandb_id_and_follows_a_moved_dir(compose, tmp_path, monkeypatch):
    import shutil

    from omegaconf import OmegaConf, open_dict

    from sftlab import runs
    from sftlab.config import instantiate_group

    first = tmp_path / "first"
    cfg = compose("logger=wandb", out=first)
    runs.new_wandb_id(cfg)
    wandb_id = cfg.logger.wandb.id
    assert re.fullmatch(r"[a-z0-9]{8}", wandb_id)
    (first / "checkpoints").mkdir(parents=True)
    (first / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), first / "config.yaml")
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)

    for run in (first, moved):
        monkeypatch.setattr(runs, "_task_overrides", lambda run=run: [f"resume={run}"])
        with open_dict(cfg):
            cfg.resume = str(run)
        resumed = runs.resume_config(cfg)
        assert resumed.paths.output_dir == str(run) and resumed.resume == str(run)
        assert resumed.ckpt_path == str(run / "checkpoints" / "last.ckpt")
        assert resumed.callbacks.model_checkpoint.dirpath == str(run / "checkpoints")
        assert resumed.logger.wandb.id == wandb_id and resumed.logger.wandb.resume == "allow"
        logger = instantiate_group(resumed.logger)[0]
        assert logger._wandb_init["id"] == wandb_id and logger._wandb_init["resume"] == "allow"


def test_checkpoint_write_is_atomic_under_sigkill(tmp_path):
    """SIGKILL in the middle of a save: last.ckpt is the previous complete checkpoint."""
    import torch

    from sftlab.checkpointing import remove_partial_checkpoints

    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import torch
        from sftlab.checkpointing import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        big = torch.zeros(16_000_000)  # 64 MB: a save takes long enough to be caught in it
        io.save_checkpoint({{"version": 1, "w": big}}, {str(target)!r})
        open({str(tmp_path / 'first_done')!r}, "w").close()
        for v in range(2, 1000):
            io.save_checkpoint({{"version": v, "w": big + v}}, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        partial = None
        while time.monotonic() < deadline and partial is None:
            if (tmp_path / "first_done").exists():
                partial = next(iter(tmp_path.glob(".last.ckpt.*.tmp")), None)
            time.sleep(0.002)
        assert partial is not None, "never caught a save in progress"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["version"] >= 1 and torch.equal(ckpt["w"], torch.full((16_000_000,), float(ckpt["version"] - 1)))
    assert list(tmp_path.glob(".last.ckpt.*.tmp"))  # the interrupted save's leftovers, never under the real name
    assert remove_partial_checkpoints(tmp_path) and not list(tmp_path.glob(".*.tmp"))


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint that would run code when unpickled is refused."""
    import pickle

    import torch

    from sftlab.checkpointing import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "note": [1, "a", None]}, tmp_path / "ok.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "ok.ckpt")["state_dict"]["w"], torch.ones(2))
    io.save_checkpoint({"evil": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        io.load_checkpoint(tmp_path / "evil.ckpt")


class _Payload:
    """An arbitrary object: torch.load(weights_only=True) must refuse to rebuild it."""


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    import torch

    from sftlab.checkpointing import rng_state, set_rng_state

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_train_loader_resumes_after_the_batches_already_seen(tmp_path, tiny_model_dir, tiny_data):
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from transformers import AutoTokenizer

    from sftlab.data import TextClassificationDataModule

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def datamodule():
        dm = TextClassificationDataModule(tok, train_file=str(tiny_data["train"]), batch_size=8,
                                          validation_file=str(tiny_data["validation"]),
                                          cache_dir=str(tmp_path / "cache"), max_length=32)
        dm.setup()
        return dm

    def epoch_order(epoch):
        loader = datamodule().train_dataloader()
        _set_sampler_epoch(loader, epoch)  # what Lightning calls at each epoch start
        return [b["idx"].tolist() for b in loader]

    assert epoch_order(3) != epoch_order(4)  # Lightning's set_epoch reaches the batch sampler

    dm = datamodule()
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 3)
    it = iter(loader)
    seen = [next(it)["idx"].tolist() for _ in range(2)]
    state = dm.state_dict()  # what a checkpoint after two batches of epoch 3 holds
    assert state == {"train_loader": {"epoch": 3, "batches": 2}}

    resumed = datamodule()
    resumed.load_state_dict(state)
    rest = [b["idx"].tolist() for b in resumed.train_dataloader()]
    assert seen + rest == epoch_order(3)  # the resumed epoch is the uninterrupted epoch
    assert len(rest) == 4 and resumed.state_dict() == {"train_loader": {"epoch": 3, "batches": 6}}

    # a state taken at the end of an epoch resumes at the top of the next one
    ended = datamodule()
    ended.load_state_dict({"train_loader": {"epoch": 3, "batches": 6}})
    assert [b["idx"].tolist() for b in ended.train_dataloader()] == epoch_order(4)


def test_sigterm_saves_last_ckpt_and_exits_with_its_code(tmp_path, tiny_model_dir, tiny_data):
    """SIGTERM mid-epoch: last.ckpt at the next step, status interrupted, exit 143; no secret on disk."""
    import torch

    (tmp_path / "killer.py").write_text(KILLER)
    run = tmp_path / "run"
    cli_secret, env_secret = "cli-secret-0123456789", "env-secret-9876543210"
    proc = cli(tiny_args(tiny_model_dir, tiny_data, tmp_path) + [
        f"hydra.run.dir={run}", "checkpoint.every_n_steps=null",
        "+callbacks.signal._target_=killer.SignalAt", "+callbacks.signal.step=2",
        f"+callbacks.signal.marker={tmp_path / 'sent'}", f"+callbacks.signal.sig={int(signal.SIGTERM)}",
        f"+hub_token={cli_secret}",
    ], env={"WANDB_API_KEY": env_secret}, pythonpath=tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM" and record["global_step"] == 3
    assert record["resume"] == f"python train.py resume={run}"
    assert f"continue with: python train.py resume={run}" in proc.stdout + proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # saved at the end of step 3 (Lightning counts the batch completed after its hooks)
    assert ckpt["global_step"] == 3 and ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 3
    assert not list((run / "checkpoints").glob(".*.tmp"))
    # secrets given on the command line or in the environment are nowhere in the run dir
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert cli_secret.encode() not in data and env_secret.encode() not in data, path
    assert "hub_token" not in (run / "config.yaml").read_text()


# ------------------------------------------------------------------- 3. NaN / inf loss
def test_nan_loss_stops_naming_the_step_and_records_it(compose, tmp_path):
    from sftlab.errors import TrainingError
    from sftlab.train import main

    cfg = compose("optimizer.lr=1e38", "export=false", "trainer.precision=32-true", out=tmp_path / "run")
    with pytest.raises(TrainingError) as err:
        main(cfg)
    msg = str(err.value)
    assert re.search(r"^The training loss is (nan|inf|-inf) at step \d+ \(lr [^)]+\); lower optimizer\.lr", msg), msg
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"] == f"TrainingError: {msg}"


def test_nan_steps_can_be_skipped_up_to_a_limit(compose, tmp_path):
    from sftlab.train import train

    cfg = compose("optimizer.lr=1e38", "export=false", "test=false", "trainer.precision=32-true",
                  "callbacks.finite_loss.max_bad_steps=100", out=tmp_path / "run")
    metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["global_step"] == 6
    assert 1 <= metrics["skipped_bad_steps"] <= 5  # the first step is finite; it is what blows up


# ------------------------------------------------------------------------- 4. concurrency
def test_two_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    logs = tmp_path / "logs"
    procs = [subprocess.Popen([sys.executable, "train.py", f"paths.log_dir={logs}", "optimizer.lr=0"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.wait(timeout=120)
    runs = sorted((logs / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    assert all(json.loads((r / "metrics.json").read_text())["status"] == "failed" for r in runs)
    # typically the same second: the name has the time stamp, then the pid + random suffix
    assert runs[0].name.rsplit("_", 1)[1] != runs[1].name.rsplit("_", 1)[1]


def test_parallel_runs_tokenizing_the_same_data_share_one_cache_entry(tmp_path, tiny_model_dir, tiny_data):
    """Both processes tokenize, then publish at the same moment (a file barrier): one entry wins."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import hashlib, json, sys, time
        from pathlib import Path
        import sftlab.data as data
        import sftlab.data.cache as data_cache
        from transformers import AutoTokenizer

        me, barrier = sys.argv[1], Path({str(tmp_path)!r})
        save = data_cache._quiet_save
        def racing_save(ds, path):  # both processes reach the publish step before either publishes
            (barrier / f"ready{{me}}").touch()
            deadline = time.time() + 120
            while len(list(barrier.glob("ready*"))) < 2 and time.time() < deadline:
                time.sleep(0.01)
            save(ds, path)
        data_cache._quiet_save = racing_save
        dm = data.TextClassificationDataModule(AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}),
            train_file={str(tiny_data['train'])!r}, validation_file={str(tiny_data['validation'])!r},
            cache_dir={str(cache)!r}, max_length=32, splits=["train"])
        dm.setup()
        ids = json.dumps([list(map(int, x)) for x in dm.datasets["train"]["input_ids"]])
        print(dm.cache_hit, hashlib.sha256(ids.encode()).hexdigest())
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = [o[0].split()[-2:] for o in outs]
    assert results[0][0] == results[1][0] == "False"  # both tokenized: a real race, not a cache hit
    assert results[0][1] == results[1][1]
    assert len(list(tmp_path.glob("ready*"))) == 2
    entries = [p for p in cache.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries  # no temp dir left behind


# ------------------------------------------------------ 2. kill mid-epoch, resume: identical
QUALITY_KEYS = ("val/acc", "val/loss", "val/f1_macro", "test/acc", "test/loss", "test/f1_macro",
                "global_step", "epochs", "status")


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, tiny_model_dir, tiny_data):
    """SIGKILL mid-epoch after a step checkpoint, SIGTERM at an epoch's last batch: each run,
    resumed with ``resume=<run dir>``, ends with the metrics and weights of an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    (tmp_path / "killer.py").write_text(KILLER)
    base = tiny_args(tiny_model_dir, tiny_data, tmp_path, epochs=2) + [
        "checkpoint.every_n_steps=2",
        # select the best checkpoint on a metric that changes every epoch, so selection matters
        "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min",
    ]

    def killed(name: str, step: int, sig: int) -> Path:
        run = tmp_path / name
        proc = cli(base + [f"hydra.run.dir={run}", "+callbacks.signal._target_=killer.SignalAt",
                           f"+callbacks.signal.step={step}", f"+callbacks.signal.marker={tmp_path / name}.sent",
                           f"+callbacks.signal.sig={sig}"], pythonpath=tmp_path)
        assert proc.returncode in (-sig, 128 + sig), proc.stderr[-3000:]
        assert (run / "checkpoints" / "last.ckpt").is_file()
        resumed = cli([f"resume={run}", f"hydra.run.dir={tmp_path / (name + '_hydra')}"], pythonpath=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert not (tmp_path / (name + "_hydra")).exists()  # continued in place
        return run

    straight = tmp_path / "straight"
    proc = cli(base + [f"hydra.run.dir={straight}"], pythonpath=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {"sigkill@3": killed("sigkill", 3, signal.SIGKILL), "sigterm@5": killed("sigterm", 5, signal.SIGTERM)}

    # a run stopped by SIGTERM flushed its CSV log; resumed, the log continues it
    def csv_rows(run: Path) -> Counter:
        with open(run / "csv" / "metrics.csv", encoding="utf-8") as fh:
            return Counter((r["step"], r.get("epoch"), r.get("train/loss"), r.get("val/loss"))
                           for r in csv.DictReader(fh))

    assert not csv_rows(straight) - csv_rows(runs["sigterm@5"])

    want = json.loads((straight / "metrics.json").read_text())
    want_w = load_file(straight / "model" / "model.safetensors")
    want_last = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for label, run in runs.items():
        got = json.loads((run / "metrics.json").read_text())
        assert {k: got[k] for k in QUALITY_KEYS} == {k: want[k] for k in QUALITY_KEYS}, label
        assert Path(got["best_checkpoint"]).name == Path(want["best_checkpoint"]).name, label
        assert got["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
        got_w = load_file(run / "model" / "model.safetensors")
        assert all(torch.equal(got_w[k], want_w[k]) for k in want_w), label
        last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert all(torch.equal(last[k], want_last[k]) for k in want_last), label
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
            p.name for p in (straight / "checkpoints").iterdir()), label


def test_configs_from_before_the_perf_group_resume_with_the_same_kernels():
    """A run config with model.fast_dropout / callbacks.release_memory (before conf/perf) is
    read in today's keys: nothing unknown reaches a constructor, and the kernels it trained
    with stay on (or off) for the rest of the run."""
    from omegaconf import OmegaConf

    from sftlab.runs import upgrade_config

    old = OmegaConf.create({
        "model": {"fast_dropout": False, "max_length": 64},
        "callbacks": {"release_memory": {"_target_": "sftlab.callbacks.ReleaseFreeMemory", "every_n_steps": 25},
                      "finite_loss": {"_target_": "sftlab.callbacks.FiniteLossGuard"}},
    })
    current = OmegaConf.create({"perf": OmegaConf.load(ROOT / "conf" / "perf" / "default.yaml")})
    new = upgrade_config(old, current)
    assert "fast_dropout" not in new.model and new.model.max_length == 64
    assert set(new.callbacks) == {"finite_loss"}
    assert new.perf.fast_dropout.enable is False
    assert new.perf.release_memory.every_n_steps == 25
    assert new.perf.release_memory._target_ == "sftlab.perf.ReleaseFreeMemory"
    assert "fast_dropout" in old.model  # the run's own file is not changed
    # today's configs pass through untouched
    assert upgrade_config(new, current) == new


# ------------------------------------------------------------------ SIGINT (Ctrl+C)
def _interrupt_with_sigint(tmp_path: Path, tiny_model_dir: Path, tiny_data: dict, step: int = 2):
    """A CLI run that gets SIGINT after optimizer step ``step`` of its first epoch (of 6)."""
    (tmp_path / "killer.py").write_text(KILLER)
    run = tmp_path / "run"
    proc = cli(tiny_args(tiny_model_dir, tiny_data, tmp_path) + [
        f"hydra.run.dir={run}", "checkpoint.every_n_steps=null",
        "+callbacks.signal._target_=killer.SignalAt", f"+callbacks.signal.step={step}",
        f"+callbacks.signal.marker={tmp_path / 'sent'}", f"+callbacks.signal.sig={int(signal.SIGINT)}",
    ], pythonpath=tmp_path)
    return run, proc


def test_sigint_saves_a_resumable_last_ckpt_and_exits_130(tmp_path, tiny_model_dir, tiny_data):
    """Ctrl+C mid-epoch: exit 130 (128 + SIGINT), ``status: interrupted``, and a last.ckpt with
    the whole training state (weights, optimizer, scheduler, loop position, the loader's place
    in the epoch, the RNG states) at the step where it stopped."""
    import torch

    run, proc = _interrupt_with_sigint(tmp_path, tiny_model_dir, tiny_data)
    assert proc.returncode == 128 + signal.SIGINT == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGINT" and record["global_step"] == 3
    assert record["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert record["resume"] == f"python train.py resume={run}"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 3
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    assert ckpt["optimizer_states"][0]["state"] and ckpt["lr_schedulers"][0]["last_epoch"] == 3
    assert any("RNGState" in k for k in ckpt["callbacks"])
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert not (run / "model").exists()  # stopped: no test, no export


@pytest.mark.slow
def test_a_run_stopped_by_sigint_resumes_to_completion(tmp_path, tiny_model_dir, tiny_data):
    """The last.ckpt that Ctrl+C left is resumable: ``resume=<run>`` finishes the epoch in place."""
    run, proc = _interrupt_with_sigint(tmp_path, tiny_model_dir, tiny_data)
    assert proc.returncode == 130, proc.stderr[-3000:]
    resumed = cli([f"resume={run}", f"hydra.run.dir={tmp_path / 'fresh'}"], pythonpath=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "completed" and (record["global_step"], record["epochs"]) == (6, 1)
    assert record["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert (run / "model" / "model.safetensors").is_file()


def test_resume_continues_from_the_best_checkpoint_when_killed_before_last_ckpt(tmp_path, monkeypatch):
    """Killed right after the first best-checkpoint write, before last.ckpt: that complete
    checkpoint is what resume= continues from (it used to say "stopped before its first
    checkpoint")."""
    import os

    from omegaconf import OmegaConf

    from sftlab import runs
    from sftlab.runs import resume_config

    monkeypatch.setattr(runs, "_task_overrides", lambda: [])  # as `python train.py resume=<run>` alone
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"paths": {"output_dir": str(run)}, "seed": 1}), run / "config.yaml")
    older = run / "checkpoints" / "epoch00-step2-val_acc0.5000.ckpt"
    newer = run / "checkpoints" / "epoch01-step4-val_acc0.7500.ckpt"
    for i, p in enumerate((older, newer)):
        p.write_bytes(b"x")
        os.utime(p, ns=(10**18 + i, 10**18 + i))
    (run / "checkpoints" / ".last.ckpt.123.tmp").write_bytes(b"half")  # an interrupted save
    cfg = resume_config(OmegaConf.create({"resume": str(run)}))
    assert cfg.ckpt_path == str(newer) and cfg.resume == str(run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_config(OmegaConf.create({"resume": str(run)})).ckpt_path == str(run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("n,batch,world", [(5, 4, 8), (3, 1, 8), (1, 4, 3), (9, 2, 4)])
def test_every_rank_gets_the_batches_its_length_promises(n, batch, world):
    """DDP needs equal step counts: every rank yields exactly len(sampler) batches, even with more
    ranks than twice the batches (5 examples, batch 4, 8 ranks gave some ranks 0 batches)."""
    from sftlab.data.batching import LengthGroupedBatchSampler

    counts = set()
    for rank in range(world):
        sampler = LengthGroupedBatchSampler(list(range(5, 5 + n)), batch, shuffle=True, seed=0,
                                            num_replicas=world, rank=rank)
        got = list(sampler)
        assert len(got) == len(sampler) >= 1, (rank, got)
        counts.add(len(got))
    assert len(counts) == 1


def test_last_ckpt_holds_the_end_of_training(compose, tmp_path):
    """last.ckpt is the final state even when the last validation kept no top-k checkpoint
    (Lightning 2.6 rewrites last.ckpt only with one): here top-k is taken every 2nd epoch of 3."""
    import torch

    from sftlab.train import main

    run = tmp_path / "run"
    cfg = compose("trainer.max_epochs=3", "+callbacks.model_checkpoint.every_n_epochs=2", "export=false",
                  out=run)
    main(cfg)
    steps = json.loads((run / "metrics.json").read_text())["global_step"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (best,) = [p for p in (run / "checkpoints").glob("epoch*.ckpt")]
    assert best.name.startswith("epoch01-")  # the only top-k save: not at the end
    assert last["global_step"] == steps


def test_no_config_key_is_named_like_a_credential():
    """The saved config.yaml drops keys named like credentials (sftlab.secrets: ``token`` as the
    last word, ``secret``, ...), and ``resume=`` and ``eval.py`` read that file: a setting under
    such a name would silently vanish from a resumed run (a perf switch named
    ``..._first_token`` once did, and the resumed run drew other dropout masks)."""
    from omegaconf import OmegaConf

    from sftlab.secrets import is_secret_name

    def keys(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield f"{prefix}{k}"
                yield from keys(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for v in node:
                yield from keys(v, prefix)

    named = [f"{path.relative_to(ROOT / 'conf')}: {key}"
             for path in sorted((ROOT / "conf").rglob("*.yaml"))
             for key in keys(OmegaConf.to_container(OmegaConf.load(path)))
             if is_secret_name(key.rsplit(".", 1)[-1])]
    assert not named, f"rename these config keys (they are dropped from config.yaml): {named}"
