"""Speed work, kept out of the core: each piece is reached from config (``conf/perf``) only.

- :mod:`sftlab.perf.dropout`: dropout masks from a quarter of the random numbers
  (``FastDropout``, ``use_fast_dropout``) and the callback that switches a model to them
  (``perf.fast_dropout``);
- :mod:`sftlab.perf.attention`: the attention backend with that dropout on the probabilities;
- :mod:`sftlab.perf.heap`: glibc's heap policy during ``fit`` (``perf.release_memory``);
- :mod:`sftlab.perf.precision`: ``trainer.precision=auto`` from a matmul calibration cached per
  machine (``perf.precision`` holds its options; the pipelines call ``resolve_precision``);
- :mod:`sftlab.perf.flops`: the model FLOPs of a training batch, for ``train_mfu``.
- :mod:`sftlab.perf.blas`: oneMKL's fast matmul path on AMD and other non-Intel x86 CPUs
  (``perf.mkl_fast_path``), set up before torch is imported;
- :mod:`sftlab.perf.last_block`: the last block computes only the first token when the head
  reads only that (``perf.last_block_cls_only``);
- :mod:`sftlab.perf.embedding_grad`: the word-embedding gradient in one kept buffer, only the
  rows a batch touched written, reset and clipped (``perf.embedding_grad_rows``);
- :mod:`sftlab.perf.kernels`: compiled one-pass CPU kernels for dropout and GELU
  (``perf.cpu_kernels``), built on the machine by :mod:`sftlab.perf.cbuild`;
- :mod:`sftlab.perf.frozen_cache`: the frozen bottom of ``head_only``/``partial`` computed once
  per example and cached (``perf.frozen_cache``, switched by ``strategy.cache_frozen``), with
  its swap and store in :mod:`sftlab.perf.frozen_prefix`.

Importing the package imports nothing heavy (names load on first use); importing any of it
registers nothing anywhere; :func:`use_fast_dropout` registers the
attention backend when it switches a model. The backend function itself is
``sftlab.perf.attention.attention`` (not re-exported here: the name is its module's).
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it. Imported on first use (PEP 562), so that
#: ``sftlab.perf.blas`` can act before torch is imported and composing a config stays torch-free
_WHERE = {
    "ATTENTION_NAME": "attention", "additive_mask": "attention", "register_attention": "attention",
    "FastDropout": "dropout", "FastDropoutCallback": "dropout", "fast_dropout": "dropout",
    "keep_mask": "dropout", "use_fast_dropout": "dropout",
    "FlopCounter": "flops", "step_flops": "flops",
    "FrozenPrefixCache": "frozen_cache",
    "ReleaseFreeMemory": "heap",
    "LastBlockClsOnly": "last_block",
    "EmbeddingGradRows": "embedding_grad",
    "CpuKernels": "kernels",
    "Calibration": "precision", "calibrate": "precision", "choose_precision": "precision",
    "resolve_precision": "precision",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
