"""Fine-tuning strategies: which parts of the model train, at which learning rate, and when.

One small class per recipe, each instantiated by Hydra from ``conf/strategy/<name>.yaml``
(``_target_: sftlab.strategies.<Class>``). They all speak about the parts of
:mod:`sftlab.layers` (embeddings, ``block.i``, pooler, head), so one class serves every
architecture.

- :mod:`~sftlab.strategies.base`: the :class:`Strategy` contract (``stage`` / ``select``), the
  layer map built once in ``setup``, the per-part LR scale ``lr_decay ** depth``, the parts table;
- :mod:`~sftlab.strategies.basic`: :class:`Full`, :class:`Discriminative`, :class:`HeadOnly`,
  :class:`Partial`, :class:`BitFit`;
- :mod:`~sftlab.strategies.lora`: :class:`Lora` and its default targets ``LORA_TARGETS``;
- :mod:`~sftlab.strategies.gradual`: :class:`Gradual` and its :class:`GradualUnfreezing` callback.

The optimizer is built from a strategy by :func:`sftlab.optim.build_optimizer`.
"""

from sftlab.strategies.base import Named, Strategy
from sftlab.strategies.basic import BitFit, Discriminative, Full, HeadOnly, Partial
from sftlab.strategies.gradual import Gradual, GradualUnfreezing
from sftlab.strategies.lora import LORA_TARGETS, Lora

__all__ = [
    "LORA_TARGETS",
    "BitFit",
    "Discriminative",
    "Full",
    "Gradual",
    "GradualUnfreezing",
    "HeadOnly",
    "Lora",
    "Named",
    "Partial",
    "Strategy",
]
