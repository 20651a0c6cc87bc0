"""sftlab: supervised fine-tuning of pretrained transformers, composed from Hydra configs.

The package import stays light (no torch, no transformers) so that composing or printing a
config is fast; heavy objects are imported where they are used. ``Classifier`` (the
deployment API) is loaded lazily on first access.
"""

from __future__ import annotations

from sftlab import resolvers as _resolvers  # noqa: F401  (registers the ${sftlab.*} resolvers)

__version__ = "0.1.0"
__all__ = ["Classifier", "__version__"]


def __getattr__(name: str):
    if name == "Classifier":
        from sftlab.deploy import Classifier

        return Classifier
    raise AttributeError(f"module 'sftlab' has no attribute {name!r}")
