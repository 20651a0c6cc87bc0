"""Model FLOPs of a training step, counted from the model's matmuls and the batch: MFU's numerator.

Model FLOPs utilisation (MFU) is the work the model *needs* per second over what the hardware
can do; a fixed count per example makes it comparable across machines, precisions and
frameworks, where samples/s is not. What is counted, per training batch (``N`` = the
``in × out`` entries of one matmul weight, ``nn.Linear`` and GPT-2's ``Conv1D``):

- forward: ``2·N`` per row through every matmul weight;
- backward, only where gradients flow (frozen weights get no weight gradient, and no input
  gradient is needed below the lowest trainable parameter): ``2·N`` for the weight gradient
  where the weight trains, ``2·N`` for the input gradient where any trainable parameter lies
  below it. A full fine-tune is the usual ``6·N`` per token; ``head_only`` is ``2·N`` per
  token plus the head's weight gradient;
- rows: every **real (non-pad) token** for the blocks' weights (padding is work the model
  does not need, so length-grouped batches show up as a higher MFU), one row per sequence
  for the pooler's and head's (they read one position; GPT-2's ``score`` reads every position,
  so there the head's few FLOPs per token are missed), every real token for a token
  classifier's head (``head_per_token``);
- attention, per block: ``4·H·len²`` per sequence forward (scores ``QKᵀ`` and ``softmax·V``,
  ``H`` = the hidden size, ``len`` = the sequence's real length) and ``8·H·len²`` backward
  where gradients flow into the block;
- a last block that computes the first token only (:mod:`sftlab.perf.last_block`): its key and
  value projections per real token, its other matmuls one row per sequence, its attention
  ``4·H·len`` forward (one query row) and ``8·H·len`` backward. The skipped rows are work the
  classifier does not need; counting them would credit the skip as achieved FLOP/s.

"Below" is the order in which parameters are registered (embeddings, blocks, pooler, head,
and inside a block its modules in order), which is the forward order of the transformers
models the layer map knows; query, key and value projections are siblings reading the same
input, so none of them needs an input gradient for another's sake. Not counted: embeddings
(a lookup), norms, activations, softmax, the loss and the optimizer (no matmuls, or tiny).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# module names of projections that read the same input as their siblings (q/k/v)
_PARALLEL = frozenset({"query", "key", "value", "q_lin", "k_lin", "v_lin", "q_proj", "k_proj", "v_proj",
                       "query_proj", "key_proj", "value_proj"})
# of those, the projections a first-token-only block still computes for every token
_KEY_VALUE = frozenset({"key", "value", "k_lin", "v_lin", "k_proj", "v_proj", "key_proj", "value_proj"})


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per unit of a batch: per real token, per sequence, per ``len²`` summed over rows."""

    per_token: int
    per_sequence: int
    per_len_sq: int

    def batch(self, tokens: int, sequences: int, len_sq: int) -> int:
        return self.per_token * tokens + self.per_sequence * sequences + self.per_len_sq * len_sq


def _matmul_weights(model) -> dict[int, str]:
    """id(weight) -> the dotted path of its module, for every ``Linear``/``Conv1D`` weight."""
    import torch.nn as nn

    out = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            out.setdefault(id(weight), path)
    return out


def _group(path: str) -> str:
    """Siblings reading one input share a group: ``...attention.self`` for ``...self.query``."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _PARALLEL:
            return ".".join(parts[:i])
    return path


def step_flops(model, layer_map=None, head_per_token: bool = False, cached_blocks: int = 0,
               first_token_last_block: bool = False) -> StepFlops:
    """The per-token, per-sequence and attention FLOP coefficients of one training step now.

    ``cached_blocks``: the bottom blocks whose outputs come from the frozen-prefix cache
    (:mod:`sftlab.perf.frozen_cache`); they do not run, so they count nothing. Counting them
    would credit the cache's saved work as achieved FLOP/s and inflate ``train_mfu``.
    ``first_token_last_block``: the top block computes the first token only, apart from its
    keys and values (:mod:`sftlab.perf.last_block`), counted as the module docstring says.

    Depends on which parameters require grad, so it is recomputed when that changes
    (gradual unfreezing). ``layer_map`` defaults to :func:`sftlab.layers.build_layer_map`; a
    model it cannot map is counted as one part (every matmul per token, no attention term).
    """
    from sftlab.layers import BLOCK, HEAD, POOLER, build_layer_map

    if layer_map is None:
        try:
            layer_map = build_layer_map(model)
        except Exception:  # noqa: BLE001  (an unmappable model still gets a count)
            layer_map = None
    parts = ([(p.kind, p.index, p.params) for p in layer_map
              if not (p.kind == BLOCK and p.index is not None and p.index < cached_blocks)]
             if layer_map is not None else [(BLOCK, None, list(model.named_parameters()))])
    top = max((i for kind, i, _ in parts if kind == BLOCK and i is not None), default=None)
    matmuls = _matmul_weights(model)
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    per_token = per_sequence = per_len_sq = 0
    seen = False  # a trainable parameter lies below (registered earlier)
    group_seen: dict[str, bool] = {}  # "seen" when a sibling group began
    for kind, index, params in parts:
        part_flows = seen or any(p.requires_grad for _, p in params)
        first_only = first_token_last_block and kind == BLOCK and index is not None and index == top
        if kind == BLOCK and layer_map is not None:
            attention = 4 * hidden + (8 * hidden if part_flows else 0)
            if first_only:  # one query row: len instead of len² per sequence
                per_token += attention
            else:
                per_len_sq += attention
        for _, p in params:
            path = matmuls.get(id(p))
            if path is not None:
                below = group_seen.setdefault(_group(path), seen)
                n = p.numel()
                flops = 2 * n + (2 * n if p.requires_grad else 0) + (2 * n if below else 0)
                one_row = first_only and not _KEY_VALUE.intersection(path.split("."))
                if kind == POOLER or (kind == HEAD and not head_per_token) or one_row:
                    per_sequence += flops
                else:
                    per_token += flops
            seen = seen or p.requires_grad
    return StepFlops(per_token, per_sequence, per_len_sq)


def batch_shape(batch: Any) -> tuple[int, int, int]:
    """(real tokens, sequences, sum of squared real lengths) of a tokenized batch."""
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if mask is None:
        ids = batch["input_ids"]
        rows, length = int(ids.shape[0]), int(ids.shape[-1])
        return rows * length, rows, rows * length * length
    lengths = mask.sum(-1)
    return int(lengths.sum()), int(mask.shape[0]), int((lengths * lengths).sum())


class FlopCounter:
    """Counts the model FLOPs of training batches, following changes of what trains."""

    def __init__(self) -> None:
        self.flops = 0
        self._key: tuple | None = None
        self._coef: StepFlops | None = None
        self._params: list = []

    def add(self, model, batch: Any, head_per_token: bool = False, cached_blocks: int = 0,
            first_token_last_block: bool = False) -> int:
        """Count one training batch of ``model``; return its FLOPs (0 without model or tokens)."""
        if model is None or not hasattr(batch, "get") or batch.get("input_ids") is None:
            return 0
        if not self._params:
            self._params = [p for _, p in model.named_parameters()]
        key = (*(p.requires_grad for p in self._params), cached_blocks, first_token_last_block)
        if key != self._key:
            self._key, self._coef = key, step_flops(model, head_per_token=head_per_token,
                                                    cached_blocks=cached_blocks,
                                                    first_token_last_block=first_token_last_block)
        flops = self._coef.batch(*batch_shape(batch))
        self.flops += flops
        return flops
