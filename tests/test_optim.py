"""The optimizer room (``sftlab.optim``): no weight decay on biases and norm weights, and the
LR schedule's warmup as a ratio of the trainer's total optimizer steps.

The expectations are written from the README's promise, not read back from the code: a
parameter is exempt from weight decay when it is a bias or belongs to a normalization layer,
and the default ``linear`` schedule warms up linearly for ``ceil(warmup_ratio * total)``
steps, then decays linearly to 0 at the last step.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_layers import ARCHS, one_thread, tiny_model  # noqa: E402,F401

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def expected_no_decay(model) -> set[str]:
    """Biases and the weights of normalization layers, by module type and parameter name."""
    import torch.nn as nn

    out = set()
    for mod_name, module in model.named_modules():
        norm = isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm1d) or type(module).__name__.endswith(
            ("LayerNorm", "RMSNorm"))
        for p_name, _ in module.named_parameters(recurse=False):
            if norm or p_name == "bias" or p_name.endswith("_bias"):
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


def optimizer_factory(compose, *overrides):
    """The configured optimizer partial, callable on param groups as torch's (lr_scale is ours)."""
    from hydra.utils import instantiate

    from sftlab.optim import torch_factory

    cfg = compose(*overrides)
    return cfg, torch_factory(instantiate(cfg.optimizer))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_decay_groups_hold_exactly_biases_and_norm_weights(arch, compose):
    """``<part>/no_decay`` groups: every bias and norm weight, at weight_decay 0; ``<part>``:
    everything else, at the configured ``optimizer.weight_decay``."""
    from sftlab.optim import build_optimizer
    from sftlab.strategies import Discriminative

    cfg, factory = optimizer_factory(compose, "optimizer.weight_decay=0.05")
    strategy = Discriminative(lr_decay=0.5)
    model = strategy.setup(tiny_model(arch))
    optimizer = build_optimizer(model, strategy, factory)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = expected_no_decay(model)
    # the model has both kinds, so the check below is not vacuous
    assert any("norm" in n.lower() or ".ln_" in n for n in no_decay), sorted(no_decay)
    assert any(n.endswith(".bias") for n in no_decay)

    parts = {g["name"] for g in strategy.param_groups(model, cfg.optimizer.lr)}
    seen: list[str] = []
    for group in optimizer.param_groups:
        name = group["name"]
        members = {names[id(p)] for p in group["params"]}
        seen += members
        if name.endswith("/no_decay"):
            assert name.removesuffix("/no_decay") in parts
            assert group["weight_decay"] == 0.0, name
            assert members <= no_decay, (name, sorted(members - no_decay))
        else:
            assert name in parts
            assert group["weight_decay"] == pytest.approx(0.05), name
            assert not members & no_decay, (name, sorted(members & no_decay))
    # every parameter the strategy trains is in exactly one group, and every no-decay one of
    # them in a no_decay group
    trained = {n for g in strategy.param_groups(model, cfg.optimizer.lr) for n, _ in g["params"]}
    assert len(seen) == len(set(seen)) and set(seen) == trained
    in_no_decay = {names[id(p)] for g in optimizer.param_groups if g["name"].endswith("/no_decay")
                   for p in g["params"]}
    assert in_no_decay == no_decay & trained


def test_adamw_step_decays_weights_but_not_biases_or_layernorm(compose):
    """One real AdamW step: a no-decay parameter moves exactly as AdamW without decay would
    move it; every other parameter additionally shrinks by ``lr * weight_decay * p``."""
    import torch
    import torch.nn.functional as F

    from sftlab.optim import build_optimizer
    from sftlab.strategies import Discriminative

    wd = 0.5
    cfg, factory = optimizer_factory(compose, f"optimizer.weight_decay={wd}", "optimizer.lr=1e-1")
    strategy = Discriminative(lr_decay=0.5)
    model = strategy.setup(tiny_model("bert")).eval()  # eval: no dropout, the same gradients
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    for m in (model, reference):
        F.cross_entropy(m(input_ids=ids).logits, labels).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = build_optimizer(model, strategy, factory)
    names = {id(p): n for n, p in model.named_parameters()}
    ref = dict(reference.named_parameters())
    lrs = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    # the same optimizer (the configured partial) over the same groups, weight decay 0 everywhere
    ref_optimizer = factory([{"params": [ref[names[id(p)]] for p in g["params"]], "lr": g["lr"],
                              "weight_decay": 0.0} for g in optimizer.param_groups])
    assert type(ref_optimizer) is type(optimizer) is torch.optim.AdamW
    optimizer.step()
    ref_optimizer.step()

    no_decay = expected_no_decay(model)
    checked = {"decay": 0, "no_decay": 0}
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"
        if n in no_decay:
            assert torch.equal(p, ref[n]), f"{n} was decayed"
            checked["no_decay"] += 1
        else:
            decay = lrs[n] * wd * before[n]
            torch.testing.assert_close(p, ref[n] - decay, rtol=0, atol=1e-6)
            assert decay.abs().max() > 1e-4, n  # far above the tolerance: the check has teeth
            checked["decay"] += 1
    assert checked["decay"] and checked["no_decay"]


@pytest.mark.parametrize("warmup_ratio, epochs", [(0.25, 2), (0.06, 3)])
def test_linear_schedule_warms_up_then_decays_over_the_trainers_steps(compose, tiny_model_dir, warmup_ratio,
                                                                      epochs):
    """The LR of every group at every optimizer step of a real fit, against the formula
    ``base * s / w`` for ``s < w``, then ``base * (T - s) / (T - w)``, with ``T`` the trainer's
    total steps and ``w = ceil(warmup_ratio * T)``."""
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from sftlab.model import TextClassifier
    from sftlab.strategies import Discriminative

    cfg = compose(f"scheduler.warmup_ratio={warmup_ratio}", "optimizer.lr=1e-3")
    assert cfg.scheduler.name == "linear"
    module = TextClassifier(str(tiny_model_dir), LABELS, strategy=Discriminative(lr_decay=0.5),
                            optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    batches_per_epoch = 5
    total = batches_per_epoch * epochs
    warmup = math.ceil(warmup_ratio * total)
    seen: list[dict[str, float]] = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # before step s
            seen.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    batch = {"input_ids": torch.randint(1000, 2000, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 3])}
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RecordLR()])
    trainer.fit(module, DataLoader([batch] * batches_per_epoch, batch_size=None))
    assert trainer.global_step == total and len(seen) == total

    bases = {g["name"]: g["initial_lr"] for g in trainer.optimizers[0].param_groups}
    assert bases["head"] == pytest.approx(1e-3) and bases["embeddings"] == pytest.approx(1e-3 * 0.5 ** 3)

    def formula(s: int) -> float:
        return s / warmup if s < warmup else (total - s) / (total - warmup)

    for s, lrs in enumerate(seen):
        for name, lr in lrs.items():
            assert lr == pytest.approx(bases[name] * formula(s), rel=1e-9, abs=1e-15), (s, name)
    head = [lrs["head"] for lrs in seen]
    assert head[0] == 0.0                                   # step 0: warmup starts at 0
    assert head[warmup] == pytest.approx(1e-3)              # end of warmup: the full LR
    mid = (warmup + total) // 2
    assert head[mid] == pytest.approx(1e-3 * (total - mid) / (total - warmup))  # mid-decay
    assert head[-1] == pytest.approx(1e-3 / (total - warmup))  # last step: one step from 0
    assert max(head) == head[warmup]
