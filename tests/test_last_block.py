"""The last block for the first token only (sftlab.perf.last_block): same logits and gradients,
the right models, a clean swap, and an honest FLOP count."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_layers import one_thread, tiny_model  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

FIRST_TOKEN_ARCHS = ["bert", "roberta", "electra"]


def batch(seed: int = 0):
    """Three sequences of lengths 9, 5 and 2 (right padding), ids in the tiny vocabulary."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, length in enumerate((9, 5, 2)):
        mask[row, :length] = 1
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits_and_grads(model, inputs, pooling=None):
    import torch.nn.functional as F

    from sftlab.pooling import logits_of

    model.zero_grad(set_to_none=True)
    logits = logits_of(model, inputs, pooling)
    F.cross_entropy(logits, inputs["input_ids"][:, 1] % 3).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["sdpa", "eager", "fast"])
@pytest.mark.parametrize("arch", FIRST_TOKEN_ARCHS)
def test_the_first_token_block_gives_the_same_logits_and_gradients(arch, backend):
    """Train mode without dropout (the backward runs, the fast backend's training path is taken
    where it has one): every logit and every parameter's gradient agree with the full block, on
    a padded batch; the block's output has one position."""
    from sftlab.perf.dropout import use_fast_dropout
    from sftlab.perf.last_block import first_token_forward, last_block, unsupported

    model = tiny_model(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if backend == "fast":
        use_fast_dropout(model)
    elif backend == "eager":
        model.set_attn_implementation("eager")
    model.train()
    inputs = batch()
    want_logits, want_grads = logits_and_grads(model, inputs)

    block = last_block(model)
    assert unsupported(block) is None
    block.forward = first_token_forward(block)
    outputs = []
    handle = model.base_model.encoder.register_forward_hook(lambda m, a, out: outputs.append(out))
    got_logits, got_grads = logits_and_grads(model, inputs)
    handle.remove()

    assert outputs[0].last_hidden_state.shape[1] == 1
    assert (got_logits - want_logits).abs().max() < 1e-5
    assert got_grads.keys() == want_grads.keys()  # every parameter still gets a gradient (DDP)
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max()), name


def test_pooling_cls_reads_the_one_position_too():
    """model.pooling=cls (sftlab's pooling, BERT's pooler removed) on the switched block."""
    from sftlab.perf.last_block import first_token_forward, last_block
    from sftlab.pooling import resolve_pooling

    model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pooling = resolve_pooling(model, "cls")
    want, _ = logits_and_grads(model, batch(1), pooling)
    block = last_block(model)
    block.forward = first_token_forward(block)
    got, _ = logits_and_grads(model, batch(1), pooling)
    assert (got - want).abs().max() < 1e-5


def module(model, pooling=None, head_rows="sequence"):
    return SimpleNamespace(model=model, pooling=pooling, head_rows=head_rows)


@pytest.mark.parametrize(("arch", "pooling", "head_rows", "reason"), [
    ("bert", "mean", "sequence", "mean pooling"),
    ("bert", None, "token", "every token"),
    ("gpt2", None, "sequence", "last pooling"),
    ("xlnet", None, "sequence", "last pooling"),
    ("distilbert", None, "sequence", "not a BERT-family block"),
    ("deberta-v2", None, "sequence", "not a BERT-family block"),
])
def test_the_callback_leaves_other_heads_and_blocks_alone(arch, pooling, head_rows, reason, caplog):
    """Mean/last pooling and token heads read other rows; other block layouts are not
    switched. The callback says why and changes nothing."""
    import logging

    from sftlab.perf.last_block import FLAG, LastBlockClsOnly, last_block

    model = tiny_model(arch)
    pl_module = module(model, pooling, head_rows)
    callback = LastBlockClsOnly()
    with caplog.at_level(logging.INFO, logger="sftlab.perf.last_block"):
        callback.setup(None, pl_module, "fit")
    assert reason in caplog.text and "off" in caplog.text
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not getattr(pl_module, FLAG, False) and callback.run_stats() == {"last_block_cls_only": False}
    assert last_block(model) is not None


def test_the_callback_swaps_the_last_block_and_teardown_restores_it():
    from sftlab.perf.last_block import FLAG, LastBlockClsOnly, last_block

    model = tiny_model("bert")
    keys = list(model.state_dict())
    pl_module = module(model)
    callback = LastBlockClsOnly()
    callback.setup(None, pl_module, "fit")
    block = last_block(model)
    assert "forward" in block.__dict__ and getattr(pl_module, FLAG) is True
    assert [m for m in model.modules() if "forward" in m.__dict__] == [block]
    assert list(model.state_dict()) == keys
    import copy

    import torch

    twin = copy.deepcopy(model)  # LoRA's export copies the model: the copy runs its own weights
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    inputs = batch()
    assert last_block(twin).__dict__["forward"].args[0] is last_block(twin)
    assert not torch.allclose(twin.eval()(**inputs).logits, model.eval()(**inputs).logits)
    callback.teardown(None, pl_module, "fit")
    assert "forward" not in block.__dict__ and getattr(pl_module, FLAG) is False
    assert callback.run_stats() == {"last_block_cls_only": True}


def test_a_last_block_the_frozen_cache_replaced_is_left_to_it(caplog):
    import logging

    from sftlab.perf.last_block import LastBlockClsOnly, last_block

    model = tiny_model("bert")
    block = last_block(model)
    swapped = block.forward = lambda *a, **k: None  # what FrozenPrefix.install does
    with caplog.at_level(logging.INFO, logger="sftlab.perf.last_block"):
        LastBlockClsOnly().setup(None, module(model), "fit")
    assert block.__dict__["forward"] is swapped and "frozen-prefix cache" in caplog.text


def test_the_flop_count_moves_the_skipped_rows_to_one_per_sequence():
    """Full fine-tune of a tiny BERT (H hidden, I intermediate): the top block's query,
    attention output and two feed-forward matmuls (6·N each) move from per token to per
    sequence, its attention from len² to len per sequence; keys and values stay per token."""
    from sftlab.perf.flops import step_flops

    model = tiny_model("bert")
    h, i = model.config.hidden_size, model.config.intermediate_size
    full = step_flops(model)
    first = step_flops(model, first_token_last_block=True)
    moved = 6 * (2 * h * h + 2 * h * i)
    assert first.per_sequence == full.per_sequence + moved
    assert first.per_token == full.per_token - moved + 12 * h
    assert first.per_len_sq == full.per_len_sq - 12 * h


def test_a_default_run_switches_the_block_and_counts_honestly(compose, tmp_path):
    """The default config (tiny BERT, pooler head) trains with the switch on and says so;
    train_mfu's FLOPs are the first-token count (fewer than the full one)."""
    from sftlab.train import train

    on, off = tmp_path / "on", tmp_path / "off"
    train(compose("export=false", "test=false", out=on))
    train(compose("export=false", "test=false", "perf.last_block_cls_only.enable=false", out=off))
    m_on, m_off = (json.loads((d / "metrics.json").read_text()) for d in (on, off))
    assert m_on["last_block_cls_only"] is True and "last_block_cls_only" not in m_off
    assert 0 < m_on["train_model_gflops"] < m_off["train_model_gflops"]
    assert abs(m_on["val/loss"] - m_off["val/loss"]) < 0.05


@pytest.mark.parametrize("mode", ["full", "top_block"])
def test_the_flop_count_equals_what_torch_sees_the_switched_block_run(mode):
    """On a batch without padding, step_flops with the switch equals torch's FlopCounterMode
    over the switched model's forward and backward (full fine-tune, or the top block + head),
    and is below the count of the whole block: train_mfu counts only what runs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sftlab.layers import BLOCK, build_layer_map
    from sftlab.perf.flops import batch_shape, step_flops
    from sftlab.perf.last_block import first_token_forward, last_block

    model = tiny_model("bert", attn_implementation="eager")
    if mode == "top_block":
        layer_map = build_layer_map(model)
        top = max(p.index for p in layer_map if p.kind == BLOCK)
        for part in layer_map:
            for _, p in part.params:
                p.requires_grad_(part.kind != BLOCK or part.index == top)
        model.base_model.embeddings.requires_grad_(False)
    model.eval()
    block = last_block(model)
    block.forward = first_token_forward(block)
    inputs = {"input_ids": torch.randint(5, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter:
        loss = model(**inputs).logits.sum()
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    got = step_flops(model, first_token_last_block=True).batch(*batch_shape(inputs))
    assert got == counter.get_total_flops() < step_flops(model).batch(*batch_shape(inputs))
