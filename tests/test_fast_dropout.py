"""Fast dropout: dropout's statistics from fewer random numbers; the attention backend computes
exactly SDPA's attention (masks, causality) apart from which probabilities it drops."""

from __future__ import annotations

import pytest
import torch
from test_layers import one_thread, tiny_model  # noqa: F401

from sftlab.perf import attention as attn
from sftlab.perf import dropout as fd
from sftlab.perf.dropout import FastDropout, use_fast_dropout


def test_fast_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    d = FastDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = d(x)
    keep = (y != 0).float().mean().item()
    assert keep == pytest.approx(0.9, abs=0.002)  # 1e6 draws: sd of the rate is 3e-4
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)  # inverted scaling keeps the mean
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.equal(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.9))
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    # independent masks: two calls differ, and neighbouring lanes of one draw are uncorrelated
    m = (FastDropout(0.5).train()(torch.ones(400_000)) != 0).float().view(-1, 4)
    corr = torch.corrcoef(m.T)
    assert (corr - torch.eye(4)).abs().max() < 0.01
    assert not torch.equal(d(x), d(x))
    d.eval()
    assert d(x) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_equals_where_with_the_same_mask(dtype):
    """The one-pass kernel computes exactly ``where(keep, x / (1 - p), 0)`` forward and backward
    (the scale applied in fp32, as a Python scalar is), from the mask ``keep_mask`` draws."""
    p = 0.1
    x = torch.randn(4, 6, 33, 17).to(dtype).requires_grad_()
    g = torch.randn(4, 6, 33, 17).to(dtype)
    torch.manual_seed(1)
    keep_bool = fd.keep_mask(x.shape, p)
    torch.manual_seed(1)
    keep = fd.keep_mask(x.shape, p, dtype)  # the same draw, as 0/1 numbers
    assert keep.dtype == dtype and torch.equal(keep.bool(), keep_bool)
    torch.manual_seed(1)
    y = fd.fast_dropout(x, p)
    y.backward(g)
    expected = torch.where(keep_bool, x.detach() * (1 / (1 - p)), 0.0)
    assert y.dtype == dtype and torch.equal(y, expected)
    assert torch.equal(x.grad, torch.where(keep_bool, g * (1 / (1 - p)), 0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves the kernel's dtype alone
        assert fd.fast_dropout(x, p).dtype == dtype


def test_keep_mask_draws_the_words_randint_drew():
    """The full-range ``random_`` + xor (no 64-bit division per word) gives the masks the earlier
    ``randint(-2**63, 2**63 - 1)`` gave, and leaves the generator where randint left it: seeded
    runs train on the same dropout masks as before the change."""
    n = 4 * 1000 + 3
    torch.manual_seed(7)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    after = torch.randint(0, 2**31, (4,))
    threshold = -32768 + round(0.1 * 65536)
    expected = words.view(torch.int16)[:n] >= threshold
    torch.manual_seed(7)
    assert torch.equal(fd.keep_mask((n,), 0.1), expected)
    assert torch.equal(torch.randint(0, 2**31, (4,)), after)


def test_keep_mask_edge_probabilities():
    assert torch.equal(fd.keep_mask((3, 5), 1e-7, torch.float32), torch.ones(3, 5))  # rounds to 0
    assert torch.equal(fd.keep_mask((3, 5), 1 - 1e-7, torch.bfloat16), torch.zeros(3, 5, dtype=torch.bfloat16))
    assert fd.keep_mask((7,), 0.5).dtype == torch.bool


def test_swapping_dropout_changes_nothing_in_eval(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    before = model(input_ids=ids).logits
    n = use_fast_dropout(model)
    assert n >= 2 * 3 + 2  # two per block, embeddings, classifier
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.fixture
def keep_everything(monkeypatch):
    """Masks that keep every element: dropout becomes a deterministic 1/(1-p) scaling."""
    monkeypatch.setattr(fd, "keep_mask", lambda shape, p, dtype=torch.bool: torch.ones(shape, dtype=dtype))


class _Module(torch.nn.Module):
    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.is_causal = is_causal


@pytest.mark.parametrize("case", ["bool_padding", "float_padding", "no_mask", "causal"])
def test_attention_equals_sdpa_when_nothing_is_dropped(case, keep_everything):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    lengths = torch.tensor([7, 4])
    attend = (torch.arange(7)[None, :] < lengths[:, None])[:, None, None, :].expand(2, 1, 7, 7)
    mask = {"bool_padding": attend, "float_padding": torch.where(attend, 0.0, torch.finfo(torch.float32).min),
            "no_mask": None, "causal": None}[case]
    module = _Module(is_causal=case == "causal").train()
    p = 0.25
    ours, _ = attn.attention(module, q, k, v, mask, dropout=p, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert ours.shape == ref.shape == (2, 7, 3, 8)
    torch.testing.assert_close(ours * (1 - p), ref, atol=1e-5, rtol=1e-5)


def test_additive_mask_is_converted_once_per_mask_and_follows_changes():
    attend = torch.tensor([[True, True, False], [True, False, False]])[:, None, None, :]
    first = attn.additive_mask(attend, torch.bfloat16)
    assert attn.additive_mask(attend, torch.bfloat16) is first  # every layer of one forward: cached
    assert torch.equal(first == 0, attend)
    assert first.min().item() == torch.finfo(torch.bfloat16).min
    assert attn.additive_mask(attend, torch.float32).dtype == torch.float32  # another dtype: converted
    attend[0, 0, 0, 2] = True  # changed in place: the version counter invalidates the cache
    assert torch.equal(attn.additive_mask(attend, torch.bfloat16) == 0, attend)
    other = attend.clone()  # an equal but different tensor: converted anew, same values
    assert attn.additive_mask(other, torch.bfloat16) is not attn.additive_mask(attend, torch.bfloat16)
    # the probabilities are those of masked_fill: masked scores get exactly 0 after softmax
    scores = torch.randn(2, 1, 1, 3)
    a = torch.softmax(scores + attn.additive_mask(attend, torch.float32), -1)
    b = torch.softmax(scores.masked_fill(~attend, torch.finfo(torch.float32).min), -1)
    assert torch.equal(a, b)


def test_attention_drops_probabilities_and_delegates_outside_its_case():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    v = torch.eye(64)[None, None]  # the output *is* the (dropped) probability matrix
    out, _ = attn.attention(_Module(False).train(), q, k, v, None, dropout=0.5)
    probs = out.transpose(1, 2)
    assert (probs == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    # p == 0 (evaluation) is transformers' SDPA, bit for bit
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    a, _ = attn.attention(_Module(False).eval(), q, k, v, None, dropout=0.0)
    b, _ = sdpa_attention_forward(_Module(False).eval(), q, k, v, None, dropout=0.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["bert", "roberta", "electra", "gpt2", "distilbert"])
def test_model_in_training_mode_matches_sdpa_with_padding(arch, monkeypatch):
    """Padding masks and causality reach the backend: with dropout made the identity, the fast
    model in training mode computes what the SDPA model computes."""
    ref = tiny_model(arch).eval()
    fast = tiny_model(arch)
    use_fast_dropout(fast)
    fast.train()
    assert fast.config._attn_implementation == attn.ATTENTION_NAME
    monkeypatch.setattr(fd, "fast_dropout", lambda x, p: x)
    calls = []
    real_attention = attn.attention
    monkeypatch.setattr(attn, "attention", lambda *a, **k: calls.append(k["dropout"]) or real_attention(*a, **k))
    attn.register_attention()  # the patched function is the registered one
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    if arch == "gpt2":  # a decoder pools the last non-pad token: pad on the right with the pad id
        ids[1, 5:] = 1
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    assert calls and all(p > 0 for p in calls)  # the training-time path ran, in every block
    monkeypatch.undo()
    attn.register_attention()  # the real function again, for the tests after this one
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_importing_perf_registers_nothing_until_a_model_is_switched():
    """No import-time side effects: the backend is registered when use_fast_dropout switches a
    model (in a fresh process, so no earlier test has registered it already)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sftlab.perf
from sftlab.perf import ATTENTION_NAME, use_fast_dropout
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
assert ATTENTION_NAME not in AttentionInterface(), "registered on import"
assert ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS, "mask registered on import"
from test_layers import tiny_model
model = tiny_model("bert")
use_fast_dropout(model)
assert model.config._attn_implementation == ATTENTION_NAME
assert ATTENTION_NAME in AttentionInterface() and ATTENTION_NAME in ALL_MASK_ATTENTION_FUNCTIONS
print("ok")
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_callback_switches_the_lightning_modules_model_in_setup():
    from sftlab.model import TextClassifier
    from sftlab.perf import FastDropoutCallback

    module = TextClassifier("tiny", ["a", "b", "c"], model=tiny_model("bert"))
    assert any(type(m) is torch.nn.Dropout for m in module.modules())  # built without the swap
    before = {k: v.clone() for k, v in module.state_dict().items()}
    FastDropoutCallback().setup(None, module, "fit")
    assert not any(type(m) is torch.nn.Dropout for m in module.modules())
    assert any(isinstance(m, FastDropout) for m in module.model.modules())
    assert module.model.config._attn_implementation == attn.ATTENTION_NAME
    after = module.state_dict()  # no parameter or buffer changed or added
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    FastDropoutCallback().setup(None, module, "test")  # every stage; a second switch is a no-op
    assert module.model.config._attn_implementation == attn.ATTENTION_NAME
    # attention_backend=false: the dropout modules only
    plain = TextClassifier("tiny", ["a", "b", "c"], model=tiny_model("bert"))
    FastDropoutCallback(attention_backend=False).setup(None, plain, "fit")
    assert not any(type(m) is torch.nn.Dropout for m in plain.modules())
    assert plain.model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_a_compiled_model_with_the_attention_backend_takes_batches_of_any_length():
    """torch.compile (dynamic shapes) of a model on sftlab's attention backend, in train mode with
    a backward: batches of other lengths must not get an earlier batch's additive mask (its
    one-entry cache) and must give the eager model's logits."""
    from transformers import BertConfig, BertForSequenceClassification

    from sftlab.perf import use_fast_dropout

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0  # train mode, same numbers
    model = BertForSequenceClassification(cfg).train()
    use_fast_dropout(model, attention_backend=True)
    compiled = torch.compile(model, dynamic=True)
    for length, pad in ((9, 3), (14, 5), (9, 2), (20, 7)):
        ids = torch.randint(1, 50, (2, length))
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, length - pad:] = 0
        want = model(input_ids=ids, attention_mask=mask).logits
        got = compiled(input_ids=ids, attention_mask=mask).logits
        got.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
