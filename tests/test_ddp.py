"""DDP correctness on CPU: two gloo processes score every example exactly once, and only rank 0 writes.

The 2-process run goes through ``python train.py trainer=ddp ...``, the way users start it:
Lightning re-launches the script for rank 1 inside rank 0's Hydra run dir.
"""

from __future__ import annotations

import csv
import json

import pytest
from test_reliability import cli, tiny_args


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
    proc = cli(tiny_args(varied_model_dir, tiny_data, tmp_path) + [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        # 24 validation/test rows in batches of 10: rank 0 scores 10 + 4, rank 1 scores 10; a
        # sampler that padded ranks to equal length would count 6 of them twice
        "data.eval_batch_size=10", "optimizer.lr=1e-4", f"paths.log_dir={logs}",
    ], timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]

    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 ran inside rank 0's dir and made none of its own
    run = runs[0]
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
