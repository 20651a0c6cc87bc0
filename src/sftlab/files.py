"""Writing files so that a reader never sees half of one.

A sweep report reads ``metrics.json`` files while other jobs are still writing theirs, and a
run killed mid-write must not leave a truncated file that ``resume=`` or the report then trusts.
Every small file sftlab writes goes through :func:`atomic_write_text`: a temp file next to the
target, then ``os.replace`` (atomic on POSIX and Windows). Checkpoints, which are streamed, use
the same idea in :mod:`sftlab.checkpointing`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """``data`` as indented, key-sorted JSON, atomically (numbers stay numbers, the rest str)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
