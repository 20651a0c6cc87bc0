"""Finding things in a transformers model's module tree, PEFT wrappers seen through.

The layer map (:mod:`sftlab.layers`) names parts by where modules live (``encoder.layer``,
``transformer.h``); these helpers answer the path questions it asks: the base model's
attribute, the largest ``nn.ModuleList`` (the blocks of an architecture without a rule), a
module by dotted path, and the same path seen from a PEFT wrapper.
"""

from __future__ import annotations

from typing import Any


def unwrap(model) -> Any:
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model()``), else itself."""
    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> PreTrainedModel
        get_base = getattr(inner, "get_base_model", None)
        if callable(get_base) and type(inner).__module__.startswith("peft"):
            nxt = get_base()
            if nxt is inner:
                break
            inner = nxt
        else:
            break
    return inner


def model_type_of(model) -> str:
    config = getattr(unwrap(model), "config", None)
    return str(getattr(config, "model_type", None) or type(unwrap(model)).__name__)


def under(name: str, path: str) -> bool:
    return bool(path) and (name == path or name.startswith(path + "."))


def base_prefix(model) -> str:
    """Path of the base model inside the task model ('' if the model is its own base)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and isinstance(getattr(model, prefix, None), torch_nn().Module):
        return prefix
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        for name, module in model.named_children():
            if module is base:
                return name
    return ""


def torch_nn():
    import torch.nn as nn

    return nn


def largest_module_list(model, within: str) -> str | None:
    """The path of the ``nn.ModuleList`` (of >= 1 module) holding the most parameters."""
    nn = torch_nn()
    best, best_n = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not under(name, within):
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > best_n:
            best, best_n = name, n
    return best


def outer_path(model, inner, path: str) -> str:
    """``path`` (relative to ``inner``) relative to ``model`` (they differ for PEFT wrappers)."""
    if model is inner:
        return path
    for name, module in model.named_modules():
        if module is inner:
            return f"{name}.{path}" if name else path
    return path


def get_module(model, path: str):
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
