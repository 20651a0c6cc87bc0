"""The frozen prefix of a model, computed once: the swap of its blocks and the per-example store.

:mod:`sftlab.perf.frozen_cache` (the callback) says why and when; this module holds the two
pieces that need no Trainer, so the tests can check them on a bare model:

- :class:`FrozenPrefix`: the blocks ``block.0 .. block.{k-1}`` of one model, swapped while
  installed: the lower ``k - 1`` blocks return their input unchanged, the top frozen block returns
  the batch's cached output (handed over with :meth:`FrozenPrefix.feed`). The model is called as
  usual: embeddings, attention masks, the trainable blocks, pooler and head all run their own
  code. :meth:`FrozenPrefix.compute` runs the real prefix (eval mode, no grad) and stops the
  forward right after block ``k - 1``;
- :class:`PrefixStore`: one split's prefix outputs, one unpadded ``[length, hidden]`` tensor
  per row (``idx``), gathered into a padded batch by the batch's own attention mask (so left
  and right padding both work), saved and loaded as one flat tensor.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: batch keys that are ours, not the model's (sftlab.model._META_KEYS, labels kept out too:
#: the prefix needs no loss)
_NOT_INPUTS = ("labels", "idx", "length")


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


def _identity(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A frozen block below the cached one: its input, unchanged (the cached output flows up)."""
    return args[0] if args else kwargs["hidden_states"]


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


class FrozenPrefix:
    """Blocks ``0 .. depth-1`` of ``model`` (``blocks``: its block ``ModuleList``), swappable.

    Installing sets an instance ``forward`` on each of those blocks; removing deletes it, so
    the class's own ``forward`` is back and nothing else of the model was touched (its
    ``state_dict``, checkpoints and ``save_pretrained`` never see the swap).
    """

    def __init__(self, model: torch.nn.Module, blocks: Sequence[torch.nn.Module], depth: int) -> None:
        if not 1 <= depth <= len(blocks):
            raise ValueError(f"depth {depth} outside 1..{len(blocks)}")
        self.model = model
        self.all_blocks = list(blocks)
        self.blocks = self.all_blocks[:depth]
        self.depth = depth
        self.installed = False
        self._next: torch.Tensor | None = None

    def install(self) -> None:
        for block in self.blocks[:-1]:
            block.forward = _identity
        self.blocks[-1].forward = self._cached
        self.installed = True

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.installed = False
        self._next = None

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """The real blocks for the duration (the swap comes back after, if it was on)."""
        was = self.installed
        self.remove()
        try:
            yield
        finally:
            if was:
                self.install()

    def feed(self, hidden: torch.Tensor) -> None:
        """The top frozen block's output for the next forward (used once)."""
        self._next = hidden

    def _cached(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden_in = _identity(*args, **kwargs)
        out, self._next = self._next, None
        if out is None:
            raise RuntimeError("frozen prefix cache: the model ran without its batch's cached hidden "
                               "states (FrozenPrefix.feed before each forward)")
        if out.shape != hidden_in.shape:
            raise RuntimeError(f"frozen prefix cache: cached hidden states {tuple(out.shape)} do not "
                               f"match the batch's {tuple(hidden_in.shape)}")
        return out.to(hidden_in.device)

    def compute(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The real output of block ``depth - 1`` for ``batch``: every module in eval mode (no
        dropout), no grad, the forward stopped after that block. Modes are restored after."""
        captured: dict[str, Any] = {}

        def capture(module, args, output):
            captured["out"] = output
            raise _Stop

        handle = self.blocks[-1].register_forward_hook(capture)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with self.live(), torch.no_grad(), contextlib.suppress(_Stop):
                self.model(**model_inputs(batch))
        finally:
            handle.remove()
            for module, training in modes:
                module.training = training
        out = captured.get("out")
        ids = batch["input_ids"]
        if not isinstance(out, torch.Tensor) or out.shape[:2] != ids.shape[:2]:
            raise NotImplementedError(
                f"{type(self.blocks[-1]).__name__} returns {type(out).__name__}, not the "
                "[batch, tokens, hidden] tensor the frozen prefix cache swaps in")
        return out


def attention_mask_of(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's real-token mask as bool [batch, tokens] (all real without a mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(batch["input_ids"].shape[:2], dtype=torch.bool, device=batch["input_ids"].device)
    return mask.bool()


class PrefixStore:
    """One split's prefix outputs: row ``idx`` -> its real tokens' hidden states [length, hidden].

    ``first_only``: each row keeps its first position only ([1, hidden]), for a prefix that is
    the whole body under a head that reads only that position (``head_only`` with BERT's pooler
    or a [CLS] head, right padding): the rest of the row is never read, and the store is
    ~length times smaller (AG News, MiniLM: ~50x). Gathered batches hold zeros elsewhere.
    """

    def __init__(self, rows: dict[int, torch.Tensor] | None = None, first_only: bool = False) -> None:
        self.rows: dict[int, torch.Tensor] = rows or {}
        self.first_only = bool(first_only)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, idx: object) -> bool:
        return idx in self.rows

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    def add(self, idx: Sequence[int], hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep each row's real tokens (``mask``), on the CPU; padding is never stored."""
        hidden, mask = hidden.detach().cpu(), mask.cpu()
        if self.first_only:
            if not bool(mask[:, 0].all()):
                raise RuntimeError("frozen prefix cache: a row's first position is padding (left "
                                   "padding?), so its first token cannot be kept alone")
            for i, row in enumerate(idx):
                self.rows[int(row)] = hidden[i, :1].clone()  # a copy: not a view of the batch
            return
        for i, row in enumerate(idx):
            self.rows[int(row)] = hidden[i][mask[i]]  # boolean indexing copies

    def missing(self, idx: Sequence[int]) -> list[int]:
        return [i for i in idx if int(i) not in self.rows]

    def gather(self, idx: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
        """The padded [batch, tokens, hidden] input of the first trainable block: each row's
        cached tokens where ``mask`` is true, zeros at padding (keys there are masked out, and
        no head reads them)."""
        mask = mask.cpu()
        rows = [self.rows[int(i)] for i in idx]
        lengths = [1] * len(rows) if self.first_only else mask.sum(1).tolist()
        if [r.shape[0] for r in rows] != lengths:
            raise RuntimeError("frozen prefix cache: a cached row's length differs from the batch's "
                               "(a stale cache? delete it under <paths.cache_dir>/frozen)")
        out = rows[0].new_zeros((*mask.shape, rows[0].shape[-1]))
        if self.first_only:
            out[:, 0] = torch.cat(rows)
        else:
            out[mask] = torch.cat(rows)
        return out

    def save(self, path: Path) -> None:
        """One flat tensor + the row lengths, published atomically (rows 0..n-1 must be there)."""
        n = len(self.rows)
        if sorted(self.rows) != list(range(n)):
            raise ValueError("only a complete split is saved")
        rows = [self.rows[i] for i in range(n)]
        state = {"hidden": torch.cat(rows), "lengths": torch.tensor([r.shape[0] for r in rows])}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a sweep run by another user
            os.replace(tmp, path)  # readers see all of it or nothing
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: Path, first_only: bool = False) -> PrefixStore:
        """Rows as views of the memory-mapped flat tensor (pages shared between processes)."""
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        rows = state["hidden"].split(state["lengths"].tolist())
        return cls(dict(enumerate(rows)), first_only=first_only)
