"""Deployment: an exported model folder, its card, and the ways to predict with it.

``export.py`` writes the folder (a plain Hugging Face model plus config, metrics and card),
``card.py`` builds the card, ``predictor.py`` holds :class:`Classifier` (the Python API;
:class:`EntityTagger` for NER),
``predict.py`` and ``serve.py`` are the command line and the HTTP service around it. None of
this imports Lightning: a deployed model needs torch and transformers only.
"""

from __future__ import annotations

from sftlab.deploy.card import model_card
from sftlab.deploy.export import export_model, resolve_model_dir
from sftlab.deploy.predictor import Classifier, EntityTagger

__all__ = ["Classifier", "EntityTagger", "export_model", "model_card", "resolve_model_dir"]
