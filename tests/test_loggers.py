"""``logger=tensorboard``: built from the config when its package is there, one sentence when not.

``tensorboard`` is an optional extra (``sftlab[tensorboard]``); a run that asks for it without
the package must stop with the install hint before anything is loaded, not with Lightning's
``ModuleNotFoundError`` wrapped in Hydra's multi-line instantiation error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def installed(monkeypatch, **present: bool) -> None:
    """Make ``importlib.util.find_spec`` report each named module as installed or not."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name not in present:
            return real(name, *args, **kwargs)
        return importlib.util.spec_from_loader(name, loader=None) if present[name] else None

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("choice", ["tensorboard", "many"])
def test_tensorboard_missing_is_one_sentence_naming_the_extra(compose, monkeypatch, choice):
    from sftlab.config import instantiate_group
    from sftlab.errors import ConfigError
    from sftlab.loggers import TENSORBOARD_MISSING

    cfg = compose(f"logger={choice}")
    installed(monkeypatch, tensorboard=False, tensorboardX=False)
    with pytest.raises(ConfigError) as info:
        instantiate_group(cfg.logger)
    assert str(info.value) == TENSORBOARD_MISSING
    assert "pip install 'sftlab[tensorboard]'" in TENSORBOARD_MISSING


@pytest.mark.parametrize("writer", ["tensorboard", "tensorboardX"])
def test_tensorboard_logger_is_built_from_the_config_when_a_writer_is_installed(
        compose, monkeypatch, tmp_path, writer):
    """With tensorboard (or only tensorboardX, which Lightning's logger also writes with) the
    config builds Lightning's logger in <run dir>/tensorboard."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from sftlab.config import instantiate_group

    run = tmp_path / "run"
    cfg = compose("logger=tensorboard", out=run)
    installed(monkeypatch, tensorboard=writer == "tensorboard", tensorboardX=writer == "tensorboardX")
    [lg] = instantiate_group(cfg.logger)
    assert isinstance(lg, TensorBoardLogger)
    assert Path(lg.log_dir) == run / "tensorboard"


def test_tensorboard_logger_writes_event_files(compose, tmp_path):
    """The built logger really writes: a logged metric lands in an events file of the run dir."""
    pytest.importorskip("tensorboard")
    from sftlab.config import instantiate_group

    run = tmp_path / "run"
    [lg] = instantiate_group(compose("logger=tensorboard", out=run).logger)
    lg.log_metrics({"val/acc": 0.75}, step=3)
    lg.finalize("success")
    [events] = (run / "tensorboard").glob("events.out.tfevents.*")
    assert b"val/acc" in events.read_bytes()
