"""Fine-tuning strategies on tiny random models of every architecture.

What trains is exactly what each strategy promises; frozen weights stay bit-identical under
AdamW (weight decay included) and get no optimizer state; discriminative LRs are exact;
gradual unfreezing happens at the configured optimizer steps under a real Lightning run, with
the LR scheduler governing the late groups, in one process and (slow) under 2-process DDP;
LoRA exports a merged plain transformers model that predicts the same.

Also a script: ``python tests/test_strategies.py --ddp-worker OUT`` is one rank of the DDP run
(Lightning relaunches the same command line for rank 1).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sftlab.errors import ConfigError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_layers import ARCHS, NUM_BLOCKS, one_thread, tiny_model  # noqa: E402,F401

CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy"
LR = 1e-2

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")



def make(name: str, **kw):
    from sftlab import strategies as S

    classes = {"full": S.Full, "head_only": S.HeadOnly, "partial": S.Partial, "gradual": S.Gradual,
               "discriminative": S.Discriminative, "bitfit": S.BitFit, "lora": S.Lora}
    defaults = {"partial": {"trainable_layers": 1}, "gradual": {"initial_layers": 1, "unfreeze_every_steps": 2},
                "lora": {"r": 2}}
    if name not in classes:  # a preset of a class (discriminative_ulmfit): built from its YAML
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        return instantiate(OmegaConf.load(CONF / f"{name}.yaml"), **kw)
    return classes[name](**{**defaults.get(name, {}), **kw})


# the README's eight strategies (conf/strategy/*.yaml; test_expected_yaml_set keeps them in step)
STRATEGIES = ["full", "head_only", "partial", "gradual", "discriminative", "discriminative_ulmfit", "bitfit",
              "lora"]


def expected_trainable(name: str, layer_map) -> set[str]:
    """The parameter names that train from step 0, written from each strategy's spec."""
    out = set()
    top = f"block.{layer_map.num_blocks - 1}"
    assert {n.removeprefix("base_model.model.") for n in layer_map.inert} == (
        {"transformer.mask_emb"} if layer_map.model_type == "xlnet" else set())
    for part in layer_map:
        for n, _ in part.params:
            if part.kind in ("head", "pooler"):
                ok = True  # every strategy trains head and pooler (train_pooler defaults to true)
            elif name in ("full", "discriminative", "discriminative_ulmfit"):
                ok = True
            elif name == "head_only":
                ok = False
            elif name in ("partial", "gradual"):  # top 1 block (trainable_layers / initial_layers)
                ok = part.name == top
            elif name == "bitfit":
                ok = n.rsplit(".", 1)[-1].endswith("bias")
            elif name == "lora":
                ok = ".lora_A." in n or ".lora_B." in n
            if ok and n not in layer_map.inert:  # XLNet's mask_emb: unused, never trained
                out.add(n)
    return out


def batch(model, n: int = 4, seq: int = 8, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, seq), generator=g)
    labels = torch.randint(0, model.config.num_labels if hasattr(model, "config") else 3, (n,), generator=g)
    return ids, labels


def forward(model, ids):
    """Logits; XLNet gets segment ids as its tokenizer gives them (else r_s_bias/seg_embed idle)."""
    import torch

    extra = {"token_type_ids": torch.zeros_like(ids)} if model.config.model_type == "xlnet" else {}
    return model(input_ids=ids, **extra).logits


def adamw(groups, weight_decay: float = 0.01):
    import torch

    return torch.optim.AdamW(
        [{"params": [p for _, p in g["params"]], "lr": g["lr"], "name": g["name"]} for g in groups],
        weight_decay=weight_decay,
    )


def train_steps(model, optimizer, steps: int = 3) -> None:
    import torch.nn.functional as F

    model.train()
    for s in range(steps):
        ids, labels = batch(model, seed=s)
        loss = F.cross_entropy(forward(model, ids), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("yaml_file", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_strategy_yaml_instantiates(yaml_file):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sftlab.strategies import Strategy

    cfg = OmegaConf.load(yaml_file)
    strategy = instantiate(cfg)
    assert isinstance(strategy, Strategy)
    assert strategy.name == yaml_file.stem  # metrics.json / reports group runs by this name
    assert 0 < strategy.lr_decay <= 1
    assert cfg._target_.startswith("sftlab.strategies.")
    # every strategy takes lr_decay, so sweeps can set strategy.lr_decay under any of them
    assert instantiate(cfg, lr_decay=0.5).lr_decay == 0.5


def test_expected_yaml_set():
    assert {p.stem for p in CONF.glob("*.yaml")} == {
        "full", "head_only", "partial", "gradual", "discriminative", "discriminative_ulmfit", "bitfit", "lora"}


def test_discriminative_ulmfit_is_the_same_class_with_1_over_2_6():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "discriminative_ulmfit.yaml")
    assert cfg._target_ == "sftlab.strategies.Discriminative"
    assert cfg.lr_decay == pytest.approx(1 / 2.6, abs=1e-4)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("full", {"lr_decay": 0}, r"strategy.lr_decay must be > 0.0 and <= 1.0, got 0"),
        ("full", {"lr_decay": 1.5}, "strategy.lr_decay"),
        ("gradual", {"unfreeze_every": 0}, "strategy.unfreeze_every must be > 0.0"),
        ("gradual", {"layers_per_step": 0}, "strategy.layers_per_step must be >= 1"),
        ("gradual", {"unfreeze_every_steps": 1.5}, "strategy.unfreeze_every_steps must be an integer"),
        ("lora", {"r": 0}, "strategy.r must be >= 1"),
        ("partial", {"trainable_layers": "two"}, "strategy.trainable_layers must be an integer"),
    ],
)
def test_bad_values_raise_one_sentence(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        make(name, **kw)



def test_the_matrix_covers_every_strategy_the_readme_lists():
    """The architecture x strategy tests below run every conf/strategy preset, as the YAML has it."""
    assert sorted(STRATEGIES) == sorted(p.stem for p in CONF.glob("*.yaml"))
    ulmfit = make("discriminative_ulmfit")
    assert ulmfit.name == "discriminative_ulmfit" and ulmfit.lr_decay == pytest.approx(1 / 2.6, abs=1e-4)


# ------------------------------------------------------------------------------ what trains
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_trainable_set_and_frozen_weights_stay_bit_identical(arch, name):
    """setup freezes exactly what the strategy says; AdamW (with weight decay) leaves frozen
    weights bit-identical and without state, and moves every weight that trains."""
    import torch

    from sftlab.layers import build_layer_map

    strategy = make(name)
    model = strategy.setup(tiny_model(arch))
    layer_map = build_layer_map(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(name, layer_map)

    groups = strategy.param_groups(model, LR)
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)) and set(names) <= set(layer_map.names)
    in_groups = {n for g in groups for n, _ in g["params"]}
    if name == "gradual":  # later parts are in the optimizer from the start (see Gradual)
        assert trainable < in_groups
        assert in_groups == {n for n, _ in layer_map.named_parameters()} - layer_map.inert
    else:  # never-trained parts are not in the optimizer at all
        assert in_groups == trainable

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = adamw(groups)
    train_steps(model, optimizer)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
            assert p.grad is None
            assert not optimizer.state.get(p), f"{n} is frozen but has optimizer state"


@pytest.mark.parametrize("name", STRATEGIES)
def test_describe_rows(name):
    strategy = make(name)
    model = strategy.setup(tiny_model("bert"))
    rows = strategy.describe(model, LR)
    assert [r["part"] for r in rows] == ["embeddings", "block.0", "block.1", "block.2", "pooler", "head"]
    assert all(set(r) == {"part", "params", "trainable", "lr"} for r in rows)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    head = rows[-1]
    assert head["trainable"] is True and head["lr"] == LR
    emb = rows[0]["trainable"]
    expected = {"full": True, "discriminative": True, "discriminative_ulmfit": True, "head_only": False,
                "partial": False,
                "gradual": "from step 6", "bitfit": "biases (32)", "lora": False}[name]
    assert emb == expected
    if name == "bitfit":
        assert rows[1]["trainable"].startswith("biases (")
    if name == "lora":
        assert rows[1]["trainable"].startswith("adapters (")
    if not emb:
        assert rows[0]["lr"] == "-"


def test_trainable_params_counts():
    from sftlab.layers import count_params as trainable_params

    model = make("head_only").setup(tiny_model("bert"))
    trainable, total = trainable_params(model)
    assert trainable == 32 * 32 + 32 + 32 * 3 + 3  # pooler + head
    assert total == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ LRs
@pytest.mark.parametrize("arch", ARCHS)
def test_discriminative_lrs_are_lr_times_decay_to_the_depth(arch):
    strategy = make("discriminative", lr_decay=0.8)
    model = strategy.setup(tiny_model(arch))
    groups = {g["name"]: g["lr"] for g in strategy.param_groups(model, LR)}
    L = NUM_BLOCKS
    assert groups["head"] == LR
    if "pooler" in groups:
        assert groups["pooler"] == LR
    for i in range(L):
        assert groups[f"block.{i}"] == LR * 0.8 ** (L - i)  # top block: LR * 0.8
    assert groups["embeddings"] == LR * 0.8 ** (L + 1)  # the lowest rate
    assert groups[f"block.{L - 1}"] == pytest.approx(LR * 0.8)
    # the optimizer keeps them (one torch group per part here)
    assert [g["lr"] for g in adamw(strategy.param_groups(model, LR)).param_groups] == list(groups.values())


def test_discriminative_default_decay_is_sun_et_al():
    from sftlab.strategies import Discriminative

    assert Discriminative().lr_decay == 0.95


def test_lr_decay_composes_with_gradual_and_partial():
    g = make("gradual", lr_decay=0.9)
    model = g.setup(tiny_model("bert"))
    lrs = {x["name"]: x["lr"] for x in g.param_groups(model, LR)}
    assert lrs["block.0"] == LR * 0.9 ** NUM_BLOCKS and lrs["head"] == LR
    p = make("partial", trainable_layers=2, lr_decay=0.5)
    model = p.setup(tiny_model("bert"))
    assert {x["name"]: x["lr"] for x in p.param_groups(model, LR)} == {
        "block.1": LR * 0.25, "block.2": LR * 0.5, "pooler": LR, "head": LR}


# ------------------------------------------------------------------------------ partial
@pytest.mark.parametrize("k", [NUM_BLOCKS + 1, 12, -1])
def test_partial_with_too_many_layers_is_a_config_error(k):
    with pytest.raises(ConfigError) as err:
        make("partial", trainable_layers=k).setup(tiny_model("distilbert"))
    assert str(err.value) == (
        f"strategy.trainable_layers={k} but distilbert has {NUM_BLOCKS} blocks; choose 0..{NUM_BLOCKS}.")


@pytest.mark.parametrize("k", [0, NUM_BLOCKS])
def test_partial_extremes(k):
    model = make("partial", trainable_layers=k, train_embeddings=k > 0).setup(tiny_model("bert"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if k == 0:
        assert all(not n.startswith(("bert.encoder", "bert.embeddings")) for n, p in model.named_parameters()
                   if p.requires_grad)
    else:
        assert not frozen


# ------------------------------------------------------------------------------ BitFit / LoRA
def test_bitfit_strict_variant_trains_only_the_pooler_bias():
    model = make("bitfit", train_pooler=False).setup(tiny_model("bert"))
    assert not model.bert.pooler.dense.weight.requires_grad and model.bert.pooler.dense.bias.requires_grad
    assert model.classifier.weight.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_export_merges_adapters_into_a_plain_model(arch):
    import torch

    strategy = make("lora")
    model = strategy.setup(tiny_model(arch))
    assert type(model).__module__.startswith("peft")
    train_steps(model, adamw(strategy.param_groups(model, LR)), steps=3)  # B != 0 now
    ids, _ = batch(model, seed=9)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = strategy.export_model(model)
    merged.eval()
    assert type(merged).__module__.startswith("transformers.")
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert sorted(merged.state_dict()) == sorted(tiny_model(arch).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        # the adapter model is left intact (export works on a copy)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_lora_merged_export_round_trips_through_save_pretrained(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    strategy = make("lora")
    model = strategy.setup(tiny_model("bert"))
    train_steps(model, adamw(strategy.param_groups(model, LR)), steps=2)
    merged = strategy.export_model(model).eval()
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, _ = batch(model, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_lora_target_modules_override_and_errors():
    model = make("lora", target_modules=["query", "key", "value"]).setup(tiny_model("bert"))
    assert any(".key.lora_A." in n for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="strategy.target_modules"):
        make("lora", target_modules=["no_such_module"]).setup(tiny_model("bert"))


def test_non_lora_export_is_identity():
    model = make("full").setup(tiny_model("bert"))
    assert make("full").export_model(model) is model


# ------------------------------------------------------------------------------ gradual
def test_gradual_stages_and_schedule():
    g = make("gradual", initial_layers=0, layers_per_step=2, unfreeze_every=0.5, unfreeze_every_steps=None)
    g.setup(tiny_model("bert", num_blocks=5))
    # stage 1: blocks 4, 3; stage 2: blocks 2, 1; stage 3: block 0; stage 4: embeddings
    assert g.unfreeze_steps(steps_per_epoch=10) == {
        "embeddings": 20, "block.0": 15, "block.1": 10, "block.2": 10, "block.3": 5, "block.4": 5,
        "pooler": 0, "head": 0}
    assert g.num_stages() == 4
    # a fraction of an epoch rounds to optimizer steps, at least 1
    assert g.interval(steps_per_epoch=3) == 2 and g.interval(steps_per_epoch=1) == 1
    g2 = make("gradual", unfreeze_embeddings=False, unfreeze_every_steps=4)
    model = g2.setup(tiny_model("bert"))
    assert "embeddings" not in g2.unfreeze_steps()
    assert "embeddings" not in {x["name"] for x in g2.param_groups(model, LR)}


def test_gradual_initial_layers_beyond_the_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"strategy.initial_layers=9 but bert has 3 blocks; choose 0..3."):
        make("gradual", initial_layers=9).setup(tiny_model("bert"))


def _tiny_module(arch: str, strategy, total_steps: int, lr: float = LR, num_blocks: int = 4):
    """A minimal LightningModule: the strategy's groups, AdamW with weight decay, LambdaLR."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.strategy = strategy
            self.model = strategy.setup(tiny_model(arch, num_blocks=num_blocks))

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            return F.cross_entropy(forward(self.model, ids), labels)

        def configure_optimizers(self):
            opt = adamw(self.strategy.param_groups(self.model, lr))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Tiny()


def _loader(n: int = 32, batch_size: int = 4, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randint(3, 100, (n, 8), generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _recorder():
    """A callback recording, per optimizer step, which parts got a gradient, each group's LR,
    optimizer state, and each part's weights after the step."""
    import lightning.pytorch as pl
    import torch

    from sftlab.layers import build_layer_map

    class Recorder(pl.Callback):
        def __init__(self):
            self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
            self.grads: dict[int, set[str]] = {}
            self.state: dict[int, set[str]] = {}
            self.lrs: dict[int, dict[str, float]] = {}
            self.requires_grad: dict[int, set[str]] = {}

        def _snap(self, pl_module) -> dict[str, torch.Tensor]:
            return {part.name: torch.cat([p.detach().flatten().clone() for _, p in part.params])
                    for part in build_layer_map(pl_module.model)}

        def on_train_start(self, trainer, pl_module):
            self.map = build_layer_map(pl_module.model)
            self.snapshots[0] = self._snap(pl_module)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = trainer.global_step
            self.grads[step] = {part.name for part in self.map if any(p.grad is not None for _, p in part.params)}
            self.requires_grad[step] = {part.name for part in self.map
                                        if all(p.requires_grad for _, p in part.params)}
            self.state[step] = {part.name for part in self.map if any(optimizer.state.get(p) for _, p in part.params)}
            self.lrs[step] = {g["name"]: g["lr"] for g in optimizer.param_groups}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.snapshots.setdefault(trainer.global_step, self._snap(pl_module))

    return Recorder()


def _check_gradual_run(rec, schedule: dict[str, int], base_lrs: dict[str, float], total_steps: int,
                       steps_run: int) -> None:
    import torch

    for part, first in schedule.items():
        trained_at = [s for s in sorted(rec.grads) if part in rec.grads[s]]
        if first < steps_run:
            # the first optimizer step with a gradient for this part is exactly the configured one
            assert trained_at and trained_at[0] == first, (part, trained_at, first)
            assert trained_at == list(range(first, steps_run))
        else:
            assert not trained_at
        for s in range(min(first, steps_run)):
            assert part not in rec.state[s], f"{part} has optimizer state before step {first}"
        # weights: bit-identical up to and including the snapshot before its first step, then moving
        for s, snap in rec.snapshots.items():
            if s <= first:
                assert torch.equal(snap[part], rec.snapshots[0][part]), (part, s)
        if first < steps_run:
            assert not torch.equal(rec.snapshots[first + 1][part], rec.snapshots[0][part]), part
        # the LR scheduler governs the group from step 0: at its unfreeze step it runs at
        # base_lr * lambda(step), not at its base LR
        for s in range(steps_run):
            assert rec.lrs[s][part] == pytest.approx(base_lrs[part] * (1.0 - s / total_steps), rel=1e-12)


def test_gradual_unfreezes_at_exact_steps_under_a_lightning_run():
    import lightning.pytorch as pl

    # 8 batches an epoch, 2 per optimizer step -> 4 steps an epoch; every half epoch -> 2 steps
    total = 12
    strategy = make("gradual", initial_layers=0, unfreeze_every=0.5, unfreeze_every_steps=None,
                    layers_per_step=1, lr_decay=0.9)
    module = _tiny_module("bert", strategy, total)
    callbacks = strategy.callbacks()
    rec = _recorder()
    trainer = pl.Trainer(max_steps=total, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         num_sanity_val_steps=0, callbacks=[*callbacks, rec])
    # frozen at construction (before any Trainer): only head + pooler train
    assert {n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad} == {"bert", "classifier"}
    assert all(not p.requires_grad for n, p in module.model.named_parameters() if n.startswith("bert.encoder"))
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == total

    assert strategy.steps_per_epoch == 4
    schedule = strategy.unfreeze_steps()
    assert schedule == {"head": 0, "pooler": 0, "block.3": 2, "block.2": 4, "block.1": 6, "block.0": 8,
                        "embeddings": 10}
    base = {g["name"]: g["lr"] for g in strategy.param_groups(module.model, LR)}
    assert base["block.0"] == LR * 0.9 ** 4
    _check_gradual_run(rec, schedule, base, total, steps_run=total)
    # single process: frozen parts do not even require grad (no backward through them)
    assert "block.0" not in rec.requires_grad[7] and "block.0" in rec.requires_grad[8]
    assert trainer.callback_metrics["strategy/unfrozen_blocks"] == 4
    assert rows_say_from_step(strategy.describe(module.model, LR))


def rows_say_from_step(rows) -> bool:
    later = {r["part"]: r["trainable"] for r in rows}
    return later["block.3"] == "from step 2" and later["embeddings"] == "from step 10"


def test_gradual_with_initial_layers_and_steps():
    import lightning.pytorch as pl

    total = 6
    strategy = make("gradual", initial_layers=2, unfreeze_every_steps=3, layers_per_step=2,
                    unfreeze_embeddings=False)
    module = _tiny_module("gpt2", strategy, total)
    rec = _recorder()
    trainer = pl.Trainer(max_steps=total, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[*strategy.callbacks(), rec])
    trainer.fit(module, train_dataloaders=_loader())
    schedule = strategy.unfreeze_steps()
    assert schedule == {"head": 0, "block.3": 0, "block.2": 0, "block.1": 3, "block.0": 3}
    base = {g["name"]: g["lr"] for g in strategy.param_groups(module.model, LR)}
    _check_gradual_run(rec, schedule, base, total, steps_run=total)
    # never-unfrozen embeddings: no gradient, no change, no optimizer group
    assert all("embeddings" not in g for g in rec.grads.values())
    assert "embeddings" not in rec.lrs[0]


# ------------------------------------------------------------------------------ DDP (slow)
DDP_TOTAL = 8


def ddp_worker(out: Path) -> None:
    """One rank: 4-block BERT, gradual every 2 steps, 8 steps, per-rank data shards."""
    import lightning.pytorch as pl
    import torch

    torch.set_num_threads(1)
    pl.seed_everything(0)
    strategy = make("gradual", initial_layers=0, unfreeze_every_steps=2, layers_per_step=1)
    module = _tiny_module("bert", strategy, DDP_TOTAL)
    rec = _recorder()
    unfreezing = strategy.callbacks()[0]
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=DDP_TOTAL, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[unfreezing, rec])
    trainer.fit(module, train_dataloaders=_loader(n=64))
    torch.save({"rank": trainer.global_rank, "snapshots": rec.snapshots, "grads": rec.grads, "state": rec.state,
                "lrs": rec.lrs, "schedule": strategy.unfreeze_steps(),
                "base": {g["name"]: g["lr"] for g in strategy.param_groups(module.model, LR)},
                "distributed": unfreezing.distributed, "world_size": trainer.world_size},
               out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_gradual_under_two_process_ddp(tmp_path):
    import torch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ddp-worker", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["rank"] == 0 and r1["rank"] == 1 and r0["distributed"] and r0["world_size"] == 2
    schedule = r0["schedule"]
    assert schedule == {"embeddings": 10, "block.0": 8, "block.1": 6, "block.2": 4, "block.3": 2,
                        "pooler": 0, "head": 0}
    for rec in (r0, r1):
        rec_obj = type("Rec", (), rec)
        _check_gradual_run(rec_obj, schedule, rec["base"], DDP_TOTAL, steps_run=DDP_TOTAL)
    # the replicas agree on every part after every step (frozen and trained alike)
    assert sorted(r0["snapshots"]) == sorted(r1["snapshots"]) == list(range(DDP_TOTAL + 1))
    for s in r0["snapshots"]:
        for part, w in r0["snapshots"][s].items():
            assert torch.equal(w, r1["snapshots"][s][part]), (s, part)
    # block.0 (step 8) and embeddings (step 10) never started: identical to the start on both ranks
    for part in ("block.0", "embeddings"):
        assert torch.equal(r0["snapshots"][DDP_TOTAL][part], r0["snapshots"][0][part])


if __name__ == "__main__" and "--ddp-worker" in sys.argv:
    ddp_worker(Path(sys.argv[sys.argv.index("--ddp-worker") + 1]))
