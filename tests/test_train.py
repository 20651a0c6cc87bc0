"""The spine: configs compose, a tiny run trains end to end, and its results are reproducible."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT

GROUPS = ["model", "data", "strategy", "optimizer", "scheduler", "trainer", "logger",
          "callbacks", "paths", "hydra", "debug", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_options(group):
    assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ["model", "data", "strategy", "optimizer", "scheduler", "trainer", "logger",
                      "callbacks", "debug", "experiment"] for o in options(g)],
)
def test_every_option_composes(compose, group, option):
    cfg = compose(f"{group}={option}", tiny=False)
    assert cfg.seed == 42
    assert cfg.get(group) is not None or group in ("debug", "experiment")


@pytest.mark.parametrize("group,option", [("optimizer", o) for o in options("optimizer")]
                         + [("scheduler", o) for o in options("scheduler")]
                         + [("logger", o) for o in options("logger") if o != "wandb"]
                         + [("callbacks", o) for o in options("callbacks")]
                         + [("trainer", o) for o in ("default", "cpu")])
def test_objects_instantiate(compose, group, option):
    import torch
    from hydra.utils import instantiate

    from sftlab.config import instantiate_group
    from sftlab.optim import torch_factory

    cfg = compose(f"{group}={option}")
    if group == "optimizer":
        # every group gets the configured lr and weight decay, as torch stores them
        opt = torch_factory(instantiate(cfg.optimizer))([  # lr_scale is ours, not torch's
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.5, "weight_decay": 0.0},
            {"params": [torch.nn.Parameter(torch.zeros(2))]},
        ])
        assert type(opt).__name__ == cfg.optimizer._target_.rsplit(".", 1)[1]
        assert [g["lr"] for g in opt.param_groups] == [0.5, cfg.optimizer.lr]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0, cfg.optimizer.weight_decay]
    elif group == "scheduler":
        # the LR factor at chosen steps, from the config's own numbers: warmup over
        # ceil(warmup_ratio * 100) steps, then constant, linear or cosine (half a wave) to 0
        opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0},
                               {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.25}])
        sched = instantiate(cfg.scheduler)(opt, num_training_steps=100)
        warmup = math.ceil(cfg.scheduler.warmup_ratio * 100)

        def factor(step: int) -> float:
            if step < warmup:
                return step / warmup
            done = (step - warmup) / (100 - warmup)
            return {"constant": 1.0, "linear": 1.0 - done,
                    "cosine": 0.5 * (1.0 + math.cos(math.pi * done))}[cfg.scheduler.name]

        seen = {}
        for step in range(101):
            seen[step] = sched.get_last_lr()
            opt.step()
            sched.step()
        for step in (0, 1, 3, 5, 6, 7, 30, 53, 80, 99, 100):
            assert seen[step] == pytest.approx([factor(step), 0.25 * factor(step)], abs=1e-9), step
    elif group in ("logger", "callbacks"):
        assert instantiate_group(cfg[group])
    else:  # precision: auto is resolved by the pipelines before the trainer (sftlab.perf.precision)
        assert instantiate(cfg.trainer, use_distributed_sampler=False, precision="32-true").max_epochs == 1


def test_cfg_job_prints_fast_without_torch():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--cfg", "job", "strategy=partial"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "strategy:" in proc.stdout and "optimizer:" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported


def test_help_lists_groups():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for group in ("model", "data", "strategy", "optimizer", "scheduler", "trainer"):
        assert f"{group}:" in proc.stdout


def run_train(compose, *overrides, out=None):
    from sftlab.train import train

    cfg = compose(*overrides, out=out)
    metrics = train(cfg)
    return cfg, metrics


def test_end_to_end_train_test_export_and_eval(compose, tmp_path, toy_run, toy_data):
    import torch
    from conftest import assert_rows_agree, read_test_pass
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sftlab.evaluate import evaluate

    # the keyword task (conftest.py), from the toy model that already separates it: the test
    # predictions differ between rows, so the agreement check below can catch a shuffle
    toy = [f"data.train_file={toy_data['train']}", f"data.validation_file={toy_data['validation']}",
           f"data.test_file={toy_data['test']}"]
    cfg, metrics = run_train(compose, f"model.name_or_path={toy_run.run / 'model'}", *toy,
                             out=tmp_path / "run")
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/f1_macro", "test/acc", "test/f1_macro", "train_time_s",
                "train_samples_per_s", "trainable_params", "total_params", "peak_rss_mb"):
        assert key in saved, key
    assert saved["train_samples_per_s"] > 0
    assert saved["trainable_params"] == saved["total_params"]  # strategy=full
    assert list(run.glob("checkpoints/*.ckpt")) and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "confusion_matrix.csv").is_file() and (run / "confusion_matrix.png").is_file()
    confusion = (run / "confusion_matrix.csv").read_text().splitlines()
    assert len(confusion) == 5 and sum(int(x) for line in confusion[1:] for x in line.split(",")[1:]) == 24

    # the exported folder loads without sftlab and predicts what the test pass predicted, row
    # by row under the same class names (and at least 3 classes occur)
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert names == ["World", "Sports", "Business", "Sci/Tech"]
    want = read_test_pass(run, cfg.data.test_file)
    with torch.inference_mode():
        enc = tok(want.texts, truncation=True, max_length=cfg.model.max_length, padding=True,
                  return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)
    assert_rows_agree(names, [names[i] for i in probs.argmax(-1).tolist()], probs.tolist(), want)

    # eval.py on the exported model and on the best checkpoint reproduces the test metrics
    for source in (f"model_dir={run}", f"ckpt_path={saved['best_checkpoint']}"):
        ecfg = compose(source, *toy, config="eval", out=tmp_path / "eval")
        em = evaluate(ecfg)
        assert em["test/acc"] == pytest.approx(saved["test/acc"], abs=1e-6), source
        assert em["test/f1_macro"] == pytest.approx(saved["test/f1_macro"], abs=1e-6), source
        assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] == em["test/acc"]


def test_same_seed_same_metrics(compose, tmp_path):
    _, a = run_train(compose, "export=false", out=tmp_path / "a")
    _, b = run_train(compose, "export=false", out=tmp_path / "b")
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro"):
        assert a[key] == b[key], key
    _, c = run_train(compose, "export=false", "seed=7", out=tmp_path / "c")
    assert c["val/loss"] != a["val/loss"]


def test_local_tsv_with_string_labels(compose, tmp_path, tiny_model_dir):
    import torch
    from conftest import write_rows
    from transformers import AutoTokenizer, BertConfig, BertModel

    # wide random weights: predictions differ between rows (the default init gives every row the
    # same class), so metrics recomputed from the rows below can tell rows apart
    varied = tmp_path / "varied_bert"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=AutoTokenizer.from_pretrained(tiny_model_dir).vocab_size,
                         hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=128,
                         initializer_range=0.5)).save_pretrained(varied)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(varied)
    # 20 positive, 10 negative: a metric computed with swapped classes differs
    rows = [{"sentence": ("a fine good film " if i % 3 else "a dull bad film ") + str(i),
             "label": "positive" if i % 3 else "negative"} for i in range(30)]
    files = {s: write_rows(tmp_path / f"{s}.tsv", rows, delimiter="\t") for s in ("A", "B", "C")}
    cfg, metrics = run_train(
        compose, "data=local", f"data.train_file={files['A']}", f"data.validation_file={files['B']}",
        f"data.test_file={files['C']}", "data.text_field=sentence", "data.label_field=label",
        f"model.name_or_path={varied}", out=tmp_path / "run",
    )
    from transformers import AutoConfig

    run = Path(cfg.paths.output_dir)
    config = AutoConfig.from_pretrained(run / "model")
    assert config.num_labels == 2 and config.id2label == {0: "negative", 1: "positive"}

    # training moved the weights: the exported encoder is not the one it started from
    from safetensors.torch import load_file

    start = load_file(Path(cfg.model.name_or_path) / "model.safetensors")
    end = load_file(run / "model" / "model.safetensors")
    moved = [k for k, v in start.items() if not v.equal(end[f"bert.{k}"])]
    assert "encoder.layer.0.attention.self.query.weight" in moved and len(moved) > len(start) // 2

    # the test metrics are those of the rows in test_predictions.csv, and each row's true label
    # is the one in the file: acc, f1_macro and loss recomputed from the rows
    import csv

    with open(run / "test_predictions.csv", encoding="utf-8") as fh:
        preds = list(csv.DictReader(fh))
    assert [int(r["idx"]) for r in preds] == list(range(30))
    assert [int(r["true_id"]) for r in preds] == [["negative", "positive"].index(r["label"]) for r in rows]
    for r in preds:
        probs = [float(r["p_negative"]), float(r["p_positive"])]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert int(r["label_id"]) == probs.index(max(probs)) and r["label"] == config.id2label[int(r["label_id"])]
    pairs = [(int(r["true_id"]), int(r["label_id"])) for r in preds]
    assert len({p for _, p in pairs}) == 2 and len({(t == p) for t, p in pairs}) == 2  # varied
    assert metrics["test/acc"] == pytest.approx(sum(t == p for t, p in pairs) / 30, abs=1e-6)
    f1 = []
    for k in (0, 1):
        tp = sum(t == p == k for t, p in pairs)
        wrong = sum((t == k) != (p == k) for t, p in pairs)
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    assert metrics["test/f1_macro"] == pytest.approx(sum(f1) / 2, abs=1e-6)
    loss = -sum(math.log(float(r["p_" + config.id2label[int(r["true_id"])]])) for r in preds) / 30
    assert metrics["test/loss"] == pytest.approx(loss, abs=1e-4)
    assert json.loads((run / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]



# ------------------------------------------------- promises of the README, on tiny real runs
def test_metrics_json_has_per_class_keys_that_match_the_confusion_matrix(compose, tmp_path):
    """A real run's metrics.json: ``test/{f1,precision,recall}/<label>`` for every label (``Sci/Tech``
    as ``Sci_Tech``) and ``val/f1_macro``; the per-class numbers are those of the saved test
    confusion matrix, and the macro F1 is their mean."""
    cfg, _ = run_train(compose, "export=false", out=tmp_path / "run")
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    labels = ["World", "Sports", "Business", "Sci_Tech"]
    for kind in ("f1", "precision", "recall"):
        assert {k.split("/", 2)[2] for k in saved if k.startswith(f"test/{kind}/")} == set(labels), kind
    assert "val/f1_macro" in saved and "test/f1/Sci/Tech" not in saved

    rows = [line.split(",") for line in (run / "confusion_matrix.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["World", "Sports", "Business", "Sci/Tech"]
    cm = [[int(x) for x in r[1:]] for r in rows]
    f1s = []
    for i, label in enumerate(labels):
        tp, true, predicted = cm[i][i], sum(cm[i]), sum(row[i] for row in cm)
        precision = tp / predicted if predicted else 0.0
        recall = tp / true if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert saved[f"test/precision/{label}"] == pytest.approx(precision, abs=1e-6), label
        assert saved[f"test/recall/{label}"] == pytest.approx(recall, abs=1e-6), label
        assert saved[f"test/f1/{label}"] == pytest.approx(f1, abs=1e-6), label
        f1s.append(f1)
    assert saved["test/f1_macro"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-6)
    assert saved["test/acc"] == pytest.approx(sum(cm[i][i] for i in range(4)) / 24, abs=1e-6)


def test_early_stopping_stops_before_max_epochs(compose, tmp_path):
    """``callbacks.early_stopping.enable=true`` with patience 1, on a run whose val/acc cannot
    change (an LR far too small to move a weight): it stops after the second epoch, not the fifth."""
    cfg, metrics = run_train(
        compose, "callbacks.early_stopping.enable=true", "callbacks.early_stopping.patience=1",
        "trainer.max_epochs=5", "optimizer.lr=1e-30", "export=false", "test=false", out=tmp_path / "run")
    saved = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    steps_per_epoch = 48 // 8
    # epoch 0 sets the best val/acc, epoch 1 does not beat it: patience 1 is used up
    assert saved["status"] == "completed"
    assert (saved["epochs"], saved["global_step"]) == (2, 2 * steps_per_epoch)
    assert saved["global_step"] < cfg.trainer.max_epochs * steps_per_epoch


def test_ckpt_path_starts_a_new_run_from_another_runs_checkpoint(compose, tmp_path):
    """``ckpt_path=<old run>/checkpoints/last.ckpt``: a new run in its own dir, starting at the
    old run's global step (its training state loaded), the old run's files untouched."""
    import hashlib

    import torch

    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    def logged_steps(run: Path) -> list[int]:
        import csv

        with open(run / "csv" / "metrics.csv", encoding="utf-8") as fh:
            return [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]

    old_cfg, old = run_train(compose, "export=false", "test=false", out=tmp_path / "old")
    old_run = Path(old_cfg.paths.output_dir)
    last = old_run / "checkpoints" / "last.ckpt"
    assert old["global_step"] == 6 and torch.load(last, weights_only=True)["global_step"] == 6
    before = digest(old_run)

    new_cfg, new = run_train(compose, f"ckpt_path={last}", "trainer.max_epochs=2", "export=false", "test=false",
                             out=tmp_path / "new")
    new_run = Path(new_cfg.paths.output_dir)
    assert new_run != old_run and (new_run / "metrics.json").is_file()
    # it continued from step 6: one more epoch of 6 steps, and its log starts after step 6
    assert (new["global_step"], new["epochs"]) == (12, 2)
    assert min(logged_steps(old_run)) < 6 <= min(logged_steps(new_run))
    assert torch.load(new_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert json.loads((new_run / "metrics.json").read_text())["global_step"] == 12
    assert digest(old_run) == before  # nothing of the old run changed
