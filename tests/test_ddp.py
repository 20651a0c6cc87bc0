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


@pytest.mark.ddp  # ~25 s on 2 busy cores: in the default set
def test_two_process_metrics_equal_a_single_process_evaluation(tmp_path, tiny_data, varied_model_dir, compose):
    from sftlab.evaluate import evaluate

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
    for split, prefix in (("test", "test"), ("validation", "val")):
        ecfg = compose(f"ckpt_path={metrics['best_checkpoint']}", f"split={split}", "trainer.precision=32-true",
                       "data.eval_batch_size=7", config="eval", out=tmp_path / f"eval_{split}")
        single = evaluate(ecfg)
        keys = [k for k in single if k.startswith(prefix + "/")]
        assert {f"{prefix}/acc", f"{prefix}/f1_macro", f"{prefix}/loss"} <= set(keys)
        for key in keys:
            assert metrics[key] == pytest.approx(single[key], abs=1e-6), key

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
