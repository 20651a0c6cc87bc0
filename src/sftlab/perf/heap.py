"""glibc's heap policy during training (a callback): reuse big blocks, hand free pages back.

Moved out of :mod:`sftlab.callbacks` (the reliability callbacks): this one is about speed and
memory only, and changes no number a run computes.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl


class ReleaseFreeMemory(pl.Callback):
    """glibc's heap during training: keep big blocks for reuse, hand free pages back periodically.

    Why the first half (``keep_big_blocks``): glibc serves every request above its mmap
    threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``. The word
    embedding's dense gradient (30522 x 384 fp32 = 47 MB for MiniLM) and its zero-filled
    temporaries are such requests, made anew on every step, so every step page-faulted
    thousands of fresh pages that the kernel zeroed one by one. For the ``fit`` stage this
    callback sets ``M_MMAP_MAX=0`` (serve big blocks from the heap) and a high
    ``M_TRIM_THRESHOLD`` (do not shrink the heap top on every free), so the same pages are
    reused: no faults between trims, only the re-faulting after each trim (README
    "Performance" has the measurements). ``teardown`` restores ``M_MMAP_MAX`` and a 64 MiB
    trim threshold (twice the largest mmap threshold, where glibc's own adjustment settles),
    so code after ``fit`` in the same process (the HF arm of the throughput benchmark) runs
    with glibc's usual behaviour.

    Why the second half (``every_n_steps``, ``max_growth_mb``): batches of varying length
    allocate tensors of varying size, and the holes they leave in the heap are often too small
    for the next batch's tensors, so free but resident memory piles up step after step.
    ``malloc_trim(0)`` hands the free pages back every ``every_n_steps`` steps and after
    validation, and, if ``max_growth_mb`` is set, whenever the resident size has grown by that
    much since the last trim (read from ``/proc/self/statm``, a cheap read per step).

    The growth bound is off by default because trimming often is not free: pages handed back
    mid-cycle are soon needed again and re-faulted. On the default run it lowered the peak
    RSS but multiplied the page faults per step and slowed the loop. Set it where memory is
    the constraint.

    A no-op where the C library is not glibc (macOS, musl).
    """

    def __init__(self, every_n_steps: int = 50, keep_big_blocks: bool = True,
                 max_growth_mb: float | None = None) -> None:
        self.every_n_steps = int(every_n_steps)
        self.keep_big_blocks = bool(keep_big_blocks)
        self.max_growth_bytes = float(max_growth_mb) * 2**20 if max_growth_mb else None
        self._libc = _glibc()
        self._trim = self._libc.malloc_trim if self._libc is not None else None
        self._kept = False
        self._rss_after_trim: int | None = None

    def _release(self) -> None:
        if self._trim is not None:
            self._trim(0)
            self._rss_after_trim = _resident_bytes()

    def _grown_too_much(self) -> bool:
        if self.max_growth_bytes is None or self._trim is None:
            return False
        rss = _resident_bytes()
        if rss is None:
            return False
        if self._rss_after_trim is None:
            self._rss_after_trim = rss
        return rss - self._rss_after_trim > self.max_growth_bytes

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.keep_big_blocks and self._libc is not None and not self._kept:
            self._libc.mallopt(_M_MMAP_MAX, 0)
            self._libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # trimmed by _release instead
            self._kept = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()  # Lightning skips teardown hooks when fit raises

    def _restore(self) -> None:
        if self._kept:
            self._libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            self._libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
            self._kept = False
            self._release()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if (self.every_n_steps > 0 and (batch_idx + 1) % self.every_n_steps == 0) or self._grown_too_much():
            self._release()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()


# mallopt parameters (glibc malloc.h) and glibc's default for M_MMAP_MAX
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _DEFAULT_MMAP_MAX = -1, -4, 65536


def _resident_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _glibc():
    """The C library if it is glibc (has ``malloc_trim`` and ``mallopt``), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (AttributeError on other C libraries)
    except (OSError, AttributeError):
        return None
    return libc
