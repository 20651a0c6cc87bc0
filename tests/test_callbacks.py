"""Callbacks: the throughput clock counts training only (what the HF Trainer's
train_samples_per_second counts with evaluation and saving off); freed memory goes back to
the OS on schedule."""

from __future__ import annotations

import types

import torch

from sftlab import callbacks
from sftlab.perf import heap


def test_train_time_excludes_validation_and_the_checkpointing_after_it(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    trainer = types.SimpleNamespace(training=True, world_size=2)
    batch = {"labels": torch.zeros(4)}
    c = callbacks.TrainThroughput()

    def tick(seconds: float) -> None:
        now[0] += seconds

    def train_batch(seconds: float, idx: int) -> None:
        c.on_train_batch_start(trainer, None, batch, idx)
        tick(seconds)
        c.on_train_batch_end(trainer, None, None, batch, idx)

    c.on_fit_start(trainer, None)
    tick(5.0)  # model setup, before training: not counted
    c.on_train_start(trainer, None)
    c.on_train_epoch_start(trainer, None)
    train_batch(1.0, 0)
    c.on_validation_start(trainer, None)  # mid-epoch validation (val_check_interval < 1)
    tick(10.0)
    c.on_validation_end(trainer, None)
    tick(7.0)  # ModelCheckpoint writes best/last after validation
    train_batch(2.0, 1)
    c.on_validation_start(trainer, None)  # epoch-end validation, then the epoch-end hook
    tick(10.0)
    c.on_validation_end(trainer, None)
    tick(7.0)
    c.on_train_epoch_end(trainer, None)
    c.on_train_epoch_start(trainer, None)
    train_batch(3.0, 0)
    c.on_train_epoch_end(trainer, None)  # an epoch without validation

    assert c.train_time_s == 6.0
    assert c.samples == 3 * 4 * 2  # every rank's examples
    assert c.samples_per_s == 4.0
    assert c.first_step_s == 6.0


class FakeLibc:
    """Records what the callback asks of glibc, in order."""

    def __init__(self):
        self.calls = []

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1


def test_release_free_memory_trims_every_n_steps_and_after_validation(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    c = heap.ReleaseFreeMemory(every_n_steps=3, max_growth_mb=None)
    trim = ("malloc_trim", 0)
    for i in range(7):
        c.on_train_batch_end(None, None, None, None, i)
        assert fake.calls == [trim] * ((i + 1) // 3), i  # after batches 3 and 6 only
    c.on_validation_end(None, None)
    assert fake.calls == [trim] * 3
    fake.calls.clear()
    c.on_validation_end(None, None)  # every validation, not only once
    assert fake.calls == [trim]
    off = heap.ReleaseFreeMemory(every_n_steps=0, max_growth_mb=None)
    fake.calls.clear()
    for i in range(100):
        off.on_train_batch_end(None, None, None, None, i)
    assert fake.calls == []  # every_n_steps=0: no periodic trim


def test_release_free_memory_sets_and_restores_the_heap_policy(monkeypatch):
    """fit: no mmap for big blocks and no trim on free; afterwards glibc's values and one trim."""
    fake = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    keep = [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]  # M_MMAP_MAX, M_TRIM_THRESHOLD
    restore = [("mallopt", -4, 65536), ("mallopt", -1, 64 * 2**20), ("malloc_trim", 0)]
    c = heap.ReleaseFreeMemory(every_n_steps=0)
    c.setup(None, None, "validate")
    c.setup(None, None, "test")
    assert fake.calls == []  # only fit changes the policy
    c.setup(None, None, "fit")
    c.setup(None, None, "fit")  # twice: set once
    assert fake.calls == keep
    c.teardown(None, None, "validate")
    assert fake.calls == keep  # only the end of fit restores
    c.teardown(None, None, "fit")
    assert fake.calls == keep + restore
    c.teardown(None, None, "fit")
    assert fake.calls == keep + restore  # restored once
    fake.calls.clear()
    c.setup(None, None, "fit")
    c.on_exception(None, None, RuntimeError("boom"))  # Lightning skips teardown when fit raises
    assert fake.calls == keep + restore
    fake.calls.clear()
    heap.ReleaseFreeMemory(keep_big_blocks=False).setup(None, None, "fit")
    assert fake.calls == []


def test_release_free_memory_hands_free_heap_pages_back_to_the_os():
    """The real trim: 64 MiB freed in small blocks stays resident under the fit policy (no trim
    on free) until the callback's trim after validation hands it back."""
    import ctypes

    c = heap.ReleaseFreeMemory(every_n_steps=0)
    assert c._libc is not None  # glibc here (Linux CI)
    libc = c._libc
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    c.setup(None, None, "fit")
    try:
        blocks = [libc.malloc(64 * 2**10) for _ in range(1024)]  # below the mmap threshold: heap
        for b in blocks:
            ctypes.memset(b, 1, 64 * 2**10)
        for b in blocks:
            libc.free(b)
        before = heap._resident_bytes()
        c.on_validation_end(None, None)
        after = heap._resident_bytes()
    finally:
        c.teardown(None, None, "fit")
    assert before - after > 48 * 2**20, (before, after)


def test_release_free_memory_trims_when_resident_memory_grew(monkeypatch):
    """The growth bound: a trim as soon as RSS is max_growth_mb above what the last trim left."""
    real_reading = heap._resident_bytes()
    assert 0 < real_reading < 64 * 2**30  # Linux: /proc/self/statm
    rss = {"now": 1000 * 2**20}
    monkeypatch.setattr(heap, "_resident_bytes", lambda: rss["now"])
    c = heap.ReleaseFreeMemory(every_n_steps=0, max_growth_mb=100)
    calls = []

    def trim(pad):  # the trim hands 60 MiB back
        calls.append(pad)
        rss["now"] -= 60 * 2**20

    c._trim = trim
    c.on_train_batch_end(None, None, None, None, 0)  # the first reading is the baseline
    rss["now"] += 90 * 2**20
    c.on_train_batch_end(None, None, None, None, 1)
    assert calls == []
    rss["now"] += 20 * 2**20  # 110 MiB above the baseline
    c.on_train_batch_end(None, None, None, None, 2)
    assert calls == [0]  # the new baseline is what the trim left: 1050 MiB
    rss["now"] += 99 * 2**20
    c.on_train_batch_end(None, None, None, None, 3)
    assert calls == [0]
    rss["now"] += 2 * 2**20
    c.on_train_batch_end(None, None, None, None, 4)
    assert calls == [0, 0]
    off = heap.ReleaseFreeMemory(every_n_steps=0, max_growth_mb=None)
    off._trim = calls.append
    rss["now"] += 10**12
    off.on_train_batch_end(None, None, None, None, 0)
    assert calls == [0, 0]  # no growth bound configured: no trim


def _faults_touching_a_fresh_block(libc, nbytes: int = 64 * 2**20) -> int:
    """Page faults of writing a malloc'd block whose twin was just freed (the per-step pattern)."""
    import ctypes
    import resource

    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(nbytes)  # written and freed once, as the previous step does
    ctypes.memset(block, 1, nbytes)
    libc.free(block)
    block = libc.malloc(nbytes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, nbytes)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults


def test_release_free_memory_keeps_big_blocks_for_fit_only():
    """During fit a freed 64 MB block is reused without page faults; before and after, glibc
    maps it afresh (16k faults): the policy is scoped to training, also when fit raises."""
    c = heap.ReleaseFreeMemory(every_n_steps=0)
    libc = c._libc
    pages = 64 * 2**20 // 4096
    assert _faults_touching_a_fresh_block(libc) > pages // 2
    c.setup(None, None, "fit")
    assert _faults_touching_a_fresh_block(libc) < pages // 20
    c.teardown(None, None, "fit")
    assert _faults_touching_a_fresh_block(libc) > pages // 2
    c.setup(None, None, "validate")  # only fit changes the policy
    assert _faults_touching_a_fresh_block(libc) > pages // 2
    c.setup(None, None, "fit")
    c.on_exception(None, None, RuntimeError("boom"))
    assert _faults_touching_a_fresh_block(libc) > pages // 2
    off = heap.ReleaseFreeMemory(keep_big_blocks=False)
    off.setup(None, None, "fit")
    assert _faults_touching_a_fresh_block(libc) > pages // 2
