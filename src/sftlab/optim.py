"""Optimizer and scheduler from config.

The optimizer config is a ``_partial_`` of any ``torch.optim`` class. ``build_optimizer``
follows fastai's ``opt_func(splitter(model), lr=lr)``: it reads the LR and weight decay once,
asks the strategy for its parameter groups (one per part that ever trains, each at
``lr * lr_decay ** depth``), splits each into decay / no-decay groups the way BERT was trained
and the HF Trainer does it (biases and normalization weights get no decay), and calls the
partial on them. The scheduler is ``transformers.get_scheduler`` with warmup given as a *ratio*
of the total optimizer steps, which Lightning knows (``trainer.estimated_stepping_batches``)
only once the trainer is attached; so the scheduler config is a partial too, completed in
``configure_optimizers``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

from sftlab.errors import ConfigError, checked

_NORM_NAMES = ("layernorm", "layer_norm", "rmsnorm", "ln_", "norm")
_NO_DECAY = "/no_decay"


def learning_rate(value: Any) -> float:
    """``optimizer.lr`` validated: the one check, used up front (train's config checks) and here."""
    if value is None:
        raise ConfigError("The optimizer config needs an lr; set optimizer.lr=2e-5 (for example).")
    return checked("optimizer.lr", value, float, positive=True, hint="try optimizer.lr=2e-5")


def build_optimizer(model, strategy, factory: Callable):
    """The optimizer over what ``strategy`` trains (every parameter when ``strategy`` is None).

    ``factory`` is the optimizer partial (``conf/optimizer/*.yaml``); its ``lr`` and
    ``weight_decay`` are read here, once, and every group carries its own. Group names
    (``block.5``, ``block.5/no_decay``) are kept in the torch groups, so ``LearningRateMonitor``,
    our logs and the parts table show each part's LR by name.
    """
    kw = factory.keywords if isinstance(factory, functools.partial) else {}
    lr = base_lr(kw)
    weight_decay = float(kw.get("weight_decay", 0.0) or 0.0)
    factory = torch_factory(factory)
    groups = strategy.param_groups(model, lr) if strategy is not None else [
        {"name": "all", "params": list(model.named_parameters()), "lr": lr}
    ]
    return factory(split_decay(model, groups, weight_decay))


def torch_factory(factory: Callable) -> Callable:
    """The optimizer partial without ``lr_scale`` (ours, not a torch optimizer argument)."""
    if isinstance(factory, functools.partial) and "lr_scale" in factory.keywords:
        kw = {k: v for k, v in factory.keywords.items() if k != "lr_scale"}
        return functools.partial(factory.func, *factory.args, **kw)
    return factory


def base_lr(optimizer_cfg: Any) -> float:
    """``optimizer.lr × optimizer.lr_scale``: the base LR a run trains with, validated.

    ``optimizer.lr`` is the strategy's own LR unless the user set one (``conf/optimizer``
    interpolates ``${strategy.lr}``); ``lr_scale`` (default 1) multiplies whichever is in force,
    so one sweep can compare every strategy around its own LR.
    """
    scale = optimizer_cfg.get("lr_scale", 1.0)
    scale = 1.0 if scale is None else checked("optimizer.lr_scale", scale, float, positive=True)
    return learning_rate(optimizer_cfg.get("lr")) * scale


def part_lrs(optimizer) -> dict[str, float]:
    """Part name -> the base LR the optimizer gives it (before the scheduler's factor)."""
    out = {}
    for group in optimizer.param_groups:
        name = str(group.get("name", ""))
        out[name.removesuffix(_NO_DECAY)] = float(group.get("initial_lr", group["lr"]))
    return out


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


def split_decay(model, groups: Iterable[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Split each strategy group into decay / no-decay torch groups, keeping name and LR."""
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
        for params, wd, suffix in ((decay, weight_decay, ""), (plain, 0.0, _NO_DECAY)):
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
