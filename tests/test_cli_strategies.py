"""Every strategy through the whole ``train(cfg)`` path: metrics.json, export, and the
trainable-parameter ranking the strategies promise (head_only < bitfit, lora < partial < full).

test_strategies.py checks each strategy on a bare model; this file checks what a user of
``python train.py strategy=S`` gets: the number in metrics.json is the one the strategy meant
(not, say, a count taken before LoRA wrapped the model or after gradual unfroze everything),
and the exported folder is a plain transformers model for every strategy, LoRA included.
The CLI itself (Hydra's argument parsing, a re-launched DDP rank) is exercised by the slow
subprocess test at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_rows_agree, compose_config, read_test_pass

STRATEGIES = ["full", "head_only", "partial", "gradual", "discriminative",
              "discriminative_ulmfit", "bitfit", "lora"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_run, toy_data):
    """Train once per strategy (default strategy config); name -> run dir.

    Each run starts from ``toy_run``'s exported model (conftest.py: the tiny 2-block BERT
    already trained on the keyword task) and trains one epoch on the same data, so the test
    predictions of every strategy differ between rows and the export check below compares
    more than one constant answer. Module-scoped so that the checks below share eight ~2 s runs.
    """
    import torch

    from sftlab.train import train

    root = tmp_path_factory.mktemp("cli_strategies")
    out = {}
    # One intra-op thread: a 32-wide model gains nothing from two, and on a shared 2-core box
    # OpenMP's spinning threads made each step ~100x slower (1.3 s instead of 15 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in STRATEGIES:
            run = root / name
            overrides = [
                f"strategy={name}", f"paths.output_dir={run}", f"hydra.run.dir={run}",
                f"paths.cache_dir={root / 'cache'}", f"model.name_or_path={toy_run.run / 'model'}",
                f"data.train_file={toy_data['train']}", f"data.validation_file={toy_data['validation']}",
                f"data.test_file={toy_data['test']}", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                "+trainer.num_sanity_val_steps=0", "+trainer.enable_progress_bar=false",
                "data.batch_size=8", "data.eval_batch_size=16", "model.max_length=32",
                "~callbacks.progress_bar", "optimizer.lr=1e-3",
            ] + (["strategy.trainable_layers=2"] if name == "partial" else [])  # the tiny model has 2 blocks
            train(compose_config(overrides))
            out[name] = run
    finally:
        torch.set_num_threads(threads)
    return out


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def expected_counts(model_dir: Path) -> dict[str, int]:
    """What each strategy should train on the tiny 2-block BERT, counted from parameter names.

    Independent of sftlab.layers on purpose: if the layer map misplaced a parameter, these
    numbers and metrics.json would disagree.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=4)
    named = dict(model.named_parameters())
    n = {k: v.numel() for k, v in named.items()}
    total = sum(n.values())
    head = sum(v for k, v in n.items() if k.startswith(("classifier.", "bert.pooler.")))
    embeddings = sum(v for k, v in n.items() if k.startswith("bert.embeddings."))
    body_biases = sum(v for k, v in n.items() if k.endswith("bias") and not k.startswith(("classifier.", "bert.pooler.")))
    cfg = model.config
    r = 8  # conf/strategy/lora.yaml
    lora = cfg.num_hidden_layers * 2 * (r * cfg.hidden_size + cfg.hidden_size * r)  # query, value: A (r×in) + B (out×r)
    return {
        "full": total, "discriminative": total, "discriminative_ulmfit": total,
        "head_only": head,
        "bitfit": head + body_biases,
        "lora": head + lora,
        # partial (trainable_layers=2 here): every block of the 2-block model, not the embeddings
        "partial": total - embeddings,
        "total": total,
    }


def test_every_strategy_writes_metrics_with_the_expected_trainable_params(runs, tiny_model_dir):
    want = expected_counts(tiny_model_dir)
    got = {}
    for name, run in runs.items():
        m = metrics(run)
        assert m["status"] == "completed" and m["strategy"] == name, name
        for key in ("val/acc", "test/acc", "train_time_s", "train_samples_per_s", "total_params"):
            assert key in m, (name, key)
        assert m["total_params"] == want["total"] + (want["lora"] - want["head_only"] if name == "lora" else 0), name
        got[name] = m["trainable_params"]
    for name in ("full", "discriminative", "discriminative_ulmfit", "head_only", "bitfit", "lora", "partial"):
        assert got[name] == want[name], (name, got[name], want[name])
    # the ranking the strategies exist for
    assert got["head_only"] < got["bitfit"] < got["partial"] < got["full"]
    assert got["head_only"] < got["lora"] < got["partial"]
    # gradual: 6 steps; by default its 3 later stages spread over the first half of the run, one
    # every floor(0.5 * 6 / 3) = 1 step: block.1 from step 1, block.0 from 2, the embeddings from
    # 3, so by the end every part trains (a fixed quarter-epoch interval left the embeddings out)
    assert got["gradual"] == want["full"]
    # the frozen prefix cache ran where the bottom never trains: head_only's whole 2-block body;
    # partial trains both blocks here (trainable_layers=2), gradual unfreezes them later
    cached = {name: metrics(run)["frozen_cache_blocks"] for name, run in runs.items()}
    assert cached == {name: 2 if name == "head_only" else 0 for name in STRATEGIES}


@pytest.mark.parametrize("name", STRATEGIES)
def test_export_is_a_plain_transformers_model_that_reproduces_the_test_predictions(runs, name, toy_data):
    """The exported folder loads with AutoModelForSequenceClassification alone (LoRA merged)
    and predicts what the test pass predicted, row by row and under the same class names, so
    the export is the model that was scored (and the rows differ: at least 3 labels occur)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = runs[name]
    folder = run / "model"
    assert not (folder / "adapter_config.json").exists()
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not any("lora_" in k or "base_model.model" in k for k in keys), keys[:5]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    tok = AutoTokenizer.from_pretrained(folder)
    want = read_test_pass(run, toy_data["test"])
    with torch.inference_mode():
        enc = tok(want.texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1).tolist()
    id2label = model.config.id2label
    names = [id2label[i] for i in range(len(id2label))]
    assert_rows_agree(names, [names[max(range(len(p)), key=p.__getitem__)] for p in probs], probs, want)


def test_lora_export_loads_with_peft_unimportable(runs):
    """"Loadable without peft" literally: a fresh interpreter in which ``import peft`` fails."""
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"m = A.from_pretrained({str(runs['lora'] / 'model')!r})\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, n = proc.stdout.split()
    assert name == "BertForSequenceClassification"
    assert int(n) == metrics(runs["full"])["total_params"]  # adapters folded in, none left over


# The acceptance command keeps debug=fast's eval batch (64) larger than the whole validation
# split: one eval batch for two ranks. Evaluation is sharded by examples (sftlab.data.batching), so both
# ranks still get data; the second case has several eval batches per rank.
EVAL_FITS_ONE_BATCH = pytest.param([], id="debug_fast_eval_batch")


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("extra", [EVAL_FITS_ONE_BATCH, pytest.param(["data.eval_batch_size=8"], id="eval_batches_ge_ranks")])
def test_cli_gradual_under_two_process_cpu_ddp(tmp_path, tiny_model_dir, tiny_data, extra):
    """``python train.py strategy=gradual debug=fast trainer=ddp trainer.accelerator=cpu
    trainer.devices=2``: Lightning re-launches train.py for rank 1 with the Hydra arguments
    plus ``hydra.run.dir=<rank 0's dir>``; both ranks must train in step and rank 0 alone must
    write the results."""
    run = tmp_path / "run"
    args = [
        "strategy=gradual", "debug=fast", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={tiny_data['train']}",
        f"data.validation_file={tiny_data['validation']}", f"data.test_file={tiny_data['test']}",
        "model.max_length=32", "data.batch_size=8", "~callbacks.progress_bar", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr  # a second process really trained
    m = metrics(run)
    assert m["status"] == "completed" and m["strategy"] == "gradual"
    # 48 rows in batches of 8: 6 batches sharded over 2 ranks = 3 optimizer steps per rank
    assert m["global_step"] == 3
    assert m["train_samples_per_s"] > 0
    # every validation and test example was scored once, across both ranks
    confusion = (run / "confusion_matrix.csv").read_text().splitlines()[1:]
    assert sum(int(x) for line in confusion for x in line.split(",")[1:]) == 24
    assert (run / "model" / "config.json").is_file()
    # rank 1 wrote into rank 0's dir, not a run dir of its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]


# ------------------------------------------------------------------ benchmarks/strategies.py
def load_benchmark():
    """benchmarks/ is not a package: load the script as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_strategies", ROOT / "benchmarks" / "strategies.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_table_rows_from_run_dirs(tmp_path):
    """Rows come from each run's metrics.json; time per epoch is training time over epochs run
    (not wall time, which includes loading, evaluation and export); a run that crashed without
    metrics, or crashed after writing them, is a failed row rather than a missing one."""
    bench = load_benchmark()
    runs = {
        "full": {"status": "completed", "trainable_params": 1000, "total_params": 1000, "train_time_s": 90.0,
                 "train_samples_per_s": 133.3, "val/acc": 0.91, "test/acc": 0.905, "epochs": 3},
        "lora": {"status": "completed", "trainable_params": 12, "total_params": 1012, "train_time_s": 30.0,
                 "train_samples_per_s": 400.0, "val/acc": 0.5, "test/acc": 0.49, "epochs": 3},
        "bitfit": {"status": "failed", "error": "TrainingError: The training loss is nan at step 3"},
    }
    for name, m in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "gradual").mkdir()  # died before writing anything
    rows = [bench.row_from_run("full", tmp_path / "full", rc=0, wall_s=120.0),
            bench.row_from_run("lora", tmp_path / "lora", rc=1),  # exit 1 after metrics: failed
            bench.row_from_run("bitfit", tmp_path / "bitfit", rc=1),
            bench.row_from_run("gradual", tmp_path / "gradual", rc=-9)]
    assert rows[0]["time_per_epoch_s"] == 30.0 and rows[0]["trainable_pct"] == 100.0
    assert rows[1]["status"] == "failed (exit 1)"
    assert rows[2]["status"] == "failed" and "loss is nan" in rows[2]["error"]
    assert rows[3]["status"] == "failed" and "exit -9, no metrics.json" in rows[3]["error"]
    md = bench.markdown(rows)
    assert "| full | 1,000 | 100.00 | 90.0 | 30.0 | 133.3 | 0.9100 | 0.9050 | completed |" in md
    assert "| lora | 12 | 1.19 | 30.0 | 10.0 | 400.0 | 0.5000 | 0.4900 | failed (exit 1) |" in md
    assert "- gradual: exit -9" in md and "- bitfit: TrainingError" in md


@pytest.mark.slow
def test_benchmark_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, tiny_data):
    """Two strategies as subprocesses into one folder: table, JSON and one run dir each."""
    out = tmp_path / "bench"
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={tiny_data['train']}",
        f"data.validation_file={tiny_data['validation']}", f"data.test_file={tiny_data['test']}",
        f"paths.cache_dir={tmp_path / 'cache'}", "model.max_length=32", "export=false",
        "~callbacks.progress_bar",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "strategies.py"), "--epochs", "2",
                           "--strategies", "head_only,full", "--max-train-samples", "32", "--out", str(out),
                           "--", *overrides], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and summary["max_train_samples"] == 32
    rows = summary["rows"]
    assert list(rows) == ["head_only", "full"]
    assert rows["head_only"]["trainable_params"] < rows["full"]["trainable_params"]
    for name in rows:
        m = metrics(out / name)
        assert m["status"] == "completed" and m["strategy"] == name and m["epochs"] == 2
        # 32 rows, batch 16: 2 steps an epoch
        assert m["global_step"] == 4
        assert rows[name]["time_per_epoch_s"] == pytest.approx(m["train_time_s"] / 2)
        assert (out / name / "stdout.log").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert md.count("| completed |") == 2 and "2 epoch(s), 32 train samples" in md
