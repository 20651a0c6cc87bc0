"""Cheaper dropout on CPU: the same statistics from a quarter of the random numbers.

Why: on a CPU, ``torch.bernoulli_`` draws one random number per element on one thread, and
the profiler of a bf16 MiniLM training step put dropout among the largest costs of the step
(README "Performance" has the figures). Attention-probability dropout has a second cost,
handled by the attention backend in :mod:`sftlab.perf.attention`.

:class:`FastDropout` replaces every ``nn.Dropout`` module (hidden, embedding, classifier), and
:func:`use_fast_dropout` switches a model to it and to the attention backend. Training reaches
it from config only: :class:`FastDropoutCallback` (``conf/perf/default.yaml``,
``perf.fast_dropout``) switches the LightningModule's model when ``fit`` sets up.

The mask: one int64 draw split into four 16-bit lanes gives four independent uniform 16-bit
numbers, so each element is still dropped independently with probability p (rounded to a
multiple of 1/65536). Off the CPU, or with p == 0, it is ``F.dropout``. While
``perf.cpu_kernels`` has its compiled kernel loaded (:mod:`sftlab.perf.kernels`), fp32/bf16
tensors take that instead: the same rule on the lanes of a hashed counter, in one pass.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """1 (keep) with probability ``1 - p`` per element, independently, else 0; in ``dtype``.

    A float ``dtype`` is built without a bool tensor in between: on CPU the kernels that read
    or write bool tensors (``ge``, ``where``, bool casts) are several times slower than
    arithmetic on int16/bf16, so the 0/1 mask comes from a clamp and a shift instead.
    """
    n = 1
    for s in shape:
        n *= int(s)
    # keep an element when its 16-bit lane (as int16, -32768..32767) is >= threshold
    threshold = -32768 + round(float(p) * 65536)
    if threshold <= -32768 or threshold > 32767:  # p rounds to 0 (keep all) or to 1 (drop all)
        return torch.full(tuple(shape), threshold <= -32768, dtype=dtype)
    # 64 random bits per word. ``randint(-2**63, 2**63 - 1)`` draws the same words but reduces
    # each modulo 2**64 - 1, a 64-bit division per word: 14 vs 9 ms for a MiniLM step's 1.45M
    # words (AVX2 EPYC). The full-range ``random_`` takes the generator's word as it is; the
    # xor maps it onto randint's value (equal unless the word is 2**64 - 1, p = 2**-64), so the
    # masks, and every seeded run, are the ones randint gave (a test pins it).
    words = torch.empty(((n + 3) // 4,), dtype=torch.int64).random_(-(2**63), None).bitwise_xor_(-(2**63))
    lanes = words.view(torch.int16)[:n]
    if dtype == torch.bool:
        return (lanes >= threshold).view(shape)
    # clamp to {threshold - 1, threshold}, then shift to {0, 1}: two cheap int16 passes
    return lanes.clamp(threshold - 1, threshold).sub_(threshold - 1).to(dtype).view(shape)


class _ScaleByMask(torch.autograd.Function):
    """``x * keep * scale`` forward and ``grad * keep * scale`` backward, one pass each.

    Autograd's own graph for this (``where`` or ``mul`` then a scalar ``mul``) takes two passes
    each way, one of them a slow bool kernel. ``addcmul`` computes ``0 + scale * x * keep``
    with the scalar in fp32, so the result is bit-identical to ``where(keep, x * scale, 0)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, keep, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep.to(grad.dtype), value=ctx.scale), None, None


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with :func:`keep_mask` (training mode; CPU tensors)."""
    if p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
        return F.dropout(x, p, True)
    # the compiled one-pass kernel, while perf.cpu_kernels has it on
    from sftlab.perf import kernels

    if kernels.dropout_active() and kernels.supports(x):
        return kernels.dropout(x, p)
    return _ScaleByMask.apply(x, keep_mask(x.shape, p, x.dtype), 1.0 / (1.0 - p))


class FastDropout(torch.nn.Module):
    """``nn.Dropout`` with :func:`keep_mask` (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return fast_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module, attention_backend: bool = True) -> int:
    """Swap every ``nn.Dropout`` for :class:`FastDropout` and, where the model takes attention
    backends and uses SDPA, switch it to :func:`sftlab.perf.attention.attention`. Returns how
    many modules were swapped.

    The backend is registered with transformers here, when a model is switched, never on
    import. Idempotent: a model switched before (also one unpickled in a fresh process, whose
    backend is not registered there yet) gets the backend registered and nothing swapped.
    The swap draws no random numbers, so what happens before and after it is unchanged.
    """
    from sftlab.perf.attention import ATTENTION_NAME, register_attention

    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, child_name, FastDropout(child.p).train(child.training))
                swapped += 1
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) if config is not None else None
    if attention_backend and implementation == ATTENTION_NAME:
        register_attention()
    elif attention_backend and implementation == "sdpa" and getattr(model, "_supports_attention_backend", False):
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
    return swapped


class FastDropoutCallback(pl.Callback):
    """Switch ``pl_module.model`` to fast dropout (:func:`use_fast_dropout`) in ``setup``.

    Why ``setup``: Lightning calls it in every process that trains (a ``ddp_spawn`` child
    included, which so registers the attention backend itself) and before the strategy wraps
    the model in DDP or builds the optimizers. The swap draws no random numbers and adds no
    parameters, so a run is bit-identical to one whose model was switched when it was built.

    One difference from switching in ``TextClassifier.__init__`` (where this used to happen):
    the model is switched after the fine-tuning strategy's ``setup``, so dropout modules the
    strategy adds are switched too: LoRA's ``lora_dropout`` (peft) now draws its masks with
    :func:`keep_mask` instead of ``torch.bernoulli_``: the same statistics, other numbers.
    Every stage switches (idempotent), so ``validate``/``test`` run the same modules as ``fit``.
    """

    def __init__(self, attention_backend: bool = True) -> None:
        self.attention_backend = bool(attention_backend)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        use_fast_dropout(model if isinstance(model, torch.nn.Module) else pl_module,
                         attention_backend=self.attention_backend)
