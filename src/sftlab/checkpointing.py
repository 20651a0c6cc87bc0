"""Checkpoints that survive a kill: atomic writes, and the RNG states an exact resume needs.

Why our own ``CheckpointIO``: Lightning's ``TorchCheckpointIO`` serializes the whole checkpoint
into memory and writes it through an fsspec "transaction", which for local paths stages the
bytes in the *system* temp dir and then ``shutil.move``s them into place. When /tmp is another
file system (a tmpfs, a container overlay) that move is a copy into the final name: a kill
during it leaves a truncated ``last.ckpt`` that the next resume picks up, and nothing is
fsynced. :class:`AtomicCheckpointIO` streams ``torch.save`` into a hidden temp file *next to*
the target, fsyncs it, and ``os.replace``s it over the target: a reader (or a resume) sees the
old checkpoint or the new one, never half of one. A kill mid-save leaves only the hidden
``.<name>.<pid>.tmp`` file, which :func:`remove_partial_checkpoints` deletes on resume.

Why RNG states: Lightning checkpoints restore weights, optimizer, scheduler and loop progress,
but not the random number generators, so dropout after a mid-epoch resume draws different
masks than the uninterrupted run would have. :func:`rng_state` / :func:`set_rng_state` capture
and restore them as plain lists and tensors, so the checkpoint still loads with
``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".tmp"


def partial_path(path: Path) -> Path:
    """The hidden temp file a save writes first (``.<name>.<pid>.tmp``; no ``*.ckpt`` glob sees it)."""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temp file + fsync + ``os.replace``).

    Remote paths (``s3://`` ...) keep Lightning's own writer: object stores publish an object
    only when its upload completes, which is atomic already.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        from fsspec.implementations.local import LocalFileSystem

        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(path)
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # the rename itself survives a power cut

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` unless the caller asks otherwise: a checkpoint is data,
        and unpickling arbitrary objects from a file someone handed you runs their code."""
        return super().load_checkpoint(
            path, map_location=map_location or (lambda storage, loc: storage),
            weights_only=True if weights_only is None else weights_only,
        )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def remove_partial_checkpoints(dirpath: str | os.PathLike) -> list[Path]:
    """Delete the temp files of saves that a kill interrupted; return what was removed."""
    d = Path(dirpath)
    if not d.is_dir():
        return []
    removed = []
    for p in d.glob(f".*{PARTIAL_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("Removed %d partial checkpoint file(s) left by an interrupted save in %s", len(removed), d)
    return removed


# ----------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every generator training draws from, as ``weights_only``-loadable values."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when both sides have it)."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_lists(v) for v in value]
    return value


class RNGState(pl.Callback):
    """Save the random generators in every checkpoint; restore them when training resumes.

    Restored in ``on_train_start``, not when the checkpoint is read: between the two, Lightning
    builds the model and may run the sanity check, and only the state at the first training
    step matters. Everything that draws from the global generators between a save and the next
    training step must then also happen after ``on_train_start`` on resume; our loaders draw
    their worker seeds from their own generator (``sftlab.data``) for that reason.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict or None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None
