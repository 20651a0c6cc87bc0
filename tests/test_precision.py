"""trainer.precision=auto from measured matmul rates (cached per machine), and MFU: the model
FLOPs of a training step counted by hand and by torch's FLOP counter, and train_mfu in a run."""

from __future__ import annotations

import json

import pytest
import torch

from sftlab.perf import precision as prec
from sftlab.perf.flops import FlopCounter, batch_shape, step_flops

FP32, BF16, FP16 = "32-true", "bf16-mixed", "16-mixed"


# ----------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("rates,half,want", [
    ({FP32: 318.0, BF16: 169.0}, BF16, FP32),    # Xeon with avx512_bf16, no AMX (issue #16)
    ({FP32: 135.0, BF16: 385.0}, BF16, BF16),    # EPYC with fast bf16 (README)
    ({FP32: 100.0, BF16: 105.0}, BF16, FP32),    # faster, but not by the margin
    ({FP32: 100.0, BF16: 110.0}, BF16, BF16),    # exactly the margin
    ({FP32: 14e3, BF16: 60e3, FP16: 61e3}, BF16, BF16),  # a GPU with native bf16: bf16, not fp16
    ({FP32: 14e3, FP16: 110e3}, FP16, FP16),     # V100/T4: fp16 with a scaler
    ({FP32: 10e3, FP16: 9e3}, FP16, FP32),       # a GPU whose fp16 is no faster
    ({FP32: 100.0}, BF16, FP32),                 # half not measured
])
def test_choose_precision_picks_half_only_when_clearly_faster(rates, half, want):
    assert prec.choose_precision(rates, half=half) == want


def test_choose_precision_margin_is_a_parameter():
    rates = {FP32: 100.0, BF16: 130.0}
    assert prec.choose_precision(rates, min_speedup=1.2) == BF16
    assert prec.choose_precision(rates, min_speedup=1.5) == FP32


def test_candidates_per_device():
    assert prec.candidates({"device": "cpu"}) == ([FP32, BF16], BF16)
    assert prec.candidates({"device": "cuda", "native_bf16": True}) == ([FP32, BF16, FP16], BF16)
    assert prec.candidates({"device": "cuda", "native_bf16": False}) == ([FP32, FP16], FP16)


# ----------------------------------------------------------------------------- the cache
@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, num_labels=3, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


class Measurements(list):
    """The calls of the fake measuring function; ``rates`` is what it returns."""

    rates = {FP32: 300.0, BF16: 150.0}


@pytest.fixture
def fake_rates(monkeypatch):
    """measure_rates replaced: no timing in these tests, and every measurement is recorded."""
    calls = Measurements()

    def measure(shapes, tokens, precisions, device="cpu", budget_s=1.0, **_):
        calls.append({"shapes": shapes, "tokens": tokens, "precisions": precisions})
        return {p: calls.rates[p] for p in precisions}

    monkeypatch.setattr(prec, "measure_rates", measure)
    return calls


def test_block_shapes_are_one_blocks_matmuls(tiny_bert):
    # q, k, v, attention output (32x32), intermediate 32->37, output 37->32
    assert sorted(prec.block_shapes(tiny_bert)) == sorted([(32, 32)] * 4 + [(32, 37), (37, 32)])


def test_calibration_is_measured_once_per_machine_and_cached(tmp_path, tiny_bert, fake_rates, monkeypatch):
    first = prec.calibrate(tiny_bert, "cpu", tokens=256, cache_dir=tmp_path)
    assert len(fake_rates) == 1 and not first.cached
    assert fake_rates[0]["precisions"] == [FP32, BF16] and fake_rates[0]["tokens"] == 256
    saved = json.loads((tmp_path / "calibration" / "precision.json").read_text())
    (entry,) = saved.values()
    assert entry["rates"] == {FP32: 300.0, BF16: 150.0}
    assert entry["machine"]["threads"] == torch.get_num_threads() and entry["machine"]["torch"] == torch.__version__

    fake_rates.rates = {FP32: 1.0, BF16: 2.0}  # a second measurement would give other numbers
    second = prec.calibrate(tiny_bert, "cpu", tokens=256, cache_dir=tmp_path)
    assert len(fake_rates) == 1 and second.cached  # read, not measured
    assert second.rates == first.rates

    # another machine (thread count), other shapes, or recalibrate=true: measured again
    threads = torch.get_num_threads()
    monkeypatch.setattr(prec, "machine", lambda d: {**prec.cpu_info(), "device": d, "torch": torch.__version__,
                                                    "threads": threads + 1})
    assert not prec.calibrate(tiny_bert, "cpu", tokens=256, cache_dir=tmp_path).cached
    assert not prec.calibrate(tiny_bert, "cpu", tokens=512, cache_dir=tmp_path).cached
    again = prec.calibrate(tiny_bert, "cpu", tokens=512, cache_dir=tmp_path, recalibrate=True)
    assert len(fake_rates) == 4 and not again.cached and again.rates == {FP32: 1.0, BF16: 2.0}
    assert len(json.loads((tmp_path / "calibration" / "precision.json").read_text())) == 3


def test_measure_rates_returns_positive_rates_per_precision():
    """The real measurement, on tiny shapes (no timing asserted: only that it measured)."""
    rates = prec.measure_rates([(16, 16), (16, 24)], tokens=32, precisions=[FP32, BF16], budget_s=0.05)
    assert set(rates) == {FP32, BF16} and all(r > 0 for r in rates.values())


@pytest.mark.parametrize("requested,rates,want", [
    ("auto", {FP32: 318.0, BF16: 169.0}, FP32),
    ("auto", {FP32: 135.0, BF16: 385.0}, BF16),
    ("32-true", {FP32: 135.0, BF16: 385.0}, FP32),  # forced: used as given, still calibrated
])
def test_resolve_precision_sets_the_trainer_precision(compose, fake_rates, requested, rates, want):
    fake_rates.rates = rates
    cfg = compose(f"trainer.precision={requested}")
    from sftlab.config import instantiate

    module = instantiate(cfg.model, label_names=["a", "b"], strategy=None, optimizer=None, scheduler=None)
    cal = prec.resolve_precision(cfg, module.model)
    assert cfg.trainer.precision == want == cal.precision
    assert cal.metrics() == {"precision": want, f"calibration/gflops_{FP32}": rates[FP32],
                             f"calibration/gflops_{BF16}": rates[BF16]}
    assert cal.peak_gflops() == rates[want]
    assert fake_rates[0]["tokens"] == cfg.data.batch_size * cfg.model.max_length // 2


def test_other_ddp_ranks_take_rank_zeros_choice(compose, fake_rates, monkeypatch):
    """Lightning starts DDP's other ranks with fewer threads each: they must not measure (and
    maybe choose) for themselves, but train in rank 0's precision."""
    from sftlab.config import instantiate

    monkeypatch.setenv(prec._HANDOFF, "")  # restored after the test (rank 0 sets it)
    fake_rates.rates = {FP32: 135.0, BF16: 385.0}
    cfg = compose("trainer.precision=auto")
    model = instantiate(cfg.model, label_names=["a", "b"], strategy=None, optimizer=None, scheduler=None).model
    assert prec.resolve_precision(cfg, model).precision == BF16
    fake_rates.rates = {FP32: 318.0, BF16: 169.0}  # what rank 1 would measure
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    cfg1 = compose("trainer.precision=auto", "perf.precision.recalibrate=true")
    other = prec.resolve_precision(cfg1, model)
    assert other.precision == cfg1.trainer.precision == BF16 and len(fake_rates) == 1
    assert other.peak_gflops() == 385.0


def test_precision_calibration_off_means_fp32(compose, fake_rates):
    cfg = compose("perf.precision.enable=false")
    assert prec.resolve_precision(cfg, None) is None
    assert cfg.trainer.precision == FP32 and fake_rates == []


def test_config_says_auto_and_composes_without_measuring(compose):
    assert compose(tiny=False).trainer.precision == "auto"


# ----------------------------------------------------------------------------- FLOPs
def set_trainable(model, mode: str):
    from sftlab.layers import build_layer_map

    layer_map = build_layer_map(model)
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "head_only":
        for _, p in layer_map.head.params:
            p.requires_grad_(True)
    if mode == "top_block":  # block.1, pooler, head
        for part in layer_map.parts[-3:]:
            for _, p in part.params:
                p.requires_grad_(True)


def test_step_flops_by_hand(tiny_bert):
    """Hidden 32, intermediate 37, 2 blocks, 3 labels. Per block the matmul weights hold
    4*32*32 + 2*32*37 = 6464 entries; the pooler 32*32 = 1024, the classifier 32*3 = 96."""
    block, pooler, head = 4 * 32 * 32 + 2 * 32 * 37, 32 * 32, 32 * 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # lengths 5 and 3: 8 real tokens
    tokens, seqs, len_sq = 8, 2, 5 * 5 + 3 * 3
    assert batch_shape({"attention_mask": mask, "input_ids": torch.zeros(2, 5)}) == (tokens, seqs, len_sq)

    set_trainable(tiny_bert, "full")  # 6N everywhere (the embeddings train: input gradients everywhere)
    want = 6 * 2 * block * tokens + 6 * (pooler + head) * seqs + 2 * (4 + 8) * 32 * len_sq
    assert step_flops(tiny_bert).batch(tokens, seqs, len_sq) == want

    set_trainable(tiny_bert, "head_only")  # forward everywhere, the head's weight gradient only
    want = 2 * 2 * block * tokens + (2 * pooler + 4 * head) * seqs + 2 * 4 * 32 * len_sq
    assert step_flops(tiny_bert).batch(tokens, seqs, len_sq) == want

    # the top block trains: its weight gradients, its input gradients except q/k/v's (nothing
    # trainable below them), attention backward in that block only
    set_trainable(tiny_bert, "top_block")
    top = 2 * block + 2 * block + 2 * (block - 3 * 32 * 32)
    want = (2 * block + top) * tokens + 6 * (pooler + head) * seqs + (4 + 4 + 8) * 32 * len_sq
    assert step_flops(tiny_bert).batch(tokens, seqs, len_sq) == want


def test_a_token_classifiers_head_reads_every_token():
    """NER: the head runs on every real token (no pooler), not once per sequence."""
    from transformers import BertConfig, BertForTokenClassification

    model = BertForTokenClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=37, num_labels=9))
    block, head = 4 * 32 * 32 + 2 * 32 * 37, 32 * 9
    coef = step_flops(model, head_per_token=True)
    assert (coef.per_token, coef.per_sequence) == (6 * (2 * block + head), 0)


@pytest.mark.parametrize("mode", ["full", "head_only", "top_block"])
def test_step_flops_equal_torchs_flop_counter(tiny_bert, mode):
    """On a batch without padding, the count equals what torch's FlopCounterMode sees in a
    forward and a backward that asks only for the trainable parameters' gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    set_trainable(tiny_bert, mode)
    tiny_bert.eval()
    batch = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter:
        loss = tiny_bert(**batch).logits.sum()
        torch.autograd.grad(loss, [p for p in tiny_bert.parameters() if p.requires_grad])
    assert step_flops(tiny_bert).batch(*batch_shape(batch)) == counter.get_total_flops()


@pytest.mark.parametrize("depth", [1, 2])
def test_blocks_served_by_the_frozen_cache_count_nothing(tiny_bert, depth):
    """head_only on the frozen-prefix cache: the count equals what torch sees actually run
    (the cached blocks do not), so train_mfu does not credit the cache's saved work."""
    from torch.utils.flop_counter import FlopCounterMode

    from sftlab.perf.frozen_prefix import FrozenPrefix

    set_trainable(tiny_bert, "head_only")
    tiny_bert.eval()
    batch = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    prefix = FrozenPrefix(tiny_bert, tiny_bert.bert.encoder.layer, depth)
    hidden = prefix.compute(batch)
    prefix.install()
    prefix.feed(hidden)
    try:
        with FlopCounterMode(display=False) as counter:
            loss = tiny_bert(**batch).logits.sum()
            torch.autograd.grad(loss, [p for p in tiny_bert.parameters() if p.requires_grad])
    finally:
        prefix.remove()
    got = step_flops(tiny_bert, cached_blocks=depth).batch(*batch_shape(batch))
    assert got == counter.get_total_flops() < step_flops(tiny_bert).batch(*batch_shape(batch))
    counter_ = FlopCounter()
    assert counter_.add(tiny_bert, batch, cached_blocks=depth) == got


def test_flop_counter_follows_unfreezing(tiny_bert):
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    counter = FlopCounter()
    set_trainable(tiny_bert, "head_only")
    frozen = counter.add(tiny_bert, batch)
    set_trainable(tiny_bert, "full")  # gradual unfreezing between batches
    full = counter.add(tiny_bert, batch)
    assert full == step_flops(tiny_bert).batch(*batch_shape(batch)) > frozen
    assert counter.flops == frozen + full


# ----------------------------------------------------------------------------- a run
def test_a_run_reports_precision_rates_and_mfu(compose, caplog):
    """The real calibration on the tiny model, and a real run: metrics.json says which
    precision trained, the measured rates, and train_mfu = achieved / calibrated peak."""
    import logging
    from pathlib import Path

    from sftlab.train import train

    cfg = compose("export=false", "test=false", "trainer.precision=auto")
    with caplog.at_level(logging.INFO, logger="sftlab.perf.precision"):  # the one line at fit start
        metrics = train(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert saved["precision"] in (FP32, BF16)
    assert (Path(cfg.paths.output_dir) / "config.yaml").read_text().count(f"precision: {saved['precision']}") == 1
    peak = saved[f"calibration/gflops_{saved['precision']}"]
    assert saved[f"calibration/gflops_{FP32}"] > 0 and saved[f"calibration/gflops_{BF16}"] > 0
    assert saved["train_model_gflops_per_s"] > 0
    assert saved["train_mfu"] == pytest.approx(saved["train_model_gflops_per_s"] / peak, rel=0.01, abs=1e-4)
    assert metrics["train_mfu"] == saved["train_mfu"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision ")]
    assert len(lines) == 1 and saved["precision"] in lines[0] and "GFLOP/s" in lines[0]
    assert (Path(cfg.paths.cache_dir) / "calibration" / "precision.json").is_file()


# ----------------------------------------------------------------------------- the benchmark
def test_throughput_benchmark_names_the_machine():
    """benchmarks/throughput.py's first line: processor, matmul flags, torch, threads."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    info = {**prec.machine("cpu"), "name": "Intel Xeon", "flags": ["avx2", "avx512f", "avx512_bf16"]}
    line = bench.machine_line(info)
    assert line.startswith("machine: Intel Xeon, flags: avx2 avx512f avx512_bf16;")
    assert f"torch {torch.__version__}" in line and f"{torch.get_num_threads()} threads" in line
    assert "none of avx2/" in bench.machine_line({**info, "flags": []})
    gpu = {"device": "cuda", "name": "Tesla T4", "native_bf16": False, "torch": "2.13.0", "threads": 8}
    assert bench.machine_line(gpu).startswith("machine: Tesla T4 (native bf16: False);")
