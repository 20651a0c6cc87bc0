"""Speed work, kept out of the core: each piece is reached from config (``conf/perf``) only.

- :mod:`sftlab.perf.dropout`: dropout masks from a quarter of the random numbers
  (``FastDropout``, ``use_fast_dropout``) and the callback that switches a model to them
  (``perf.fast_dropout``);
- :mod:`sftlab.perf.attention`: the attention backend with that dropout on the probabilities;
- :mod:`sftlab.perf.heap`: glibc's heap policy during ``fit`` (``perf.release_memory``);
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
from sftlab.perf.frozen_cache import FrozenPrefixCache
from sftlab.perf.heap import ReleaseFreeMemory

__all__ = [
    "ATTENTION_NAME",
    "FastDropout",
    "FastDropoutCallback",
    "FrozenPrefixCache",
    "ReleaseFreeMemory",
    "additive_mask",
    "fast_dropout",
    "keep_mask",
    "register_attention",
    "use_fast_dropout",
]
