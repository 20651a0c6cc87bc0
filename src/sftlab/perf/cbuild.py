"""Compile a small C library on this machine, once, and cache it: used by the MKL shim and the kernels.

Why compile here rather than ship binaries: the sources are short, a binary built on the
machine matches its ABI and (``-march=native``) its vector units, and the repository stays
free of binaries. The library is cached under ``<cache_dir>/<subdir>/`` by a digest of the
source, the compiler flags and what they depend on (the CPU for ``-march=native``), written
atomically, so concurrent sweep jobs may build it at once and a cache dir shared between
machines never hands one CPU a binary built for another. Without a C compiler (``$CC``,
``cc``, ``gcc`` or ``clang``) or when compiling fails, the caller gets None and falls back.

This module must not import torch (the MKL shim is built before torch loads).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_last_error: dict[str, str] = {}


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``cc``, ``gcc`` or ``clang`` (None when none is there)."""
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def build(name: str, source: str, cache_dir: str | os.PathLike | None, flags: tuple[str, ...] = ("-O2",),
          key: str = "", subdir: str = "blas") -> Path | None:
    """The shared library ``name`` compiled from ``source`` with ``flags``, cached; None if it cannot be.

    ``key`` names whatever else the binary depends on (e.g. the CPU model and flags when
    ``flags`` has ``-march=native``); it goes into the cached file's digest with the source,
    the flags and the architecture. :func:`last_error` says why the last build failed.
    """
    root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "sftlab"
    digest = hashlib.sha1("\0".join((source, platform.machine(), *flags, key)).encode()).hexdigest()[:12]
    lib = root / subdir / f"{name}-{digest}.so"
    if lib.is_file():
        return lib
    cc = compiler()
    if cc is None:
        _last_error[name] = "no C compiler (cc, gcc or clang)"
        return None
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source, encoding="utf-8")
        done = subprocess.run([cc, "-shared", "-fPIC", *flags, "-o", str(out), str(src)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not out.is_file():
            _last_error[name] = f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
            log.debug("compiling %s failed: %s", name, done.stderr.strip())
            return None
        os.replace(out, lib)  # atomic
    return lib


def last_error(name: str) -> str:
    """Why the last :func:`build` of ``name`` returned None ('' if it did not)."""
    return _last_error.get(name, "")
