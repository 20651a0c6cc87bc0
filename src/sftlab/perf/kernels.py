"""Compiled CPU kernels for dropout and GELU: one pass where PyTorch's CPU kernels take several.

Why: with matmuls at ~94% of the machine's measured rate, the rest of an fp32 CPU step is a
dozen small kernels, and two of them were the largest (README "Performance" has the profile):

- **dropout** (hidden, attention probabilities, embeddings): torch draws random words on one
  thread (``random_``), builds a mask and applies it in ~4 passes, stores the mask for the
  backward and reads it there. The kernel here hashes the element's index with a per-call seed
  (splitmix64, the generator that seeds xoshiro; 4 int16 lanes per 64-bit word, as
  :func:`sftlab.perf.dropout.keep_mask`) and writes ``x * scale`` or 0 in one pass on every
  thread; the backward recomputes the same mask from the seed (nothing stored).
- **GELU** (the exact, erf form of BERT's feed-forward): ``gelu_backward`` recomputes erf and
  exp. The kernel computes the output and its derivative in one pass, so the backward is one
  multiply (``grad * d``); it keeps ``d`` instead of the input, the same memory.

What changes: the dropout masks are other random numbers than the torch path's (the same
statistics: each element kept independently with probability 1 - p, p rounded to 1/65536;
the per-call seed is drawn from torch's default generator, so ``seed_everything`` still
makes a run repeatable, on any thread count). GELU differs from ``F.gelu`` in the last bits
(|error| ~4e-7 fp32, as torch's own erf approximation; a test bounds it). Evaluation and
inference do not use either kernel (no dropout; GELU only where a gradient is needed), so the
metrics of a trained model and its exports are computed by stock PyTorch.

Where: CPU tensors in fp32 or bf16 (fp16 and GPU take the stock path), built on the machine
(:mod:`sftlab.perf.cbuild`: ``cc -O3 -march=native -fopenmp``, cached under
``<paths.cache_dir>/kernels/``, keyed by CPU model and flags). Without a C compiler the run
uses the torch paths and says why (``metrics.json``: ``cpu_kernels``, ``cpu_kernels_note``).
The OpenMP runtime is torch's own ``libgomp`` (loaded first), so the kernels use torch's
thread count and thread pool.

Reached from config: ``perf.cpu_kernels`` (:class:`CpuKernels`, a callback that loads the
library and switches GELU modules for ``fit``; dropout uses it through
:func:`sftlab.perf.dropout.fast_dropout` while it is on).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import subprocess
from importlib import resources
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno")
_state: dict[str, Any] = {"lib": None, "dropout": False, "reason": "not requested"}


def source() -> str:
    """The C source (``sftlab/perf/kernels.c``)."""
    return resources.files("sftlab.perf").joinpath("kernels.c").read_text(encoding="utf-8")


def load(cache_dir=None) -> ctypes.CDLL | None:
    """Build (once per machine, cached) and load the kernels; None, with :func:`reason`, if not here."""
    if _state["lib"] is not None:
        return _state["lib"]
    from sftlab.perf.cbuild import build, last_error
    from sftlab.perf.precision import cpu_info

    if platform.system() != "Linux":
        _state["reason"] = f"built and tested on Linux only (this is {platform.system()})"
        return None
    info = cpu_info()
    key = f"{info['name']}|{info['flags_hash']}|torch {torch.__version__}"
    try:
        path = build("sftlab_kernels", source(), cache_dir, flags=_FLAGS, key=key, subdir="kernels")
    except (OSError, subprocess.SubprocessError) as err:
        _state["reason"] = f"could not build the kernels ({err})"
        return None
    if path is None:
        _state["reason"] = last_error("sftlab_kernels") or "could not build the kernels"
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        _state["reason"] = f"could not load {path} ({err})"
        return None
    vp, i64, u64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_float
    for name in ("sftlab_dropout_f32", "sftlab_dropout_bf16"):
        getattr(lib, name).argtypes = [vp, vp, i64, u64, i32, f32]
    for name in ("sftlab_gelu_f32", "sftlab_gelu_bf16", "sftlab_gelu_backward_bf16"):
        getattr(lib, name).argtypes = [vp, vp, vp, i64]
    _state.update(lib=lib, reason="loaded")
    return lib


def reason() -> str:
    """Why the kernels are not loaded ('loaded' when they are)."""
    return str(_state["reason"])


def threshold(p: float) -> int:
    """The int16 lane value at or above which an element is kept (``keep_mask``'s rule)."""
    return -32768 + round(float(p) * 65536)


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x`` (a CPU tensor in fp32 or bf16, and the library loaded)."""
    return _state["lib"] is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _seed() -> int:
    # from torch's default CPU generator: seed_everything/manual_seed make the masks repeatable
    return int(torch.empty((), dtype=torch.int64).random_())


def _dropout_into(x: torch.Tensor, out: torch.Tensor, seed: int, p: float) -> None:
    fn = _state["lib"].sftlab_dropout_f32 if x.dtype == torch.float32 else _state["lib"].sftlab_dropout_bf16
    fn(x.data_ptr(), out.data_ptr(), x.numel(), seed, threshold(p), 1.0 / (1.0 - p))


class _Dropout(torch.autograd.Function):
    """Kernel dropout forward; the backward applies the same mask (recomputed from the seed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        _dropout_into(x, out, seed, p)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        _dropout_into(grad, out, ctx.seed, ctx.p)
        return out, None, None


def dropout(x: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """Inverted dropout (training) with the kernel; ``0 < p < 1`` and :func:`supports` ``x``.

    ``seed`` fixes the mask (tests); by default one is drawn from torch's generator per call.
    """
    return _Dropout.apply(x, float(p), _seed() if seed is None else int(seed))


def dropout_active() -> bool:
    """Whether :func:`sftlab.perf.dropout.fast_dropout` should use :func:`dropout` now."""
    return bool(_state["dropout"]) and _state["lib"] is not None


class _GELU(torch.autograd.Function):
    """GELU forward writing the output and its derivative; backward ``grad * d``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        d = torch.empty(x.shape, dtype=torch.float32)
        lib = _state["lib"]
        (lib.sftlab_gelu_f32 if x.dtype == torch.float32 else lib.sftlab_gelu_bf16)(
            x.data_ptr(), out.data_ptr(), d.data_ptr(), x.numel())
        ctx.save_for_backward(d)
        ctx.dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (d,) = ctx.saved_tensors
        if ctx.dtype == torch.float32:
            return grad * d
        grad = grad.to(torch.bfloat16).contiguous()
        out = torch.empty_like(grad)
        _state["lib"].sftlab_gelu_backward_bf16(grad.data_ptr(), d.data_ptr(), out.data_ptr(), grad.numel())
        return out


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU with the kernel; :func:`supports` ``x``."""
    return _GELU.apply(x)


class FastGELU(torch.nn.Module):
    """Stands in for an exact-GELU module during ``fit``: the kernel where a gradient is needed.

    Everywhere else (no grad, eval, a frozen layer, GPU, fp16) it calls the module it replaced,
    so what evaluation and inference compute is stock PyTorch.
    """

    def __init__(self, stock: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["stock"] = stock  # not a child: the state_dict and module tree stay as they were

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and supports(x):
            return gelu(x)
        return self.stock(x)


def is_exact_gelu(module: torch.nn.Module) -> bool:
    """transformers' ``GELUActivation`` (erf form, not its Python variant) or ``nn.GELU()``."""
    from transformers.activations import GELUActivation

    if type(module) is torch.nn.GELU:
        return module.approximate == "none"
    return type(module) is GELUActivation and getattr(module, "act", None) is torch.nn.functional.gelu


def swap_gelu(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Put a :class:`FastGELU` in place of every exact-GELU module; returns what to restore."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_exact_gelu(child):
                setattr(parent, name, FastGELU(child))
                swapped.append((parent, name, child))
    return swapped


def restore_gelu(swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    for parent, name, stock in swapped:
        setattr(parent, name, stock)


class CpuKernels(pl.Callback):
    """``perf.cpu_kernels``: load the kernels for ``fit`` on CPU; kernel dropout and GELU while it runs.

    ``setup('fit')`` builds/loads the library (once per machine) and, on CPU, turns kernel
    dropout on (read by :func:`sftlab.perf.dropout.fast_dropout`, so it needs
    ``perf.fast_dropout`` too) and swaps the model's exact-GELU modules for :class:`FastGELU`;
    ``teardown('fit')`` restores both, so checkpoints, exports and later stages are stock.
    """

    def __init__(self, cache_dir: str | None = None, dropout: bool = True, gelu: bool = True) -> None:
        self.cache_dir = cache_dir
        self.use_dropout, self.use_gelu = bool(dropout), bool(gelu)
        self.swapped: list = []
        self.used: dict[str, bool] = {"dropout": False, "gelu": False}
        self.note = ""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.strategy.root_device.type != "cpu":
            self.note = f"training on {trainer.strategy.root_device.type}, the kernels are for CPU"
            return
        if load(self.cache_dir) is None:
            self.note = reason()
            log.warning("compiled CPU kernels (dropout, GELU): off (%s); the torch kernels run instead", self.note)
            return
        model = getattr(pl_module, "model", pl_module)
        _state["dropout"] = self.use_dropout
        self.swapped = swap_gelu(model) if self.use_gelu else []
        self.used = {"dropout": self.use_dropout, "gelu": bool(self.swapped)}
        log.info("compiled CPU kernels: dropout %s, GELU %s", "on" if self.use_dropout else "off",
                 f"on ({len(self.swapped)} modules)" if self.swapped else "off (no exact-GELU module)"
                 if self.use_gelu else "off")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _state["dropout"] = False
        restore_gelu(self.swapped)
        self.swapped = []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # a failed fit leaves nothing switched either

    def run_stats(self) -> dict[str, Any]:
        """``cpu_kernels``: which kernels ran in this fit; ``cpu_kernels_note`` when none could."""
        out: dict[str, Any] = {"cpu_kernels": [k for k, v in self.used.items() if v]}
        if self.note:
            out["cpu_kernels_note"] = self.note
        return out
