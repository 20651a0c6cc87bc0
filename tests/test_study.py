"""The strategy study (issue: strategies at their own LRs, several seeds, intervals).

What a study relies on, each checked directly: every strategy config carries its own LR and
``optimizer.lr_scale`` multiplies whichever LR is in force; seeds give independent data orders
(no epoch of one seed is another seed's); the carved validation split does not move with the
training seed; gradual unfreezing reaches every part of a deep model for a real share of the
run; and a study multirun ends in the report's CSVs, charts and README.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_layers import one_thread  # noqa: E402,F401  (autouse: tiny models on one thread)
from test_strategies import _loader, _recorder, _tiny_module, make  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGY_LRS = {"full": 2e-5, "partial": 2e-5, "gradual": 2e-5, "discriminative": 2e-5,
                "discriminative_ulmfit": 1e-4, "head_only": 1e-3, "bitfit": 1e-3, "lora": 5e-4}


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("strategy", sorted(STRATEGY_LRS))
def test_each_strategy_trains_at_its_own_lr_unless_set(strategy):
    from sftlab.optim import base_lr

    cfg = _compose(f"strategy={strategy}")
    assert cfg.strategy.lr == STRATEGY_LRS[strategy]
    assert base_lr(cfg.optimizer) == pytest.approx(STRATEGY_LRS[strategy])
    assert base_lr(_compose(f"strategy={strategy}", "optimizer.lr=3e-5").optimizer) == pytest.approx(3e-5)
    assert base_lr(_compose(f"strategy={strategy}", "optimizer.lr_scale=2").optimizer) \
        == pytest.approx(2 * STRATEGY_LRS[strategy])
    assert base_lr(_compose(f"strategy={strategy}", "optimizer.lr=3e-5", "optimizer.lr_scale=0.5").optimizer) \
        == pytest.approx(1.5e-5)


def test_cfg_job_shows_the_strategys_lr():
    """`python train.py strategy=lora --cfg job`: LoRA's own LR is in the printed config."""
    out = subprocess.run([sys.executable, "train.py", "strategy=lora", "--cfg", "job", "--resolve"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import yaml

    printed = yaml.safe_load(out.stdout)
    assert printed["strategy"]["lr"] == 5e-4 and printed["optimizer"]["lr"] == 5e-4
    assert printed["optimizer"]["lr_scale"] == 1.0


def test_lr_scale_reaches_every_param_group_and_not_the_torch_optimizer():
    import functools

    import torch

    from sftlab.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    factory = functools.partial(torch.optim.AdamW, lr=1e-3, lr_scale=2.0, weight_decay=0.01)
    opt = build_optimizer(model, None, factory)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3] * len(opt.param_groups))
    assert "lr_scale" not in opt.defaults
    with pytest.raises(Exception, match="optimizer.lr_scale must be a positive number"):
        build_optimizer(model, None, functools.partial(torch.optim.AdamW, lr=1e-3, lr_scale=0))


def _epoch_orders(seed: int, epochs: int = 4) -> list[list[list[int]]]:
    import numpy as np

    from sftlab.data.batching import LengthGroupedBatchSampler

    lengths = np.random.default_rng(0).integers(5, 60, size=200)
    sampler = LengthGroupedBatchSampler(lengths, 8, shuffle=True, seed=seed)
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out.append(list(sampler))
    return out


def test_seeds_give_independent_orders_in_every_epoch():
    """Seed s epoch e never equals seed s+1 epoch e-1 (it did with default_rng(seed + epoch))."""
    orders = {s: _epoch_orders(s) for s in (1, 2, 3)}
    for s in (1, 2):
        for e in range(4):
            assert orders[s][e] != orders[s + 1][e], (s, e)  # different seeds, same epoch
            if e:
                assert orders[s][e] != orders[s + 1][e - 1], (s, e)  # no shifted reuse
    assert orders[1] == _epoch_orders(1)  # and the same seed repeats itself exactly


def test_carved_validation_split_does_not_move_with_the_training_seed(tmp_path, tiny_data):
    """Without a validation file, validation is carved with data.split_seed, not the run seed."""
    from transformers import AutoTokenizer

    from sftlab.data import TextClassificationDataModule
    from sftlab.resolvers import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path())

    def carved(seed: int, split_seed: int | None = 42) -> tuple[list[str], list[str]]:
        dm = TextClassificationDataModule(tok, train_file=str(tiny_data["train"]), val_fraction=0.25,
                                          seed=seed, split_seed=split_seed, max_length=32,
                                          cache_dir=str(tmp_path / "cache"), splits=["train", "validation"])
        dm._load_raw()
        return list(dm._raw["validation"]["text"]), list(dm._raw["train"]["text"])

    assert carved(1) == carved(2) == carved(3)
    assert carved(1, split_seed=7) != carved(1)  # the split seed does choose the rows
    cfg = _compose("seed=5", "data=local", "data.train_file=x.csv")
    assert cfg.data.seed == 5 and cfg.data.split_seed == 42


def test_gradual_trains_every_part_of_a_12_block_model_for_a_real_share():
    """Default schedule on a deep model: the stages spread over unfreeze_over (half) of the run,
    so the embeddings and the bottom block train for at least half of the steps."""
    import lightning.pytorch as pl

    total = 52
    strategy = make("gradual", initial_layers=0, unfreeze_every_steps=None, unfreeze_every=None)
    assert strategy.unfreeze_over == 0.5
    module = _tiny_module("bert", strategy, total, num_blocks=12)
    rec = _recorder()
    trainer = pl.Trainer(max_steps=total, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[*strategy.callbacks(), rec])
    trainer.fit(module, train_dataloaders=_loader(n=total * 4))
    schedule = strategy.unfreeze_steps()
    assert strategy.total_steps == total and len(schedule) == 15  # 12 blocks, embeddings, pooler, head
    assert max(schedule.values()) <= total // 2
    for part, first in schedule.items():
        steps_with_grad = [s for s in rec.grads if part in rec.grads[s]]
        assert steps_with_grad and min(steps_with_grad) == first, part
        assert len(steps_with_grad) >= total // 2, (part, len(steps_with_grad))


def test_gradual_warns_once_when_an_explicit_schedule_leaves_parts_untrained(caplog):
    import lightning.pytorch as pl

    total = 6
    strategy = make("gradual", initial_layers=0, unfreeze_every_steps=2)
    module = _tiny_module("bert", strategy, total, num_blocks=4)
    trainer = pl.Trainer(max_steps=total, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=strategy.callbacks())
    with caplog.at_level("WARNING", logger="sftlab.strategies.gradual"):
        trainer.fit(module, train_dataloaders=_loader(n=total * 4))
    warnings = [r.getMessage() for r in caplog.records if "never train" in r.getMessage()]
    assert len(warnings) == 1
    # stages every 2 steps: block.3@2, block.2@4, block.1@6, block.0@8, embeddings@10
    assert "block.1, block.0, embeddings never train in this run's 6 steps" in warnings[0]
    assert "strategy.unfreeze_every" in warnings[0]


@pytest.mark.slow
def test_study_multirun_then_report(tmp_path, tiny_model_dir, tiny_data):
    """python train.py -m hparams_search=study strategy=full,head_only seed=1,2
    optimizer.lr_scale=1 debug=fast, then python -m sftlab.report <sweep dir>."""
    logs = tmp_path / "logs"
    args = [sys.executable, "train.py", "-m", "hparams_search=study", "strategy=full,head_only", "seed=1,2",
            "optimizer.lr_scale=1", "debug=fast", f"paths.log_dir={logs}", f"paths.cache_dir={tmp_path / 'c'}",
            f"model.name_or_path={tiny_model_dir}", f"data.train_file={tiny_data['train']}",
            f"data.validation_file={tiny_data['validation']}", f"data.test_file={tiny_data['test']}",
            "model.max_length=32", "~callbacks.progress_bar", "export=false"]
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    import os

    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((logs / "debug" / "multirun").iterdir())
    rep = subprocess.run([sys.executable, "-m", "sftlab.report", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, **env})
    assert rep.returncode == 0, rep.stderr
    out = sweep / "report"
    with open(out / "cells.csv", encoding="utf-8") as fh:
        cells = list(csv.DictReader(fh))
    assert {c["strategy"] for c in cells} == {"full", "head_only"} and all(c["n"] == "2" for c in cells)
    for col in ("strategy", "lr", "n", "failed", "val/acc_mean", "val/acc_std", "val/acc_ci_low",
                "val/acc_ci_high", "test/acc_mean", "test/acc_ci_low", "test/acc_ci_high",
                "train_time_s_mean", "trainable_params", "peak_rss_mb_mean"):
        assert col in cells[0], col
    # each strategy at its own LR (head_only 1e-3, full 2e-5)
    assert {c["strategy"]: float(c["lr"]) for c in cells} == {"full": 2e-5, "head_only": 1e-3}
    with open(out / "strategies.csv", encoding="utf-8") as fh:
        strat = {r["strategy"]: r for r in csv.DictReader(fh)}
    for col in ("lr", "n", "test/acc_mean", "test/acc_ci_low", "test/acc_ci_high", "diff_vs_full_mean",
                "diff_vs_full_ci_low", "diff_vs_full_ci_high", "verdict"):
        assert col in strat["head_only"], col
    assert strat["head_only"]["verdict"] in ("better", "worse", "within noise")
    for png in ("val_vs_lr.png", "cost_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "Recommended: **" in (out / "README.md").read_text()
