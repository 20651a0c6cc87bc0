"""Speed work, kept out of the core: each piece is reached from config (``conf/perf``) only.

- :mod:`sftlab.perf.dropout`: dropout masks from a quarter of the random numbers
  (``FastDropout``, ``use_fast_dropout``) and the callback that switches a model to them
  (``perf.fast_dropout``);
- :mod:`sftlab.perf.attention`: the attention backend with that dropout on the probabilities;
- :mod:`sftlab.perf.heap`: glibc's heap policy during ``fit`` (``perf.release_memory``);
- :mod:`sftlab.perf.precision`: ``trainer.precision=auto`` from a matmul calibration cached per
  machine (``perf.precision`` holds its options; the pipelines call ``resolve_precision``);
- :mod:`sftlab.perf.flops`: the model FLOPs of a training batch, for ``train_mfu``.
- :mod:`sftlab.perf.frozen_cache`: the frozen bottom of ``head_only``/``partial`` computed once
  per example and cached (``perf.frozen_cache``, switched by ``strategy.cache_frozen``), with
  its swap and store in :mod:`sftlab.perf.frozen_prefix`.

Importing any of it registers nothing anywhere; :func:`use_fast_dropout` registers the
attention backend when it switches a model. The backend function itself is
``sftlab.perf.attention.attention`` (not re-exported here: the name is its module's).
"""

from __future__ import annotations

from sftlab.perf.attention import ATTENTION_NAME, additive_mask, register_attention
from sftlab.perf.dropout import (
    FastDropout,
    FastDropoutCallback,
    fast_dropout,
    keep_mask,
    use_fast_dropout,
)
from sftlab.perf.flops import FlopCounter, step_flops
from sftlab.perf.frozen_cache import FrozenPrefixCache
from sftlab.perf.heap import ReleaseFreeMemory
from sftlab.perf.precision import Calibration, calibrate, choose_precision, resolve_precision

__all__ = [
    "ATTENTION_NAME",
    "Calibration",
    "FastDropout",
    "FastDropoutCallback",
    "FlopCounter",
    "FrozenPrefixCache",
    "ReleaseFreeMemory",
    "additive_mask",
    "calibrate",
    "choose_precision",
    "fast_dropout",
    "keep_mask",
    "register_attention",
    "resolve_precision",
    "step_flops",
    "use_fast_dropout",
]
