"""``trainer.precision: auto``: the faster precision of this machine, measured, not guessed.

Why measure: CPU flags say what a CPU *can* do, not how fast. On an Intel Xeon with
``avx512_bf16`` but no AMX a bf16 matmul ran at about half the fp32 rate (issue #16), so a
flag-based choice made training 36% slower there; on an AMD EPYC with the same flag bf16 was
2.85× faster. So the choice comes from a short calibration (about a second, once per machine):
``F.linear`` on the model's own shapes (the matmul weights of one block, for a batch's worth
of tokens), in fp32 and bf16 (and fp16 on CUDA), interleaved, best round kept (noise on a
shared machine only ever slows a round down), giving GFLOP/s per precision. The rates are
cached in ``<paths.cache_dir>/calibration/precision.json``, keyed by the machine (CPU model
and flags or GPU name, torch version, thread count) and the shapes, so later runs and every
sweep job read them instead of measuring again (also a calibration that got little CPU from a
busy machine: runs of one config must train in one precision; it warns, and
``perf.precision.recalibrate=true`` measures again). The same rates are the peak that
``train_mfu`` divides by (:mod:`sftlab.perf.flops`).

``perf.precision`` (conf/perf/default.yaml) holds the options; ``recalibrate=true`` measures
again (after a calibration that ran while the machine was busy); an explicit
``trainer.precision=32-true`` is used as given and still gets the rates and MFU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FP32, BF16, FP16 = "32-true", "bf16-mixed", "16-mixed"
#: precision flag -> the family whose matmul rate it runs at (the calibration measures families)
_FAMILY = {"32": FP32, "32-true": FP32, "bf16": BF16, "bf16-mixed": BF16, "bf16-true": BF16,
           "16": FP16, "16-mixed": FP16, "16-true": FP16}
#: CPU flags that decide matmul speed, printed with the machine
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_fp16")
#: environment variable through which DDP's rank 0 hands its calibration to the other ranks
_HANDOFF = "SFTLAB_PRECISION_CALIBRATION"


def choose_precision(rates: dict[str, float], half: str = BF16, min_speedup: float = 1.1) -> str:
    """``half`` when its measured rate is at least ``min_speedup`` × fp32's, else ``32-true``.

    Why a margin rather than "whichever is faster": mixed precision pays for things the
    matmul rate does not show (casting weights and activations at every autocast boundary,
    fp32 master weights, norms and softmax kept in fp32) and brings a small accuracy risk
    (fp16 overflows, bf16 rounding), and a one-second calibration on a shared machine moves by
    a few percent; a half-precision matmul only ~equal to fp32 would make training slower.
    ``half`` is ``bf16-mixed``, or ``16-mixed`` on a GPU without native bf16 (V100, T4).
    """
    fp32, fast = rates.get(FP32), rates.get(half)
    if not fast:
        return FP32
    if not fp32:
        return half
    return half if round(fast / fp32, 9) >= min_speedup else FP32


def cpu_info() -> dict[str, Any]:
    """CPU model, vendor, the flags that decide matmul speed, and a hash of all flags (``/proc/cpuinfo``).

    Torch-free: :mod:`sftlab.perf.blas` reads the vendor before torch is imported.
    """
    name, vendor, flags = platform.processor() or platform.machine(), "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    name = value.strip()
                elif key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"name": name, "vendor": vendor, "flags": [f for f in MATMUL_FLAGS if f in flags],
            "flags_hash": hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12]}


def machine(device: str) -> dict[str, Any]:
    """What a matmul rate depends on besides the shapes: the processor, torch, threads."""
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name()
        info["native_bf16"] = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    else:
        from sftlab.perf.blas import active

        info.update(cpu_info())
        info["mkl_fast_path"] = active()  # MKL's path on AMD CPUs changes the fp32 rate (sftlab.perf.blas)
    return info


def candidates(info: dict[str, Any]) -> tuple[list[str], str]:
    """(precisions to measure, the half precision auto may pick) for a machine."""
    if info["device"] == "cuda":
        half = BF16 if info.get("native_bf16") else FP16
        return ([FP32, BF16, FP16] if info.get("native_bf16") else [FP32, FP16]), half
    return [FP32, BF16], BF16


def measure_rates(shapes: list[tuple[int, int]], tokens: int, precisions: list[str], device: str = "cpu",
                  budget_s: float = 1.0, max_rounds: int = 50) -> dict[str, float]:
    """GFLOP/s of ``F.linear`` over ``shapes`` (``(in, out)``) for ``tokens`` rows, per precision.

    Rounds alternate between the precisions so drift hits them alike; each keeps its best
    round. Stops after ``budget_s`` seconds or ``max_rounds`` rounds (tiny shapes).
    """
    import torch
    import torch.nn.functional as F

    dtypes = {FP32: torch.float32, BF16: torch.bfloat16, FP16: torch.float16}
    gen = torch.Generator().manual_seed(0)
    data = {p: [(torch.randn(tokens, i, generator=gen).to(device, dtypes[p]),
                 torch.randn(o, i, generator=gen).to(device, dtypes[p])) for i, o in shapes]
            for p in precisions}
    flops = 2 * tokens * sum(i * o for i, o in shapes)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = dict.fromkeys(precisions, 0.0)
    start = time.perf_counter()
    for rnd in range(max_rounds + 1):
        for p in precisions:
            sync()
            t0 = time.perf_counter()
            for x, w in data[p]:
                F.linear(x, w)
            sync()
            if rnd:  # round 0 warms up (kernel choice, allocator)
                best[p] = max(best[p], flops / max(time.perf_counter() - t0, 1e-9) / 1e9)
        if rnd and time.perf_counter() - start >= budget_s:
            break
    return {p: float(f"{r:.4g}") for p, r in best.items()}


def block_shapes(model) -> list[tuple[int, int]]:
    """``(in, out)`` of the matmul weights of the model's first block (of all, if it has no map)."""
    import torch.nn as nn

    from sftlab.layers import build_layer_map

    try:
        ids = {id(p) for _, p in build_layer_map(model).blocks[0].params}
    except Exception:  # noqa: BLE001  (an unmappable model: every matmul weight)
        ids = {id(p) for p in model.parameters()}
    shapes = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in ids or weight.dim() != 2:
            continue
        if isinstance(module, nn.Linear):
            shapes.append((int(weight.shape[1]), int(weight.shape[0])))
        elif type(module).__name__ == "Conv1D":  # GPT-2 stores its weight as (in, out)
            shapes.append((int(weight.shape[0]), int(weight.shape[1])))
    if not shapes:
        hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 768)
        shapes = [(hidden, hidden)]
    return shapes


@dataclass
class Calibration:
    """The measured rates of one machine and shapes, and the precision a run uses."""

    rates: dict[str, float]
    machine: dict[str, Any]
    shapes: list[tuple[int, int]]
    tokens: int
    half: str = BF16
    precision: str = FP32
    requested: str = "auto"
    cached: bool = False
    measured_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def peak_gflops(self, precision: str | None = None) -> float | None:
        """The calibrated rate of ``precision``'s family (the run's by default), if measured."""
        return self.rates.get(_FAMILY.get(str(precision or self.precision), ""))

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"precision": self.precision}
        out.update({f"calibration/gflops_{p}": r for p, r in self.rates.items()})
        return out

    def summary(self) -> str:
        rates = ", ".join(f"{p} {r:.3g}" for p, r in self.rates.items())
        how = "auto" if self.requested == "auto" else "as configured"
        src = "cached" if self.cached else "measured now"
        return (f"precision {self.precision} ({how}); matmul GFLOP/s on this model's shapes: {rates} "
                f"({src}, {self.machine.get('name', '?')}, {self.machine.get('threads')} threads)")


def _key(info: dict[str, Any], shapes: list[tuple[int, int]], tokens: int) -> str:
    ident = {k: info.get(k) for k in ("device", "name", "flags_hash", "torch", "threads")}
    if info.get("mkl_fast_path"):  # only when on, so the caches of machines without it stay valid
        ident["mkl_fast_path"] = True
    ident.update(shapes=[list(s) for s in shapes], tokens=tokens)
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def calibrate(model, device: str = "cpu", tokens: int = 1024, cache_dir: str | os.PathLike | None = None,
              budget_s: float = 1.0, recalibrate: bool = False) -> Calibration:
    """The rates for ``model``'s shapes on this machine: from the cache, else measured (and cached)."""
    from sftlab.files import atomic_write_text

    info = machine(device)
    shapes = block_shapes(model)
    precisions, half = candidates(info)
    key = _key(info, shapes, tokens)
    path = Path(cache_dir) / "calibration" / "precision.json" if cache_dir else None
    entries: dict[str, Any] = {}
    if path is not None and path.is_file():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
    hit = entries.get(key)
    if hit and not recalibrate and set(precisions) <= set(hit.get("rates", {})):
        return Calibration(rates=hit["rates"], machine=info, shapes=shapes, tokens=tokens, half=half,
                           cached=True, measured_at=hit.get("measured_at", ""))
    wall, cpu = time.perf_counter(), time.process_time()
    rates = measure_rates(shapes, tokens, precisions, device=device, budget_s=budget_s)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    share = cpu / (wall * max(1, info["threads"])) if device == "cpu" and wall >= 0.1 else 1.0
    if share < 0.5:  # rounds alternate, so both precisions lost alike; still, say so
        log.warning("The precision calibration got %.0f%% of %d threads (a busy machine); if its choice "
                    "looks wrong, measure again when the machine is quiet: perf.precision.recalibrate=true.",
                    100 * share, info["threads"])
    if path is not None:  # cached even when busy: runs of one config must train in one precision
        entries[key] = {"rates": rates, "machine": info, "shapes": shapes, "tokens": tokens, "measured_at": stamp,
                        "cpu_share": round(share, 2)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return Calibration(rates=rates, machine=info, shapes=shapes, tokens=tokens, half=half, measured_at=stamp)


def device_type(accelerator: str) -> str:
    """``cuda`` or ``cpu`` for a Lightning accelerator flag (``auto``: CUDA when available)."""
    acc = str(accelerator).lower()
    if acc in ("gpu", "cuda"):
        return "cuda"
    if acc == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def resolve_precision(cfg, model) -> Calibration | None:
    """Calibrate for ``model`` and set ``cfg.trainer.precision`` when it is ``auto``.

    Returns the calibration (the run's precision, the rates) for the fit-start line,
    ``metrics.json`` and MFU; None when ``perf.precision.enable=false`` (then ``auto`` means
    ``32-true``). Under DDP started by Lightning the other ranks take rank 0's result (passed on
    in the environment of the processes it launches), so every rank trains in the same
    precision; ranks started by an outside launcher (torchrun) calibrate each for itself.
    """
    from omegaconf import open_dict

    from sftlab.errors import checked
    from sftlab.runs import is_rank_zero

    opts = (cfg.get("perf") or {}).get("precision") or {}
    requested = str(cfg.trainer.get("precision", "auto"))
    cal: Calibration | None = None
    handed = os.environ.get(_HANDOFF)
    if handed and not is_rank_zero():
        data = json.loads(handed)
        cal = Calibration(**{**data, "shapes": [tuple(s) for s in data["shapes"]]})
    elif opts.get("enable", True) is not False:
        budget_s = checked("perf.precision.budget_s", opts.get("budget_s", 1.0), positive=True)
        min_speedup = checked("perf.precision.min_speedup", opts.get("min_speedup", 1.1), positive=True)
        dev = device_type(cfg.trainer.get("accelerator", "auto"))
        # a batch's tokens: AG News pads to ~54 of max_length 128 in length-grouped batches
        tokens = int(cfg.data.get("batch_size", 16)) * max(8, int(cfg.model.get("max_length") or 128) // 2)
        cal = calibrate(model, dev, tokens=tokens, cache_dir=cfg.paths.get("cache_dir"), budget_s=budget_s,
                        recalibrate=bool(opts.get("recalibrate", False)))
        cal.requested = requested
        cal.precision = choose_precision(cal.rates, cal.half, min_speedup) if requested == "auto" else requested
        os.environ[_HANDOFF] = json.dumps(asdict(cal))
    precision = cal.precision if cal is not None else (FP32 if requested == "auto" else requested)
    with open_dict(cfg):
        cfg.trainer.precision = precision
    if cal is not None and is_rank_zero():
        log.info(cal.summary())
    return cal
