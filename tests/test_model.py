"""The task room: fast dropout keeps dropout's statistics; clipping works with fused AdamW."""

from __future__ import annotations

import pytest
import torch

from sftlab.model import FastDropout, use_fast_dropout


def test_fast_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    d = FastDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = d(x)
    keep = (y != 0).float().mean().item()
    assert keep == pytest.approx(0.9, abs=0.002)  # 1e6 draws: sd of the rate is 3e-4
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)  # inverted scaling keeps the mean
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.equal(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.9))
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    # independent masks: two calls differ, and neighbouring lanes of one draw are uncorrelated
    m = (FastDropout(0.5).train()(torch.ones(400_000)) != 0).float().view(-1, 4)
    corr = torch.corrcoef(m.T)
    assert (corr - torch.eye(4)).abs().max() < 0.01
    assert not torch.equal(d(x), d(x))
    d.eval()
    assert d(x) is x


def test_swapping_dropout_changes_nothing_in_eval(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    before = model(input_ids=ids).logits
    n = use_fast_dropout(model)
    assert n >= 2 * 3 + 2  # two per block, embeddings, classifier
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)


def test_gradient_clipping_under_bf16_with_fused_adamw(tiny_model_dir):
    """Lightning refuses to clip for fused optimizers under mixed precision; we clip ourselves."""
    import functools

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from sftlab.model import TextClassifier

    module = TextClassifier(str(tiny_model_dir), ["a", "b"],
                            optimizer=functools.partial(torch.optim.AdamW, lr=1.0, fused=True))
    norms = []
    original = module.configure_gradient_clipping

    def clip_and_record(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        original(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    module.configure_gradient_clipping = clip_and_record
    batch = {"input_ids": torch.randint(1000, 2000, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1e-3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, DataLoader([batch] * 4, batch_size=None))
    assert norms and all(n <= 1e-3 * 1.01 for n in norms)
