"""The compiled CPU kernels (sftlab.perf.kernels): dropout masks that follow the documented hash
bit for bit (forward and backward, any thread count, bf16 too), GELU within float rounding of
the exact function and its derivative, a clean module swap, the fallback without a compiler,
and a default run that uses them."""

from __future__ import annotations

import json
import math

import pytest

from sftlab.perf.cbuild import compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs a C compiler")

MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def K(tmp_path_factory):
    from sftlab.perf import kernels

    assert kernels.load(tmp_path_factory.mktemp("kcache")) is not None, kernels.reason()
    return kernels


def reference_keep(seed: int, n: int, p: float) -> list[bool]:
    """The documented rule in plain Python: lane i % 4 of splitmix64(seed, i // 4) >= threshold."""
    thr = -32768 + round(p * 65536)
    out = []
    for i in range(n):
        z = (seed + (i // 4 + 1) * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        lane = (z >> (16 * (i % 4))) & 0xFFFF
        out.append((lane - 65536 if lane >= 32768 else lane) >= thr)
    return out


@pytest.mark.parametrize("n", [1, 7, 4001])
def test_dropout_follows_the_documented_hash_forward_and_backward(K, n):
    import torch

    p, seed = 0.3, 0x1234_5678_9ABC_DEF0
    x = torch.randn(n, dtype=torch.float32, requires_grad=True)
    y = K.dropout(x, p, seed=seed)
    keep = torch.tensor(reference_keep(seed, n, p))
    scale = 1.0 / (1.0 - p)
    assert torch.equal(y.detach(), torch.where(keep, x.detach() * scale, torch.zeros(())))
    g = torch.randn(n)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g * scale, torch.zeros(())))


def test_dropout_is_independent_of_the_thread_count_and_shape(K):
    import torch

    x = torch.randn(8, 12, 33, 37)  # 117k elements: several threads, a tail of n % 4
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(K.dropout(x, 0.1, seed=99))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    flat = K.dropout(x.reshape(-1), 0.1, seed=99).view_as(x)
    assert torch.equal(flat, outs[0])
    # a non-contiguous input is read in its logical order
    t = x.transpose(1, 2)
    assert torch.equal(K.dropout(t, 0.1, seed=5), K.dropout(t.contiguous(), 0.1, seed=5))


def test_dropout_statistics_and_seeding(K):
    import torch

    x = torch.ones(400_000)
    for p in (0.1, 0.5):
        kept = int((K.dropout(x, p, seed=3) != 0).sum())
        mean, sd = (1 - p) * x.numel(), math.sqrt(p * (1 - p) * x.numel())
        assert abs(kept - mean) < 6 * sd, (p, kept, mean)
    # consecutive elements (lanes of one word, neighbouring words) are not correlated
    m = (K.dropout(x, 0.5, seed=4) != 0).float()
    corr = torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1]
    assert abs(float(corr)) < 0.01
    # seeds come from torch's default generator: manual_seed repeats a mask, a new call differs
    torch.manual_seed(0)
    a, b = K.dropout(x, 0.5), K.dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(K.dropout(x, 0.5), a) and not torch.equal(a, b)


def test_dropout_bf16_rounds_like_torch(K):
    import torch

    x = torch.randn(10_001).to(torch.bfloat16)
    p, seed = 0.1, 17
    y = K.dropout(x, p, seed=seed)
    keep = torch.tensor(reference_keep(seed, x.numel(), p))
    want = torch.where(keep, (x.float() * (1.0 / (1.0 - p))).to(torch.bfloat16), torch.zeros((), dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


def test_fast_dropout_takes_the_kernel_only_while_it_is_on(K):
    import torch

    from sftlab.perf.dropout import fast_dropout

    x = torch.randn(1000)
    K._state["dropout"] = True
    try:
        torch.manual_seed(1)
        on = fast_dropout(x, 0.2)
        torch.manual_seed(1)
        assert torch.equal(on, K.dropout(x, 0.2))
        half = fast_dropout(x.half(), 0.2)  # fp16 is not the kernel's: the torch path
        assert half.dtype == torch.float16
    finally:
        K._state["dropout"] = False
    torch.manual_seed(1)
    off = fast_dropout(x, 0.2)
    assert not torch.equal(off, on)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_matches_the_exact_function_and_its_derivative(K, dtype):
    import torch

    dt = getattr(torch, dtype)
    x64 = torch.cat([torch.linspace(-12, 12, 20001, dtype=torch.float64), torch.randn(50_000, dtype=torch.float64) * 3])
    x = x64.to(dt).requires_grad_()
    y = K.gelu(x)
    ref = x.detach().double().requires_grad_()
    want = torch.nn.functional.gelu(ref)
    want.backward(torch.ones_like(want))
    y.backward(torch.ones_like(y))
    y, want = y.detach(), want.detach()
    if dt == torch.float32:
        assert float((y.double() - want).abs().max()) < 1e-6
        assert float((x.grad.double() - ref.grad).abs().max()) < 1e-6
        # the kernel is no worse than torch's own fp32 GELU
        stock = torch.nn.functional.gelu(x.detach()).double()
        assert float((y.double() - want).abs().max()) <= 2 * float((stock - want).abs().max())
    else:
        stock = torch.nn.functional.gelu(x.detach())
        ulp = stock.float().abs() * 2**-7 + 1e-6  # one bf16 step (tiny values: torch flushes, the kernel keeps them)
        assert bool(((y.float() - stock.float()).abs() <= ulp).all())
        assert y.dtype == x.grad.dtype == torch.bfloat16
        assert float((x.grad.double() - ref.grad).abs().max()) < 0.02


def test_gelu_swap_is_clean_and_stock_where_no_gradient_is_needed(K):
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_layers import tiny_model

    model = tiny_model("bert")
    keys = set(model.state_dict())
    stock = [m for m in model.modules() if K.is_exact_gelu(m)]
    assert stock
    swapped = K.swap_gelu(model)
    assert len(swapped) == len(stock) and not any(K.is_exact_gelu(m) for m in model.modules())
    assert set(model.state_dict()) == keys
    fast = [m for m in model.modules() if isinstance(m, K.FastGELU)]
    x = torch.randn(4, 37)
    with torch.no_grad():  # no gradient: the module it replaced, bit for bit
        assert torch.equal(fast[0](x), torch.nn.functional.gelu(x))
    xg = x.clone().requires_grad_()
    assert fast[0](xg).grad_fn is not None and type(fast[0](xg).grad_fn).__name__ == "_GELUBackward"
    K.restore_gelu(swapped)
    assert [m for m in model.modules() if K.is_exact_gelu(m)] == stock
    # the tanh approximation (GPT-2's gelu_new) is another function: left alone
    gpt2 = tiny_model("gpt2")
    assert K.swap_gelu(gpt2) == []


def test_without_a_compiler_the_torch_path_runs_and_says_why(tmp_path, monkeypatch):
    from sftlab.perf import cbuild, kernels

    monkeypatch.setattr(cbuild, "compiler", lambda: None)
    monkeypatch.setattr(kernels, "_state", {"lib": None, "dropout": False, "reason": "not requested"})
    assert kernels.load(tmp_path) is None
    assert "no C compiler" in kernels.reason()
    assert not kernels.dropout_active()


def test_a_default_run_uses_the_kernels_and_switches_them_off_after_fit(compose, tmp_path):
    from sftlab.perf import kernels
    from sftlab.train import train

    on, off = tmp_path / "on", tmp_path / "off"
    train(compose("export=false", "test=false", out=on))
    train(compose("export=false", "test=false", "perf.cpu_kernels.enable=false", out=off))
    m_on, m_off = (json.loads((d / "metrics.json").read_text()) for d in (on, off))
    assert m_on["cpu_kernels"] == ["dropout", "gelu"]
    assert "cpu_kernels" not in m_off
    assert not kernels.dropout_active()  # teardown switched it off
    for m in (m_on, m_off):
        assert math.isfinite(m["val/loss"])
