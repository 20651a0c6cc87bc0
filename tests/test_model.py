"""The task room: clipping works with fused AdamW under bf16."""

from __future__ import annotations

import torch


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
