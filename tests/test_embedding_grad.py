"""The word-embedding gradient in a kept buffer (sftlab.perf.embedding_grad): the same gradient
bit for bit, touched rows reset between steps, clipping equal to torch's, the right models, a
clean swap, and a default run that uses it."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_layers import one_thread, tiny_model  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed: int, length: int = 9):
    """Three right-padded sequences over a 100-token vocabulary, with repeated ids and padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, length), generator=g)  # 35 ids for 27 slots: repeats
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0  # BERT's pad id is its embedding's padding_idx
    ids[0, 3] = 0  # and once where it is attended: the one pad-id row with a gradient to drop
    return {"input_ids": ids, "attention_mask": mask}


def switched(model):
    """``model`` with the kept buffer switched on as the callback does it; returns its state."""
    from sftlab.perf import embedding_grad as eg

    emb = model.get_input_embeddings()
    state = eg._Rows()
    emb.forward = functools.partial(eg._forward, emb, state)
    eg._ROWS[emb.weight] = state
    return state


def backward(model, inputs):
    import torch.nn.functional as F

    F.cross_entropy(model(**inputs).logits, inputs["input_ids"][:, 1] % 3).backward()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_gradient_is_bit_identical_step_after_step(arch):
    """Two steps (zero_grad between them, as the Trainer does): after each backward the kept
    buffer equals the stock dense gradient exactly, rows the first batch touched are zero again,
    the padding row gets nothing, and every other parameter's gradient is unchanged."""
    import torch

    stock = tiny_model(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    kept = tiny_model(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    state = switched(kept)
    weight = kept.get_input_embeddings().weight
    pad = kept.get_input_embeddings().padding_idx
    for _step, seed in enumerate((0, 1)):
        inputs = batch(seed)
        stock.zero_grad(set_to_none=True)
        kept.zero_grad(set_to_none=True)
        backward(stock, inputs)
        backward(kept, inputs)
        assert weight.grad is state.buffer
        expected = stock.get_input_embeddings().weight.grad
        assert torch.equal(weight.grad, expected)
        assert torch.equal(state.rows, torch.unique(inputs["input_ids"]))
        if pad is not None:
            assert not weight.grad[pad].any()
        grads = {n: p.grad for n, p in stock.named_parameters() if p.grad is not None}
        for n, p in kept.named_parameters():
            assert torch.equal(p.grad, grads[n]), n
    assert state.resets == 1


def test_gradient_accumulation_sums_the_micro_batches():
    """Without zero_grad between two backwards the buffer holds the sum of both batches'
    gradients (the same additions, grouped per row: equal up to rounding) and both row sets."""
    import torch

    stock = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    kept = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    state = switched(kept)
    for seed in (0, 1):
        backward(stock, batch(seed))
        backward(kept, batch(seed))
    got, expected = kept.get_input_embeddings().weight.grad, stock.get_input_embeddings().weight.grad
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    both = torch.cat([batch(0)["input_ids"].reshape(-1), batch(1)["input_ids"].reshape(-1)])
    assert torch.equal(state.rows, torch.unique(both))


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_clipping_over_the_touched_rows_equals_torch(max_norm):
    """sftlab's clip_grad_norm_ on a kept buffer returns torch's norm and leaves the gradients
    torch's function leaves (scaled, or untouched when the norm is below max_norm)."""
    import torch

    from sftlab.perf.embedding_grad import clip_grad_norm_

    stock = tiny_model("bert").train()
    kept = tiny_model("bert").train()
    switched(kept)
    torch.manual_seed(3)
    backward(stock, batch(0))
    torch.manual_seed(3)
    backward(kept, batch(0))
    want = torch.nn.utils.clip_grad_norm_(list(stock.parameters()), max_norm)
    got = clip_grad_norm_(list(kept.parameters()), max_norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for (n, a), b in zip(kept.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12, msg=n)
    # without a kept buffer it is torch's function itself
    plain = tiny_model("bert").train()
    torch.manual_seed(3)
    backward(plain, batch(0))
    assert torch.equal(clip_grad_norm_(list(plain.parameters()), max_norm), want)


def test_rows_written_outside_the_set_switch_it_off(monkeypatch, caplog):
    """A gradient row written by someone else is found at the next check: a warning, the buffer
    zeroed, and the stock embedding backward from then on."""

    from sftlab.perf import embedding_grad as eg

    monkeypatch.setattr(eg, "CHECK_EVERY", 1)
    model = tiny_model("bert").train()
    state = switched(model)
    weight = model.get_input_embeddings().weight
    backward(model, batch(0))
    weight.grad[99] += 1.0  # row 99 is never in a batch
    model.zero_grad(set_to_none=True)
    with caplog.at_level("WARNING", logger="sftlab.perf.embedding_grad"):
        backward(model, batch(1))
    assert state.broken and "outside the rows" in caplog.text
    assert not weight.grad[99].any()
    model.zero_grad(set_to_none=True)
    backward(model, batch(1))
    assert weight.grad is not state.buffer  # autograd's own gradient again


def test_frozen_embeddings_and_no_grad_take_the_stock_path():
    import torch

    model = tiny_model("bert").train()
    state = switched(model)
    model.get_input_embeddings().weight.requires_grad_(False)
    backward(model, batch(0))
    assert state.buffer is None and model.get_input_embeddings().weight.grad is None
    with torch.no_grad():
        model(**batch(0))
    assert state.buffer is None


def test_where_it_does_not_apply():
    from transformers import AutoConfig, AutoModelForMaskedLM

    from sftlab.perf.embedding_grad import unsupported

    model = tiny_model("bert")
    assert unsupported(model, 1, "cpu") is None
    assert "cuda" in unsupported(model, 1, "cuda")
    assert "more than one process" in unsupported(model, 2, "cpu")
    tied = AutoModelForMaskedLM.from_config(AutoConfig.for_model(
        "bert", vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64))
    assert "tied" in unsupported(tied, 1, "cpu")


def test_the_callback_swaps_and_restores(tmp_path):
    import torch

    from sftlab.perf.embedding_grad import _ROWS, EmbeddingGradRows

    model = tiny_model("bert")
    module = SimpleNamespace(model=model)
    trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cb = EmbeddingGradRows()
    cb.setup(trainer, module, "validate")
    assert "forward" not in model.get_input_embeddings().__dict__
    cb.setup(trainer, module, "fit")
    emb = model.get_input_embeddings()
    assert "forward" in emb.__dict__ and emb.weight in _ROWS
    keys = set(model.state_dict())
    model.train()
    backward(model, batch(0))
    # a copy (deepcopy, pickle) runs its own embedding into its own buffer
    import copy
    import pickle

    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        twin_emb = twin.get_input_embeddings()
        twin_emb.weight.grad = None
        backward(twin, batch(1))
        assert twin_emb.weight.grad is not None and twin_emb.weight.grad is not emb.weight.grad
        assert twin_emb.forward.args[0] is twin_emb
    cb.teardown(trainer, module, "fit")
    assert "forward" not in emb.__dict__ and emb.weight not in _ROWS and emb.weight.grad is None
    assert set(model.state_dict()) == keys and cb.run_stats() == {"embedding_grad_rows": True}


def test_a_default_run_uses_it_and_trains_the_same(compose, tmp_path):
    """The default config (tiny BERT, CPU) trains with the kept buffer and says so; the trained
    weights match a run without it (the same gradients; the clipping norm summed in another
    order can differ in the last bit)."""
    import torch

    from sftlab.train import train

    on, off = tmp_path / "on", tmp_path / "off"
    train(compose("export=false", "test=false", out=on))
    train(compose("export=false", "test=false", "perf.embedding_grad_rows.enable=false", out=off))
    m_on, m_off = (json.loads((d / "metrics.json").read_text()) for d in (on, off))
    assert m_on["embedding_grad_rows"] is True and "embedding_grad_rows" not in m_off
    assert m_on["val/loss"] == pytest.approx(m_off["val/loss"], abs=1e-4)
    ckpts = [sorted(d.rglob("*.ckpt")) for d in (on, off)]
    assert ckpts[0] and ckpts[1]
    a, b = (torch.load(c[0], map_location="cpu", weights_only=False)["state_dict"] for c in ckpts)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
