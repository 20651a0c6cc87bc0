"""The layer map: every architecture splits into embeddings, blocks, [pooler], head, and every
parameter lands in exactly one part."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from sftlab.errors import ConfigError  # noqa: E402

NUM_BLOCKS = 3
# Tiny random models (hidden 32, vocab 100, 3 labels) of each architecture sftlab maps by rule.
TINY: dict[str, dict] = {
    "bert": dict(hidden_size=32, num_hidden_layers=NUM_BLOCKS, num_attention_heads=2, intermediate_size=37),
    "roberta": dict(hidden_size=32, num_hidden_layers=NUM_BLOCKS, num_attention_heads=2, intermediate_size=37,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "electra": dict(hidden_size=32, embedding_size=16, num_hidden_layers=NUM_BLOCKS, num_attention_heads=2,
                    intermediate_size=37),
    "distilbert": dict(dim=32, n_layers=NUM_BLOCKS, n_heads=2, hidden_dim=37),
    "xlnet": dict(d_model=32, n_layer=NUM_BLOCKS, n_head=2, d_inner=37, pad_token_id=5, bos_token_id=1,
                  eos_token_id=2),
    # a decoder classifies from the last non-pad token: it needs a pad id
    "gpt2": dict(n_embd=32, n_layer=NUM_BLOCKS, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1,
                 pad_token_id=1),
    # DeBERTa-v3 style: relative attention, no absolute positions, normalized relative table,
    # and the conv layer after the first block (all the parameters that need a deliberate home)
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=NUM_BLOCKS, num_attention_heads=2, intermediate_size=37,
                       relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                       max_relative_positions=16, norm_rel_ebd="layer_norm", conv_kernel_size=3,
                       position_biased_input=False),
}
ARCHS = list(TINY)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a busy 2-core machine) on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(model_type: str, num_blocks: int = NUM_BLOCKS, seed: int = 0, **overrides):
    """A randomly initialized tiny AutoModelForSequenceClassification of ``model_type``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kwargs = dict(TINY[model_type])
    for key in ("num_hidden_layers", "n_layers", "n_layer"):
        if key in kwargs:
            kwargs[key] = num_blocks
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, vocab_size=100, num_labels=3, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def assert_partition(model, layer_map) -> None:
    """Every parameter of ``model`` in exactly one part, under its own name."""
    expected = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for part in layer_map:
        assert part.params, f"{part.name} is empty"
        for name, p in part.params:
            assert id(p) not in seen, f"{name} is in {seen[id(p)]} and {part.name}"
            assert expected.get(id(p)) == name
            seen[id(p)] = part.name
    missing = sorted(n for i, n in expected.items() if i not in seen)
    assert not missing, f"parameters in no part: {missing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_in_exactly_one_part(arch):
    from sftlab.layers import build_layer_map

    model = tiny_model(arch)
    layer_map = build_layer_map(model)
    assert_partition(model, layer_map)
    assert layer_map.model_type == arch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_blocks", [2, 4])
def test_blocks_match_the_config_and_parts_are_ordered(arch, num_blocks):
    from sftlab.layers import build_layer_map

    model = tiny_model(arch, num_blocks=num_blocks)
    layer_map = build_layer_map(model)
    assert layer_map.num_blocks == model.config.num_hidden_layers == num_blocks
    blocks = [f"block.{i}" for i in range(num_blocks)]
    has_pooler = arch not in ("roberta", "electra", "gpt2")  # their poolers live in the head
    assert layer_map.names == ["embeddings", *blocks, *(["pooler"] if has_pooler else []), "head"]
    # depth from the top: head/pooler 0, top block 1, ..., bottom block L, embeddings L+1
    assert layer_map["head"].depth == 0
    assert [b.depth for b in layer_map.blocks] == list(range(num_blocks, 0, -1))
    assert [b.index for b in layer_map.blocks] == list(range(num_blocks))
    assert layer_map.embeddings.depth == num_blocks + 1
    assert [p.name for p in layer_map.top_blocks(2)] == [f"block.{num_blocks - 1}", f"block.{num_blocks - 2}"]
    # each block holds exactly the parameters of its module, plus: GPT-2's final norm (top
    # block) and DeBERTa's conv (applied once, after the first block)
    modules = dict(model.named_modules())
    for i, part in enumerate(layer_map.blocks):
        prefix = f"{layer_map.blocks_path}.{i}."
        own = {n for n, _ in part.params if n.startswith(prefix)}
        assert own == {prefix + n for n, _ in modules[prefix[:-1]].named_parameters()}
        extra = {n.rsplit(".", 1)[0] for n, _ in part.params if n not in own}
        if arch == "gpt2" and i == num_blocks - 1:
            assert extra == {"transformer.ln_f"}
        elif arch == "deberta-v2" and i == 0:
            assert extra == {"deberta.encoder.conv.conv", "deberta.encoder.conv.LayerNorm"}
        else:
            assert not extra


@pytest.mark.parametrize(
    "arch,param,part",
    [
        ("bert", "bert.pooler.dense.weight", "pooler"),
        ("bert", "classifier.weight", "head"),
        ("roberta", "classifier.dense.weight", "head"),
        ("electra", "electra.embeddings_project.weight", "embeddings"),
        ("distilbert", "pre_classifier.weight", "pooler"),
        ("xlnet", "transformer.mask_emb", "embeddings"),
        ("xlnet", "sequence_summary.summary.weight", "pooler"),
        ("xlnet", "logits_proj.weight", "head"),
        ("gpt2", "transformer.wte.weight", "embeddings"),
        ("gpt2", "transformer.wpe.weight", "embeddings"),
        ("gpt2", "transformer.ln_f.weight", f"block.{NUM_BLOCKS - 1}"),  # final norm: top block
        ("gpt2", "score.weight", "head"),
        ("deberta-v2", "deberta.encoder.rel_embeddings.weight", "embeddings"),
        ("deberta-v2", "deberta.encoder.LayerNorm.weight", "embeddings"),
        ("deberta-v2", "deberta.encoder.conv.conv.weight", "block.0"),
        ("deberta-v2", "pooler.dense.weight", "pooler"),
    ],
)
def test_shared_and_special_parameters_have_a_deliberate_home(arch, param, part):
    from sftlab.layers import build_layer_map

    assert build_layer_map(tiny_model(arch)).part_of(param) == part


@pytest.mark.parametrize(
    "model_type,kw",
    [
        ("deberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16)),
        ("xlm-roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)),
    ],
)
def test_other_ruled_architectures(model_type, kw):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sftlab.layers import build_layer_map

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(model_type, vocab_size=100, num_labels=3, **kw))
    layer_map = build_layer_map(model)
    assert_partition(model, layer_map)
    assert layer_map.num_blocks == 2
    if model_type == "deberta":
        assert layer_map.part_of("deberta.encoder.rel_embeddings.weight") == "embeddings"
        assert layer_map.part_of("pooler.dense.weight") == "pooler"


def test_tied_parameter_is_listed_once_under_its_first_name():
    from sftlab.layers import build_layer_map

    model = tiny_model("bert")
    # tie the pooler's dense weight to block 0's query weight (both 32 x 32)
    model.bert.pooler.dense.weight = model.bert.encoder.layer[0].attention.self.query.weight
    layer_map = build_layer_map(model)
    assert_partition(model, layer_map)
    assert layer_map.part_of("bert.encoder.layer.0.attention.self.query.weight") == "block.0"
    assert all(n != "bert.pooler.dense.weight" for n, _ in layer_map.named_parameters())


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_peft_wrapped_model_is_mapped_with_wrapper_names(arch):
    from peft import LoraConfig, get_peft_model

    from sftlab.layers import build_layer_map
    from sftlab.strategies import LORA_TARGETS

    model = get_peft_model(tiny_model(arch), LoraConfig(r=2, target_modules=LORA_TARGETS[arch],
                                                        fan_in_fan_out=arch == "gpt2"))
    layer_map = build_layer_map(model)
    assert_partition(model, layer_map)
    assert layer_map.model_type == arch and layer_map.num_blocks == NUM_BLOCKS
    for part in layer_map.blocks:
        assert any(".lora_A." in n for n, _ in part.params)
    assert all(n.startswith("base_model.model.") for n, _ in layer_map.named_parameters())
    assert layer_map.blocks_path.startswith("base_model.model.")


def test_fallback_finds_the_blocks_of_an_unknown_model_type(monkeypatch):
    from sftlab import layers

    model = tiny_model("bert")
    by_rule = layers.build_layer_map(model)
    monkeypatch.delitem(layers.RULES, "bert")
    by_fallback = layers.build_layer_map(model)
    assert [(p.name, [n for n, _ in p.params]) for p in by_fallback] == [
        (p.name, [n for n, _ in p.params]) for p in by_rule
    ]


def test_rule_with_a_missing_path_falls_back(monkeypatch):
    from sftlab import layers

    monkeypatch.setitem(layers.RULES, "gpt2", layers.Rule(blocks="no.such.blocks"))
    model = tiny_model("gpt2")
    layer_map = layers.build_layer_map(model)
    assert layer_map.num_blocks == NUM_BLOCKS
    assert_partition(model, layer_map)


def _custom_model(with_blocks: bool):
    import types

    import torch.nn as nn

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 8)
            self.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # no ModuleList

    class FooForSequenceClassification(nn.Module):
        base_model_prefix = "foo"

        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="foo")
            self.foo = Body()
            if with_blocks:
                self.foo.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
            self.classifier = nn.Linear(8, 3)

    return FooForSequenceClassification()


def test_unmappable_architecture_raises_a_config_error():
    from sftlab.layers import build_layer_map

    with pytest.raises(ConfigError) as err:
        build_layer_map(_custom_model(with_blocks=False))
    msg = str(err.value)
    assert "model_type 'foo'" in msg and "add a rule for model_type 'foo' in src/sftlab/layers.py" in msg
    assert msg.count(".") >= 1 and "\n" not in msg
    # the same module with a ModuleList of blocks is mapped by the fallback
    layer_map = build_layer_map(_custom_model(with_blocks=True))
    assert layer_map.names == ["embeddings", "block.0", "block.1", "head"]


def test_model_without_a_head_raises_a_config_error():
    from transformers import BertConfig, BertModel

    from sftlab.layers import build_layer_map

    base = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=37))
    with pytest.raises(ConfigError, match="add a rule for model_type 'bert'"):
        build_layer_map(base)
