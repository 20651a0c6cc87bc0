"""perf.mkl_fast_path (sftlab.perf.blas): when the shim applies, that it binds before torch's MKL,
that nothing of it needs torch, and that runs and the calibration record it.

The speed itself is a benchmark's business (benchmarks/throughput.py, README "Performance"),
not a test's: these tests check the mechanism on any machine."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

from sftlab.perf import blas


@pytest.mark.parametrize(("vendor", "machine", "imported", "applies"), [
    ("AuthenticAMD", "x86_64", False, True),
    ("HygonGenuine", "x86_64", False, True),
    ("GenuineIntel", "x86_64", False, False),   # MKL's fast path already
    ("AuthenticAMD", "x86_64", True, False),    # too late: torch has bound MKL's own answer
    ("", "aarch64", False, False),              # no MKL in torch's ARM wheels
])
def test_when_the_fix_applies(vendor, machine, imported, applies):
    reason = blas.needed(vendor, machine, imported)
    assert (reason is None) == applies
    if not applies:
        assert isinstance(reason, str) and reason


def test_off_by_config_says_so(monkeypatch):
    monkeypatch.setattr(blas, "_state", {"active": False, "reason": "not requested"})
    assert blas.use_mkl_fast_path(enable=False) is False
    assert blas.status() == {"mkl_fast_path": False, "mkl_fast_path_note": "perf.mkl_fast_path.enable=false"}


def test_in_a_process_that_imported_torch_it_does_nothing(monkeypatch, tmp_path):
    import torch  # noqa: F401  (the test process has it, as a notebook would)

    monkeypatch.setattr(blas, "_state", {"active": False, "reason": "not requested"})
    monkeypatch.setattr(blas, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(blas.platform, "machine", lambda: "x86_64")
    assert blas.use_mkl_fast_path(cache_dir=tmp_path) is False
    assert "torch was imported" in blas.status()["mkl_fast_path_note"]
    assert not (tmp_path / "blas").exists()  # nothing built for nothing


def test_the_perf_package_and_blas_import_without_torch():
    code = "import sys, sftlab.perf, sftlab.perf.blas; sftlab.perf.__all__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


@pytest.mark.skipif(compiler is None or platform.machine() != "x86_64", reason="needs a C compiler on x86-64")
def test_the_shim_is_what_mkl_binds(tmp_path):
    """Built once under the cache dir, loaded before torch: the process-wide definition of
    mkl_serv_intel_cpu_true (what libtorch_cpu's call binds to) is the shim's, it answers 1,
    and matmuls still compute the right numbers. Vendor forced, so it runs on Intel CPUs too."""
    script = textwrap.dedent(f"""
        import ctypes, json, sys
        from sftlab.perf import blas
        blas.cpu_vendor = lambda: "AuthenticAMD"
        ok = blas.use_mkl_fast_path(cache_dir={str(tmp_path)!r})
        import numpy as np, torch
        a, b = torch.randn(300, 200, dtype=torch.float64), torch.randn(200, 100, dtype=torch.float64)
        got = (a.float() @ b.float()).double()
        lib = [p for p in (__import__("pathlib").Path({str(tmp_path)!r}) / "blas").iterdir()][0]
        ours = ctypes.cast(ctypes.CDLL(str(lib)).mkl_serv_intel_cpu_true, ctypes.c_void_p).value
        bound = ctypes.cast(ctypes.CDLL(None).mkl_serv_intel_cpu_true, ctypes.c_void_p).value
        print(json.dumps({{"ok": ok, "status": blas.status(), "same": ours == bound,
                          "answer": ctypes.CDLL(None).mkl_serv_intel_cpu_true(),
                          "err": float((got - a @ b).abs().max())}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] is True and res["status"] == {"mkl_fast_path": True}
    assert res["same"] is True and res["answer"] == 1
    assert res["err"] < 1e-3
    (lib,) = (tmp_path / "blas").iterdir()
    assert lib.suffix == ".so"
    # a second process reuses the built library (no compiler needed then)
    assert blas.build_library(tmp_path) == lib


def test_calibration_cache_key_tells_the_paths_apart():
    from sftlab.perf import precision as prec

    info = {"device": "cpu", "name": "AMD EPYC", "flags_hash": "x", "torch": "2.13.0", "threads": 2}
    shapes = [(384, 384)]
    plain = prec._key(info, shapes, 1024)
    assert prec._key({**info, "mkl_fast_path": False}, shapes, 1024) == plain  # old caches stay valid
    assert prec._key({**info, "mkl_fast_path": True}, shapes, 1024) != plain


def test_a_run_records_whether_it_had_the_fast_path(compose):
    from pathlib import Path

    from sftlab.train import train

    cfg = compose("export=false", "test=false")
    train(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    # the test process imported torch long before: off here, and metrics.json says why
    assert saved["mkl_fast_path"] is False and saved["mkl_fast_path_note"]
