"""The frozen prefix cache (sftlab.perf.frozen_cache): exact, leaves frozen weights alone, shared
on disk, and a run with it exports the plain model.

Exactness is checked against a live forward of the same model in eval mode (no dropout), which
is what the cache computes: the cache changes *when* the frozen layers run and that they run
without dropout, nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import assert_rows_agree, read_test_pass  # noqa: E402
from test_layers import NUM_BLOCKS, one_thread, tiny_model  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

#: every SUPPORTED architecture that test_layers can build tiny (camembert / xlm-roberta are
#: RoBERTa's classes)
ARCHS = ["bert", "roberta", "electra", "distilbert", "gpt2"]


def padded_batch(model, lengths=(9, 4, 12, 6), seed: int = 0):
    """Random rows of different lengths, right-padded with the model's pad id, with ``idx``
    in a shuffled order (so a lookup by position instead of idx would give other rows)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 100, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = model.config.pad_token_id or 0
    return {"input_ids": ids, "attention_mask": mask, "idx": torch.tensor([2, 0, 3, 1][: len(lengths)]),
            "labels": torch.arange(len(lengths)) % model.config.num_labels}


def prefix_of(model, strategy):
    from sftlab.module_tree import get_module
    from sftlab.perf.frozen_cache import frozen_depth
    from sftlab.perf.frozen_prefix import FrozenPrefix

    model = strategy.setup(model)
    layer_map = strategy.layers(model)
    return FrozenPrefix(model, get_module(model, layer_map.blocks_path), frozen_depth(strategy, layer_map))


def store_of(prefix, batch, one_by_one: bool):
    """The batch's rows computed together (same padding as the batch) or each alone, unpadded."""
    from sftlab.perf.frozen_prefix import PrefixStore, attention_mask_of

    store = PrefixStore()
    if not one_by_one:
        store.add(batch["idx"].tolist(), prefix.compute(batch), attention_mask_of(batch))
        return store
    for i in range(len(batch["idx"])):
        n = int(batch["attention_mask"][i].sum())
        row = {"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n],
               "idx": batch["idx"][i:i + 1]}
        store.add(row["idx"].tolist(), prefix.compute(row), attention_mask_of(row))
    return store


def logits(model, batch):
    from sftlab.perf.frozen_prefix import model_inputs

    return model(**model_inputs(batch)).logits


# ------------------------------------------------------------------------------ depth
def test_frozen_depth_follows_what_never_trains():
    from sftlab.perf.frozen_cache import frozen_depth
    from sftlab.strategies import BitFit, Full, Gradual, HeadOnly, Partial

    def depth(strategy):
        model = strategy.setup(tiny_model("bert"))
        return frozen_depth(strategy, strategy.layers(model))

    assert depth(HeadOnly()) == NUM_BLOCKS
    assert depth(Partial(trainable_layers=1)) == NUM_BLOCKS - 1
    assert depth(Partial(trainable_layers=NUM_BLOCKS)) == 0
    assert depth(Partial(trainable_layers=1, train_embeddings=True)) == 0  # block 0's input moves
    for strategy in (Full(), BitFit(), Gradual(initial_layers=1, unfreeze_every_steps=2)):
        assert depth(strategy) == 0, strategy.name  # gradual: the lower parts train later


# ------------------------------------------------------------------------------ (a) exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["head_only", "partial"])
def test_cached_top_equals_the_live_eval_mode_model(arch, name, monkeypatch):
    """Logits from cached prefix outputs equal the live eval-mode model's on the same batch:
    bit for bit when the cache was computed on this very batch; within fp32 rounding when each
    row was computed alone (other padding lengths change the kernels' summation order: ~1e-8 here,
    so rtol 1e-5 / atol 1e-6, far below any change a wrong row or a missing block would make).
    The frozen blocks do not run while the swap is on; after removing it the model is the plain one."""
    import torch

    from sftlab.perf.frozen_prefix import attention_mask_of
    from sftlab.strategies import HeadOnly, Partial

    strategy = HeadOnly() if name == "head_only" else Partial(trainable_layers=1)
    model = tiny_model(arch)
    prefix = prefix_of(model, strategy)
    assert prefix.depth == (NUM_BLOCKS if name == "head_only" else NUM_BLOCKS - 1)
    model.eval()
    batch = padded_batch(model)
    with torch.no_grad():
        live = logits(model, batch)
    assert (live[0] - live[1]).abs().max() > 1e-4  # rows differ: a row mix-up would show
    stores = {"same_batch": store_of(prefix, batch, False), "one_by_one": store_of(prefix, batch, True)}

    calls = []
    block_cls = type(prefix.blocks[0])
    real_forward = block_cls.forward
    monkeypatch.setattr(block_cls, "forward", lambda self, *a, **k: calls.append(self) or real_forward(self, *a, **k))
    prefix.install()
    for kind, store in stores.items():
        calls.clear()
        prefix.feed(store.gather(batch["idx"].tolist(), attention_mask_of(batch)))
        with torch.no_grad():
            cached = logits(model, batch)
        assert not any(any(c is b for b in prefix.blocks) for c in calls), "a frozen block ran"
        assert len(calls) == NUM_BLOCKS - prefix.depth  # the trainable blocks did run
        tol = {"rtol": 0, "atol": 0} if kind == "same_batch" else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(cached, live, **tol, msg=lambda m, kind=kind: f"{kind}: {m}")
    with pytest.raises(RuntimeError, match="without its batch's cached"):  # fed once, used once
        logits(model, batch)
    prefix.remove()
    with torch.no_grad():
        assert torch.equal(logits(model, batch), live)


@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_first_token_rows_give_the_same_logits_from_a_fraction_of_the_store(arch):
    """head_only under a head that reads [CLS] (BERT's pooler, the RoBERTa/ELECTRA heads): rows
    that keep only their first position give the full rows' logits bit for bit, from a store
    as many times smaller as the rows are long; a left-padded row is refused, not mis-stored."""
    import torch

    from sftlab.perf.frozen_prefix import PrefixStore, attention_mask_of
    from sftlab.strategies import HeadOnly

    model = tiny_model(arch)
    prefix = prefix_of(model, HeadOnly())
    model.eval()
    batch = padded_batch(model)
    mask = attention_mask_of(batch)
    hidden = prefix.compute(batch)
    full, first = PrefixStore(), PrefixStore(first_only=True)
    full.add(batch["idx"].tolist(), hidden, mask)
    first.add(batch["idx"].tolist(), hidden, mask)
    assert first.nbytes * int(mask.sum()) == full.nbytes * len(batch["idx"])  # 1 row instead of length
    prefix.install()
    out = {}
    for kind, store in (("full", full), ("first", first)):
        prefix.feed(store.gather(batch["idx"].tolist(), mask))
        with torch.no_grad():
            out[kind] = logits(model, batch)
    prefix.remove()
    assert torch.equal(out["first"], out["full"])
    left = mask.flip(1)
    with pytest.raises(RuntimeError, match="first position is padding"):
        PrefixStore(first_only=True).add(batch["idx"].tolist(), hidden, left)


def test_a_head_only_run_keeps_first_tokens_unless_the_head_reads_more(compose, tmp_path):
    """The default head (MiniLM-like BERT: the pooler reads [CLS]) caches first tokens only and
    says so; mean pooling reads every token, so every token is cached (a larger store)."""
    cls = run(compose, tmp_path / "cls", "strategy=head_only")
    mean = run(compose, tmp_path / "mean", "strategy=head_only", "model.pooling=mean")
    assert cls["frozen_cache_first_token_only"] is True and mean["frozen_cache_first_token_only"] is False
    assert 0 < cls["frozen_cache_mb"] * 4 < mean["frozen_cache_mb"]
    assert cls["embedding_grad_rows"] is False  # frozen embeddings: the kept buffer never ran


# ------------------------------------------------------------------------------ (b) a step
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a_step_on_the_cache_trains_the_top_and_leaves_the_frozen_weights_bit_identical(arch):
    """In eval mode (no dropout) the cached step's gradients are the live step's; in train mode
    AdamW moves the head and the top block and nothing of the frozen prefix."""
    import torch
    import torch.nn.functional as F

    from sftlab.perf.frozen_prefix import attention_mask_of
    from sftlab.strategies import Partial

    strategy = Partial(trainable_layers=1)
    model = tiny_model(arch)
    prefix = prefix_of(model, strategy)
    batch = padded_batch(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    store = store_of(prefix, batch, one_by_one=False)

    def grads(cached: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if cached:
            prefix.feed(store.gather(batch["idx"].tolist(), attention_mask_of(batch)))
        F.cross_entropy(logits(model, batch), batch["labels"]).backward()
        return {n: p.grad.clone() for n, p in trainable}

    model.eval()
    live = grads(False)
    prefix.install()
    cached = grads(True)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for n in live:
        torch.testing.assert_close(cached[n], live[n], rtol=0, atol=0, msg=n)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2, weight_decay=0.01)
    model.train()
    for _ in range(2):
        grads(True)
        optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, _ in trainable}
    head = strategy.layers(model).head.params[0][0]
    assert head in moved


# ------------------------------------------------------------------------------ (c) the disk cache
def run(compose, out: Path, *overrides: str) -> dict:
    import torch

    from sftlab.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose(*overrides, "export=false", "test=false", out=out))
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "metrics.json").read_text())


def test_the_disk_cache_is_reused_and_keyed_by_depth_and_max_length(compose, tmp_path, monkeypatch):
    """A second identical run computes no prefix row (it loads train + validation) and ends with
    the same metrics; another max_length or another frozen depth gets entries of its own."""
    from sftlab.perf.frozen_prefix import FrozenPrefix

    calls = []
    compute = FrozenPrefix.compute
    monkeypatch.setattr(FrozenPrefix, "compute", lambda self, batch: calls.append(1) or compute(self, batch))
    frozen = tmp_path / "cache" / "frozen"

    def entries() -> set[str]:
        return {p.name for p in frozen.glob("*.pt")}

    first = run(compose, tmp_path / "a", "strategy=head_only")
    assert first["frozen_cache_blocks"] == 2 and first["frozen_cache_rows_computed"] == 48 + 24
    assert calls and len(entries()) == 2  # train and validation
    calls.clear()
    second = run(compose, tmp_path / "b", "strategy=head_only")
    assert calls == [] and second["frozen_cache_rows_computed"] == 0
    assert second["frozen_cache_rows_loaded"] == 48 + 24 and len(entries()) == 2
    for key in ("val/acc", "val/loss"):
        assert second[key] == first[key], key

    seen = entries()
    run(compose, tmp_path / "c", "strategy=head_only", "model.max_length=24")
    assert len(entries() - seen) == 2
    seen = entries()
    partial = run(compose, tmp_path / "d", "strategy=partial", "strategy.trainable_layers=1",
                  "strategy.cache_frozen=true")
    assert partial["frozen_cache_blocks"] == 1 and len(entries() - seen) == 2

    off = run(compose, tmp_path / "e", "strategy=head_only", "strategy.cache_frozen=false")
    assert off["frozen_cache_blocks"] == 0


def test_other_weights_at_the_same_path_get_their_own_entries(compose, tmp_path, tiny_model_dir):
    """The key hashes the frozen weights themselves: a checkpoint retrained (here: re-drawn) at
    the same path computes its prefix again instead of loading the old one's."""
    import shutil

    import torch
    from transformers import BertModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    first = run(compose, tmp_path / "a", "strategy=head_only", f"model.name_or_path={model_dir}")
    assert first["frozen_cache_rows_computed"] == 48 + 24
    torch.manual_seed(1)
    BertModel(BertModel.config_class.from_pretrained(model_dir)).save_pretrained(model_dir)
    second = run(compose, tmp_path / "b", "strategy=head_only", f"model.name_or_path={model_dir}")
    assert second["frozen_cache_rows_computed"] == 48 + 24 and second["frozen_cache_rows_loaded"] == 0
    assert len(list((tmp_path / "cache" / "frozen").glob("*.pt"))) == 4


# ------------------------------------------------------------------------------ (d) end to end
@pytest.mark.parametrize("name", ["head_only", "partial"])
def test_debug_fast_runs_with_the_cache_and_exports_the_plain_model(compose, tmp_path, toy_run, toy_data, name):
    """``python train.py strategy=<name> debug=fast`` (composed as the CLI does, on the toy
    model; partial with ``strategy.cache_frozen=true``, its default is off): the cache is on, and the exported folder, loaded by transformers alone, predicts
    what the run's test pass (on cached inputs) predicted, row by row."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sftlab.train import train

    out = tmp_path / "run"
    cfg = compose(f"strategy={name}", "debug=fast", f"model.name_or_path={toy_run.run / 'model'}",
                  f"data.train_file={toy_data['train']}", f"data.validation_file={toy_data['validation']}",
                  f"data.test_file={toy_data['test']}", "model.max_length=32",
                  *(["strategy.trainable_layers=1", "strategy.cache_frozen=true"] if name == "partial" else []),
                  out=out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["frozen_cache_blocks"] == (2 if name == "head_only" else 1)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    want = read_test_pass(out, toy_data["test"])
    with torch.inference_mode():
        enc = tok(want.texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert_rows_agree(names, [names[i] for i in probs.argmax(-1).tolist()], probs.tolist(), want)
