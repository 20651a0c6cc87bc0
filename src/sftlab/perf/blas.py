"""oneMKL's fast matmul path on AMD (and other non-Intel x86) CPUs: ``perf.mkl_fast_path``.

Why: PyTorch's x86 wheels run fp32 matmuls (``addmm``, ``mm``, ``bmm``: about two thirds of a
CPU training step) in Intel oneMKL, linked into ``libtorch_cpu.so``. MKL picks its kernels
after asking ``mkl_serv_intel_cpu_true()``; on a CPU that is not Intel's the answer is 0 and
sgemm takes a slower path although the CPU has the same AVX2/FMA (or AVX-512) units. The
usual remedy (numpy and MATLAB users on AMD know it as the ``LD_PRELOAD`` trick) is a shared
library whose ``mkl_serv_intel_cpu_true`` returns 1: MKL still reads the CPU's features and
uses only instructions the CPU has. Loaded with ``RTLD_GLOBAL`` before torch, it is found
before MKL's own definition when ``libtorch_cpu.so`` binds the symbol. Measured (AMD EPYC,
Zen 3, AVX2/FMA, 2 cores, torch 2.13.0+cpu with oneMKL 2024.2): sgemm on MiniLM's shapes
115–145 → 150–165 GFLOP/s, and a full fp32 training step (AG News batch of 16) 624 → 536 ms,
mean of 4 alternating process pairs (0.83–0.91× in every pair). Only Zen 3 has been measured;
MKL still chooses kernels by the CPU's features (AVX2, or AVX-512 on Zen 4), and
``benchmarks/throughput.py --arms hf,hf_mkl`` measures the fix on another machine.

Why build it here rather than ship a binary: the library is one line of C; compiling it on the
machine (``cc``, once, cached under ``<paths.cache_dir>/blas/``) keeps binaries out of the repo
and matches the machine's ABI. Without a C compiler, on Intel CPUs (nothing to fix), on other
architectures, or when torch was imported before the run started (a notebook, the tests), it
does nothing and says why; ``metrics.json`` records ``mkl_fast_path`` (true/false) either way,
and the precision calibration keys its cache on it (the rates differ).

This module must not import torch: its whole job happens before torch loads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
#: vendors whose CPUs MKL sends down its slower path (``vendor_id`` in /proc/cpuinfo)
NON_INTEL_X86 = ("AuthenticAMD", "HygonGenuine")

_state: dict[str, object] = {"active": False, "reason": "not requested"}


def cpu_vendor() -> str:
    """``vendor_id`` from /proc/cpuinfo ('' where there is none: not Linux, not x86)."""
    from sftlab.perf.precision import cpu_info  # torch-free

    return cpu_info()["vendor"]


def needed(vendor: str, machine: str, torch_imported: bool) -> str | None:
    """Why the fix does not apply here, or None when it does (a pure function, for the tests)."""
    if machine not in ("x86_64", "AMD64"):
        return f"not an x86-64 CPU ({machine})"
    if vendor not in NON_INTEL_X86:
        return f"MKL already takes its fast path on this CPU ({vendor or 'unknown vendor'})"
    if torch_imported:
        return "torch was imported before the run started, too late to change MKL's choice"
    return None


def build_library(cache_dir: str | os.PathLike | None) -> Path | None:
    """The compiled library, cached under ``<cache_dir>/blas/`` (None without a C compiler)."""
    from sftlab.perf.cbuild import build

    return build("mkl_intel_cpu_true", SOURCE, cache_dir, flags=("-O2",))


def use_mkl_fast_path(enable: bool = True, cache_dir: str | os.PathLike | None = None) -> bool:
    """Make MKL take its fast path on this CPU, if it needs that and torch is not loaded yet.

    Idempotent; returns whether the fix is active in this process. Call it before anything
    imports torch (``sftlab.train.train`` and ``sftlab.evaluate`` do it first thing).
    """
    if _state["active"]:
        return True
    if not enable:
        _state["reason"] = "perf.mkl_fast_path.enable=false"
        return False
    reason = needed(cpu_vendor(), platform.machine(), "torch" in sys.modules)
    if reason is None:
        try:
            lib = build_library(cache_dir)
        except (OSError, subprocess.SubprocessError) as err:
            lib, reason = None, f"could not build the shim ({err})"
        if lib is None:
            reason = reason or "no C compiler (cc, gcc or clang) to build the one-line shim"
        else:
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                reason = f"could not load {lib} ({err})"
    _state.update(active=reason is None, reason=reason or "active")
    if reason is not None and reason.startswith(("no C compiler", "could not")):
        log.warning("fp32 matmuls run on MKL's slower path on this %s CPU: %s.", cpu_vendor(), reason)
    else:
        log.debug("MKL fast path: %s", _state["reason"])
    return bool(_state["active"])


def active() -> bool:
    """Whether this process loaded the shim (its matmuls take MKL's fast path)."""
    return bool(_state["active"])


def status() -> dict[str, object]:
    """For ``metrics.json``: ``mkl_fast_path`` and, when it is off, why."""
    out: dict[str, object] = {"mkl_fast_path": active()}
    if not active():
        out["mkl_fast_path_note"] = _state["reason"]
    return out


def from_config(cfg) -> bool:
    """:func:`use_mkl_fast_path` with the run's ``perf.mkl_fast_path`` and ``paths.cache_dir``."""
    opts = (cfg.get("perf") or {}).get("mkl_fast_path") or {}
    return use_mkl_fast_path(enable=opts.get("enable", True) is not False,
                             cache_dir=(cfg.get("paths") or {}).get("cache_dir"))
