"""Optimizer and scheduler from config.

The optimizer config is a ``_partial_`` of any ``torch.optim`` class; this module turns the
strategy's parameter groups (one per part, each with its LR) into torch parameter groups with
weight decay split the way BERT was trained and the HF Trainer does it: biases and
normalization weights get no decay. The scheduler is ``transformers.get_scheduler`` with warmup
given as a *ratio* of the total optimizer steps, which Lightning knows
(``trainer.estimated_stepping_batches``) only once the trainer is attached; so the scheduler
config is a partial too, completed in ``configure_optimizers``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

from sftlab.errors import ConfigError, checked

_NORM_NAMES = ("layernorm", "layer_norm", "rmsnorm", "ln_", "norm")


def learning_rate(value: Any) -> float:
    """``optimizer.lr`` validated: the one check, used up front (train's config checks) and here."""
    if value is None:
        raise ConfigError("The optimizer config needs an lr; set optimizer.lr=2e-5 (for example).")
    return checked("optimizer.lr", value, float, positive=True, hint="try optimizer.lr=2e-5")


def optimizer_lr(factory: Callable) -> float:
    """The base LR of an optimizer partial (``conf/optimizer/*.yaml: lr``), validated."""
    kw = factory.keywords if isinstance(factory, functools.partial) else {}
    return learning_rate(kw.get("lr"))


def no_decay_names(model) -> set[str]:
    """Parameters excluded from weight decay: every bias and every normalization weight."""
    import torch.nn as nn

    names = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm | nn.GroupNorm) or "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name.endswith("bias") or any(k in full.lower() for k in _NORM_NAMES[:3]):
                names.add(full)
    return names


def build_param_groups(model, groups: Iterable[dict[str, Any]], factory: Callable) -> list[dict[str, Any]]:
    """Split each strategy group into decay / no-decay torch groups, keeping name and LR.

    Group names (``block.5``, ``block.5/no_decay``) are kept in the torch groups, so
    ``LearningRateMonitor`` and our logs show each part's LR by name.
    """
    kw = factory.keywords if isinstance(factory, functools.partial) else {}
    weight_decay = float(kw.get("weight_decay", 0.0) or 0.0)
    skip = no_decay_names(model)
    out = []
    seen: set[int] = set()
    for group in groups:
        decay, plain = [], []
        for name, param in group["params"]:
            if id(param) in seen:
                raise ValueError(f"parameter {name} is in two strategy groups")
            seen.add(id(param))
            (plain if name in skip else decay).append(param)
        for params, wd, suffix in ((decay, weight_decay, ""), (plain, 0.0, "/no_decay")):
            if params:
                out.append({"params": params, "lr": float(group["lr"]), "weight_decay": wd,
                            "name": f"{group['name']}{suffix}"})
    if not out:
        raise ConfigError("The strategy leaves no parameter to train; choose another strategy.")
    return out


def build_scheduler(
    optimizer,
    *,
    num_training_steps: int,
    name: str = "linear",
    warmup_ratio: float = 0.0,
    warmup_steps: int | None = None,
    **kwargs: Any,
):
    """``transformers.get_scheduler`` with warmup as a fraction of the total steps."""
    from transformers import get_scheduler

    if warmup_steps is None:
        if not 0.0 <= float(warmup_ratio) < 1.0:
            raise ConfigError(f"scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        warmup_steps = math.ceil(float(warmup_ratio) * num_training_steps)
    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(
        name, optimizer, num_warmup_steps=int(warmup_steps), num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )
