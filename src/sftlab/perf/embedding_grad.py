"""The word-embedding gradient in one kept buffer, touched rows only: ``perf.embedding_grad_rows``.

Why: a batch touches a few hundred of the word embedding's rows (MiniLM: 30,522 rows x 384,
47 MB, half the model's parameters), but autograd's embedding backward allocates and zero-fills
a whole new gradient every step, and gradient clipping then reads (norm) and writes (scale)
all of it. On a 2-core CPU that is ~10 ms of zero-fill plus ~5 ms of clipping per ~500 ms step.
Here the backward adds the batch's rows into one gradient buffer kept for the whole fit
(``index_add_``, the same per-row additions in the same order as ``embedding_dense_backward``:
the gradient is bit-identical, a test checks it) and remembers which rows it touched; the next
step zeroes just those rows before adding. :func:`clip_grad_norm_` (sftlab's clipping calls it)
computes that parameter's norm and scales it over the touched rows only: the same norm as over
the whole tensor, since the other rows are zero (summed in another order: equal to torch's up to
float rounding), and the same scaled gradient. The optimizer still sees the full dense gradient
(AdamW updates every row: the moments of untouched rows decay), so training is unchanged.

Where: CPU, one process (DDP's gradient hooks expect autograd to accumulate), a trainable
``nn.Embedding`` as the model's input embedding, not tied to an output layer (a tied weight
gets a second, dense gradient). Off, with the reason logged, elsewhere. On CUDA a zero-fill is
cheap, so it stays off there.

The buffer's rows outside the touched set must stay zero. Everything sftlab runs keeps that
(clipping, GradScaler's unscale, the optimizers read or scale the gradient); a callback that
writes every row of a gradient (gradient noise) needs ``perf.embedding_grad_rows.enable=false``.
Every 50 resets the buffer is checked: rows written outside the set switch this off with a warning.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)

#: resets between two checks that the buffer is zero outside the touched rows
CHECK_EVERY = 50

#: parameter -> its _Rows, for :func:`clip_grad_norm_` (weak, by identity: a dropped model leaves
#: no entry, and tensors compare by value, so a plain WeakKeyDictionary cannot hold them)
_ROWS = WeakIdKeyDictionary()


class _Rows:
    """The kept gradient buffer of one embedding weight and the rows written since its reset."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # sorted unique row ids written since the reset
        self.resets = 0
        self.broken: str | None = None  # set when the buffer was found written outside the rows

    def live(self, weight: torch.Tensor) -> bool:
        """Whether ``weight.grad`` is this buffer with its touched rows known."""
        return self.broken is None and self.buffer is not None and weight.grad is self.buffer

    def add(self, weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, padding_idx: int | None) -> None:
        if weight.grad is None:  # a new step (zero_grad set it to None): reset the rows written last
            if self.buffer is None:
                self.buffer = torch.zeros_like(weight)
            elif self.rows is not None:
                self.buffer.index_fill_(0, self.rows, 0)
                self.resets += 1
                if self.resets % CHECK_EVERY == 0 and bool(self.buffer.any()):
                    self.broken = ("the embedding gradient was written outside the rows the batch "
                                   "touched (a callback that writes every gradient row?)")
                    log.warning("perf.embedding_grad_rows: %s; switched off for the rest of the fit.",
                                self.broken)
                    self.buffer.zero_()
            self.rows = None
            weight.grad = self.buffer
        elif weight.grad is not self.buffer:  # someone else's gradient: add to it, track nothing
            self.rows = None
            if padding_idx is not None:
                keep = ids != padding_idx
                ids, grad = ids[keep], grad[keep]
            weight.grad.index_add_(0, ids, grad)
            return
        # gradient accumulation (grad is the buffer, not reset) or a new step: add the batch's rows
        self.buffer.index_add_(0, ids, grad)
        if padding_idx is not None:  # embedding_dense_backward skips it: its row gets nothing
            self.buffer[padding_idx].zero_()
        touched = torch.unique(ids)
        self.rows = touched if self.rows is None else torch.unique(torch.cat([self.rows, touched]))


class _EmbeddingIntoBuffer(torch.autograd.Function):
    """``F.embedding`` whose backward adds into the kept buffer instead of returning a gradient."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, state: _Rows):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.state, ctx.weight = padding_idx, state, weight
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        grad = grad.reshape(-1, grad.shape[-1])
        if grad.dtype != weight.dtype:  # not seen (an fp32 embedding gets an fp32 gradient even
            grad = grad.to(weight.dtype)  # under autocast); summed in fp32 here, up to rounding
        ctx.state.add(weight, ids.reshape(-1), grad, ctx.padding_idx)
        return None, None, None, None


def _forward(module: torch.nn.Embedding, state: _Rows, ids: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    # fp32 weights only: the stock backward of a bf16/fp16 embedding may accumulate in fp32
    if (state.broken is None and torch.is_grad_enabled() and weight.requires_grad
            and weight.device.type == "cpu" and weight.dtype == torch.float32):
        return _EmbeddingIntoBuffer.apply(ids, weight, module.padding_idx, state)
    return type(module).forward(module, ids)


def unsupported(model: torch.nn.Module, world_size: int, device_type: str) -> str | None:
    """Why the kept buffer does not apply to this model and run, or None when it does."""
    if device_type != "cpu":
        return f"a {device_type} run (zero-filling a gradient is cheap there)"
    if world_size > 1:
        return "more than one process (DDP's gradient hooks expect autograd to accumulate)"
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if type(emb) is not torch.nn.Embedding:
        return "the input embedding is not a plain nn.Embedding"
    if emb.sparse or emb.scale_grad_by_freq or emb.max_norm is not None:
        return "the embedding has sparse / scale_grad_by_freq / max_norm set"
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return "the input embedding is tied to an output layer"
    return None


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) that reads a kept embedding buffer's touched rows only.

    The same steps as torch's (per-parameter norms, their norm, ``clamp(max_norm / (total +
    1e-6), max=1)``, one multiply per gradient); for a parameter whose gradient is a live kept
    buffer the norm and the multiply run over its touched rows. Without such a parameter it
    is torch's function.
    """
    params = [p for p in parameters if p.grad is not None]
    rows = {}
    for p in params:
        state = _ROWS.get(p)
        if state is not None and state.live(p) and state.rows is not None:
            rows[id(p)] = state.rows
    if not rows:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.linalg.vector_norm(p.grad.index_select(0, rows[id(p)]) if id(p) in rows else p.grad)
             for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if id(p) in rows:
            r = rows[id(p)]
            p.grad.index_copy_(0, r, p.grad.index_select(0, r).mul_(coef))
        else:
            p.grad.mul_(coef)
    return total


class EmbeddingGradRows(pl.Callback):
    """Switch the input embedding to the kept gradient buffer during ``fit`` (module docstring)."""

    def __init__(self) -> None:
        self.module: torch.nn.Embedding | None = None
        self.used = False
        self._said = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.module is not None:
            return
        model = getattr(pl_module, "model", pl_module)
        why = unsupported(model, trainer.world_size, trainer.strategy.root_device.type)
        if why is not None:
            if not self._said:
                log.info("embedding gradient in a kept buffer: off (%s)", why)
                self._said = True
            return
        emb = model.get_input_embeddings()
        state = _Rows()
        emb.forward = functools.partial(_forward, emb, state)
        _ROWS[emb.weight] = state
        self.module = emb
        if not self._said:
            log.info("embedding gradient in a kept buffer: on%s (the batch's rows are added, reset and "
                     "clipped; the optimizer sees the whole gradient)",
                     "" if emb.weight.requires_grad else " whenever the embedding trains (frozen now)")
            self._said = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.module is None:
            return
        emb, self.module = self.module, None
        emb.__dict__.pop("forward", None)
        state = _ROWS.pop(emb.weight, None)
        self.used = self.used or (state is not None and state.buffer is not None)  # it ran (metrics.json)
        if state is not None and emb.weight.grad is state.buffer:
            emb.weight.grad = None  # not left holding a buffer the next fit would not know

    def run_stats(self) -> dict[str, Any]:
        """``embedding_grad_rows``: whether a backward went through the kept buffer in this fit."""
        return {"embedding_grad_rows": self.used}
