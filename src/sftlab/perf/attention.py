"""Attention with fast dropout on the probabilities, as a transformers attention backend.

Why: ``scaled_dot_product_attention`` with ``dropout_p > 0`` cannot use its fused CPU kernel,
so in training it runs its generic math path (extra copies, fp32 up-casts, a bernoulli mask).
:func:`attention` is plain scaled dot-product attention with :func:`sftlab.perf.dropout.fast_dropout`
on the probabilities, registered with transformers' ``AttentionInterface`` (the documented
extension point) and used by models that accept attention backends (BERT/MiniLM, RoBERTa,
ELECTRA, GPT-2 ...). Whenever it is not the training-time CPU case it hands over to
transformers' own SDPA function unchanged (GPU, eval, ``p == 0``, GQA, position biases,
soft-capping).

Nothing is registered on import: :func:`sftlab.perf.dropout.use_fast_dropout` calls
:func:`register_attention` when it switches a model.
"""

from __future__ import annotations

import weakref

import torch

from sftlab.perf import dropout as _dropout  # its fast_dropout, looked up at each call

#: the name under which :func:`attention` is registered with transformers
ATTENTION_NAME = "sftlab_fast_dropout"

_additive_cache: list = [None, None, None]  # (weakref to the bool mask, its _version, additive mask)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend, the SDPA convention) as 0 / dtype-min to add to the scores.

    Why: ``masked_fill(~mask, min)`` reads the bool mask and writes a new score tensor in every
    layer, and the negation is a slow bool kernel on CPU; transformers hands every layer the
    same mask object, so it is converted once per forward pass (a one-entry cache that holds
    the mask by weak reference and checks its version counter) and added in place. The
    probabilities are unchanged: a masked score becomes dtype-min either way, and softmax
    gives it exactly 0. Float masks (already additive) pass through cast.
    """
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    ref, version, cached = _additive_cache
    if ref is not None and ref() is mask and version == mask._version and cached.dtype == dtype:
        return cached
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min)
    _additive_cache[:] = [weakref.ref(mask), mask._version, additive]
    return additive


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
              is_causal=None, **kwargs):
    """Scaled dot-product attention with fast dropout on the probabilities (a transformers backend).

    Same signature and return value as ``transformers.integrations.sdpa_attention_forward``,
    to which it delegates everything but its one case: training on CPU with ``dropout > 0``,
    no GQA, no position bias, no soft-capping, no returned attention weights.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (dropout == 0.0 or query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) > 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    q_length, kv_length = query.shape[2], key.shape[2]
    # the same causal rule as transformers' SDPA function: no mask + a causal module = causal
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if is_causal and attention_mask is None and q_length > 1:
        attention_mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(
            kv_length - q_length)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:  # in place: matmul's backward does not need its output
        scores.add_(additive_mask(attention_mask, scores.dtype))
    if value.dtype in (torch.bfloat16, torch.float16):
        # the kernel accumulates in fp32 either way; writing (and saving for backward) the
        # probabilities in the value dtype, which the next matmul uses anyway, instead of an
        # fp32 copy saves B*H*L*L*4 bytes per layer (75 MB at batch 16, length 128, MiniLM).
        # Autocast would force softmax to fp32, so it is off for this one op.
        with torch.autocast(query.device.type, enabled=False):
            probs = torch.softmax(scores.to(value.dtype), dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = _dropout.fast_dropout(probs, dropout)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register :func:`attention` (and SDPA's mask format for it) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention)
    # without a registered mask function transformers builds *no* padding mask for a custom
    # backend (masking_utils: "custom attention without equivalent mask creation")
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
