"""The task room: clipping works with fused AdamW under bf16 and fp16 (GradScaler)."""

from __future__ import annotations

import types

import pytest
import torch


def grad_norm(optimizer) -> float:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def grad_max(optimizer) -> float:
    return max(p.grad.abs().max().item() for g in optimizer.param_groups for p in g["params"]
               if p.grad is not None)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_under_bf16_with_fused_adamw(tiny_model_dir, algorithm):
    """Lightning refuses to clip for fused optimizers under mixed precision; we clip ourselves:
    every step's gradients are larger than the bound before the hook and within it after."""
    import functools

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from sftlab.model import TextClassifier

    module = TextClassifier(str(tiny_model_dir), ["a", "b"],
                            optimizer=functools.partial(torch.optim.AdamW, lr=1.0, fused=True))
    measure = grad_norm if algorithm == "norm" else grad_max
    before, after, norm_after = [], [], []
    original = module.configure_gradient_clipping

    def clip_and_record(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        before.append(measure(optimizer))
        original(optimizer, gradient_clip_val, gradient_clip_algorithm)
        after.append(measure(optimizer))
        norm_after.append(grad_norm(optimizer))

    module.configure_gradient_clipping = clip_and_record
    batch = {"input_ids": torch.randint(1000, 2000, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1e-3,
                         gradient_clip_algorithm=algorithm,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, DataLoader([batch] * 4, batch_size=None))
    assert len(before) == len(after) == 2  # once per optimizer step
    assert all(b > 10 * 1e-3 for b in before), before  # clipping had work to do
    assert all(a <= 1e-3 * 1.01 for a in after), after
    # the bound is reached: rescaled to it (norm), or the largest entries cut to it (value),
    # which leaves the many entries at the bound with a norm far above it
    assert after == pytest.approx([1e-3] * 2, rel=0.01)
    if algorithm == "value":
        assert all(n > 10 * 1e-3 for n in norm_after), norm_after


def fp16_trainer(**kwargs):
    """A Trainer with Lightning's own fp16 plugin (GradScaler + fp16 autocast) on the CPU.

    ``Trainer(accelerator="cpu", precision="16-mixed")`` silently becomes bf16-mixed, so the
    plugin CUDA would get is handed over explicitly: the same ``MixedPrecision`` code path
    (scale the loss, our clipping hook, ``scaler.step``, ``scaler.update``), with CPU autocast
    in fp16. A modest initial scale keeps the first steps from overflowing in fp16.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    return pl.Trainer(accelerator="cpu", plugins=[plugin], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs), scaler


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fp16_mixed_with_fused_adamw_and_clipping_steps_on_true_gradients(tiny_model_dir, algorithm):
    """fp16 + GradScaler + fused AdamW + clipping: Lightning alone raises at clipping. Here the
    steps run, the weights change and stay finite, clipping sees true (unscaled) gradients
    (within the bound, not 1024x it), and AdamW's first moment after step 1 is
    (1 - beta1) x the clipped gradient: the fused kernel did not unscale a second time."""
    import functools

    from torch.utils.data import DataLoader

    from sftlab.model import TextClassifier

    torch.manual_seed(0)
    module = TextClassifier(str(tiny_model_dir), ["a", "b"],
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, fused=True))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    clipped, scales = [], []
    original = module.configure_gradient_clipping

    def clip_and_record(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        original(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clipped.append({id(p): p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                        if p.grad is not None})
        scales.append(scaler.get_scale())

    module.configure_gradient_clipping = clip_and_record
    first_moments = []
    module.on_train_batch_end = lambda *a: first_moments.append(
        {id(p): s["exp_avg"].clone() for p, s in module.trainer.optimizers[0].state.items()})
    batch = {"input_ids": torch.randint(1000, 2000, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    trainer, scaler = fp16_trainer(max_steps=2, gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm)
    trainer.fit(module, DataLoader([batch] * 4, batch_size=None))

    assert trainer.global_step == 2 and len(clipped) == 2
    assert scales[0] == 2.0**10  # the loss really was scaled (no overflow skipped step 1)
    grads = list(clipped[0].values())
    if algorithm == "norm":
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        assert norm == pytest.approx(1e-3, rel=0.01)  # true gradients, clipped to the bound
    else:
        assert max(g.abs().max().item() for g in grads) == pytest.approx(1e-3, rel=0.01)
    beta1 = trainer.optimizers[0].param_groups[0]["betas"][0]
    moments = first_moments[0]
    assert set(moments) == set(clipped[0])
    for pid, grad in clipped[0].items():
        # relative: a second unscale would make the moment 1024x too small, however small it is
        torch.testing.assert_close(moments[pid], (1 - beta1) * grad, rtol=1e-5, atol=1e-12)
    changed = [n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all(torch.isfinite(p).all() for p in module.parameters())


def test_gradient_clipping_is_off_without_a_value_and_clips_here_without_a_scaler(tiny_model_dir):
    """No clip value: gradients untouched; no scaler (fp32/bf16): clipped here, not by Lightning."""
    from sftlab.model import TextClassifier

    module = TextClassifier(str(tiny_model_dir), ["a", "b"])
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), 5.0)
    optimizer = torch.optim.SGD([param], lr=1.0)
    module.clip_gradients = lambda *args: pytest.fail("Lightning's clip_gradients must not be used")
    module._trainer = types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=None))
    for value in (None, 0):
        module.configure_gradient_clipping(optimizer, value, "norm")
    assert param.grad.tolist() == [5.0] * 3  # no clip value: no clipping
    module.configure_gradient_clipping(optimizer, 0.5, "value")
    assert param.grad.tolist() == [0.5] * 3


LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def module_from_config(compose, *overrides):
    """The task module as train.py builds it from ``cfg.model`` (no strategy/optimizer needed)."""
    from sftlab.config import instantiate

    cfg = compose(*overrides)
    return cfg, instantiate(cfg.model, label_names=LABELS, strategy=None, optimizer=None, scheduler=None)


def test_label_smoothing_is_the_loss_that_trains(compose):
    """``model.label_smoothing=0.1``: the training, validation and test losses are
    ``F.cross_entropy(logits, labels, label_smoothing=0.1)`` exactly, not the plain loss."""
    import torch.nn.functional as F

    cfg, module = module_from_config(compose, "model.label_smoothing=0.1")
    assert cfg.model.label_smoothing == 0.1
    module.eval()  # no dropout: the same logits on every forward
    with torch.no_grad():  # a random tiny model's logits are nearly uniform; widen the head so
        # that smoothing makes a difference worth checking (at uniform logits it makes none)
        module.model.classifier.weight.normal_(0, 3, generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": torch.randint(1000, 2000, (6, 10), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(6, 10, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 3, 3, 1])}
    with torch.no_grad():
        logits = module(batch)
        loss = module.training_step(batch, 0)
        module.validation_step(batch, 0)
    smoothed = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=0.1)
    plain = F.cross_entropy(logits.float(), batch["labels"])
    assert torch.equal(loss, smoothed)
    torch.testing.assert_close(module.val_loss.compute(), smoothed, rtol=1e-6, atol=0)
    assert abs(loss.item() - plain.item()) > 0.01  # the smoothing changed the loss

    _, default = module_from_config(compose)  # the default config: no smoothing
    default.load_state_dict(module.state_dict())
    default.eval()
    with torch.no_grad():
        assert torch.equal(default.training_step(batch, 0), plain)


def test_dropout_overrides_reach_the_config_and_the_dropout_modules(compose):
    """``model.hidden_dropout`` / ``model.attention_dropout`` set the loaded model's config and
    every dropout layer: attention-probability dropout at one, all others at the other."""
    import torch.nn as nn

    _, module = module_from_config(compose, "model.hidden_dropout=0.27", "model.attention_dropout=0.13")
    config = module.model.config
    assert config.hidden_dropout_prob == 0.27 and config.attention_probs_dropout_prob == 0.13
    dropouts = {n: m.p for n, m in module.model.named_modules() if isinstance(m, nn.Dropout)}
    attention = {n: p for n, p in dropouts.items() if n.endswith("attention.self.dropout")}
    hidden = {n: p for n, p in dropouts.items() if n not in attention}
    assert len(attention) == config.num_hidden_layers  # one per block
    assert "dropout" in hidden and "bert.embeddings.dropout" in hidden  # the head's and the embeddings'
    assert set(attention.values()) == {0.13} and set(hidden.values()) == {0.27}, dropouts

    # null (the default) keeps the checkpoint's own values
    _, default = module_from_config(compose)
    assert default.model.config.hidden_dropout_prob == 0.1
    assert default.model.config.attention_probs_dropout_prob == 0.1
    assert {m.p for m in default.model.modules() if isinstance(m, nn.Dropout)} == {0.1}
