"""Training throughput, side by side in one run: HF Trainer vs plain loop vs sftlab.

    python benchmarks/throughput.py                 # one epoch per arm, 2 repeats (~20-40 min)
    python benchmarks/throughput.py --steps 60      # a quick look (~5 min; flatters, see below)
    python benchmarks/throughput.py --accuracy      # + full 3-epoch runs of (a) and (d)
    python benchmarks/throughput.py --machine       # only the machine and its calibration (seconds)
    make bench

The same work in every arm: the embedded all-MiniLM-L6-v2, the AG News sample, batch 16,
max_length 128, the same number of optimizer steps, the same seed. The default is one epoch
(250 steps) per arm, so every arm sees a whole epoch's mix of lengths: a shorter window is
not representative for length-grouped batches (with seed 42 the first 60 batches pad to 52.1
tokens on average, the whole epoch to 53.9), and it favours sftlab by about 3%.

  (a) hf       the HF Trainer with the seed recipe's settings (random batches, fp32)
  (a') hf_mkl  the same with sftlab's MKL fix (``perf.mkl_fast_path``; not in the default arms)
  (b) plain    a plain PyTorch loop (random batches, fp32)
  (b') plain*  the plain loop with sftlab's default batches, precision and fast dropout
  (c) sftlab   sftlab's defaults (python train.py; trainer.precision=auto)
  (c') sftlab@<precision>  the defaults with trainer.precision forced, one arm per precision
               the machine offers at a useful speed (--precisions: 32-true and bf16-mixed; 16-mixed on
               CUDA too; by default one whose calibrated matmuls run under half the fastest's
               rate is left out: bf16 without bf16 units would take an hour an epoch)
  (d) fastest  sftlab's fastest settings

Every arm runs in a fresh process (``--child``), so no arm inherits another's heap, threads
or caches, and each gets the BLAS set-up its users get: the HF Trainer and plain loop as they
come out of the box, the sftlab arms (and (b')) with ``perf.mkl_fast_path`` (MKL's fast path on
AMD CPUs, ``sftlab.perf.blas``). ``--arms hf_mkl`` adds the HF Trainer with that fix too, to
show how much of a ratio it accounts for. Arms are interleaved (a b b' c d, a b b' c d, ...)
so machine drift hits them alike, and the best of the repeats is kept (noise on a shared machine only ever slows a run down). Samples/s
counts training examples over the wall time of the training loop with evaluation off, which
is what the HF Trainer's ``train_samples_per_second`` means. The last line printed is one JSON
summary for machines.

The machine comes first (CPU model, the flags that decide matmul speed, torch, threads) with
the precision calibration of ``trainer.precision=auto`` (GFLOP/s per precision on the model's
shapes, ``sftlab.perf.precision``). Every arm gets an MFU: sftlab arms report their own
``train_mfu`` (metrics.json); the HF and plain arms get samples/s × the epoch's mean model FLOPs
per example (the same count, ``sftlab.perf.flops``, full fine-tuning) over the calibrated peak
of their precision (fp32; (b') the default's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import sftlab  # noqa: E402,F401

DATA = ROOT / "data" / "ag_news"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
# sftlab's fastest settings, on top of its defaults (each a config key; see README "Performance");
# the precision is the default's (auto: measured per machine), the precision arms force each one
FASTEST = ["data.group_by_length=true"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_split(tok, split: str, max_length: int, limit: int | None = None):
    import pandas as pd
    from datasets import Dataset

    df = pd.read_csv(DATA / f"{split}.csv")
    if limit:
        df = df.iloc[:limit]
    ds = Dataset.from_pandas(df, preserve_index=False)
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"]).rename_column("label", "labels")


def model_and_tok():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected

    from sftlab.resolvers import embedded_model_path

    path = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=4, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    return model, tok


# ----------------------------------------------------------------------------------- arms
def run_hf(args, steps: int | None, epochs: float = 1.0, evaluate: bool = False) -> dict:
    """(a) HF Trainer, the seed's settings: random batches of 16, dynamic padding, fp32."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    model, tok = model_and_tok()
    train = load_split(tok, "train", args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=2e-5,
            weight_decay=0.01, warmup_steps=0.06, max_steps=steps or -1, num_train_epochs=epochs,
            eval_strategy="no", save_strategy="no", report_to=[], logging_strategy="no",
            seed=args.seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        out = trainer.train()
        wall = time.perf_counter() - t0
        result = {"samples_per_s": out.metrics["train_samples_per_second"], "wall_s": wall}
        if evaluate:
            test = load_split(tok, "test", args.max_length)
            pred = trainer.predict(test)
            result["test_acc"] = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return result


def run_plain(args, steps: int, sftlab_batches: bool = False) -> dict:
    """(b) a plain PyTorch loop: AdamW, linear warmup/decay, clip 1.0, nothing else.

    With ``sftlab_batches`` it uses sftlab's default batching (length-grouped), precision,
    model-level kernels (``perf.fast_dropout``: ``use_fast_dropout``; the last block for [CLS]
    only, ``perf.last_block_cls_only``; the kept word-embedding gradient and its clipping,
    ``perf.embedding_grad_rows``; the compiled dropout and GELU kernels, ``perf.cpu_kernels``)
    and heap policy (the
    ``perf.release_memory`` callback's, driven by hand), so its wall time is the floor that
    sftlab's own loop is measured against: the difference is the framework, nothing else.
    """
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_scheduler, set_seed

    from sftlab.data import LengthGroupedBatchSampler

    set_seed(args.seed)
    model, tok = model_and_tok()
    train = load_split(tok, "train", args.max_length).with_format("torch")
    collate = DataCollatorWithPadding(tok)
    bf16 = sftlab_batches and args.default_precision.startswith("bf16")
    if sftlab_batches and args.default_fast_dropout is not None:
        from sftlab.perf import use_fast_dropout

        use_fast_dropout(model, **args.default_fast_dropout)
    if sftlab_batches and args.default_last_block is not None:
        from sftlab.perf.last_block import first_token_forward, last_block

        block = last_block(model)  # MiniLM's pooler reads [CLS]: the callback's case
        block.forward = first_token_forward(block)
    clip = torch.nn.utils.clip_grad_norm_
    if sftlab_batches and args.default_embedding_grad is not None:
        from types import SimpleNamespace

        from sftlab.perf.embedding_grad import EmbeddingGradRows, clip_grad_norm_

        EmbeddingGradRows().setup(SimpleNamespace(world_size=1, strategy=SimpleNamespace(
            root_device=torch.device("cpu"))), SimpleNamespace(model=model), "fit")
        clip = clip_grad_norm_
    if sftlab_batches and args.default_cpu_kernels is not None:
        from types import SimpleNamespace

        from sftlab.perf.kernels import CpuKernels

        CpuKernels(**args.default_cpu_kernels).setup(SimpleNamespace(strategy=SimpleNamespace(
            root_device=torch.device("cpu"))), SimpleNamespace(model=model), "fit")
    if sftlab_batches:
        lengths = [len(x) for x in train.with_format(None)["input_ids"]]
        loader = DataLoader(train, batch_sampler=LengthGroupedBatchSampler(
            lengths, args.batch_size, shuffle=True, seed=args.seed), collate_fn=collate)
    else:
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                            generator=torch.Generator().manual_seed(args.seed))
    # fused AdamW, like the HF Trainer's default (adamw_torch_fused) and sftlab's
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=True)
    sched = get_scheduler("linear", opt, num_warmup_steps=int(0.06 * steps), num_training_steps=steps)
    model.train()
    memory = None
    if sftlab_batches and args.default_release_memory is not None:
        from sftlab.perf import ReleaseFreeMemory

        memory = ReleaseFreeMemory(**args.default_release_memory)
        memory.setup(None, None, "fit")
    done, samples = 0, 0
    t0 = time.perf_counter()
    while done < steps:
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            loss.backward()
            clip(list(model.parameters()), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            samples += len(batch["labels"])
            if memory is not None:
                memory.on_train_batch_end(None, None, None, batch, done)
            done += 1
            if done >= steps:
                break
    wall = time.perf_counter() - t0
    if memory is not None:
        memory.teardown(None, None, "fit")
    return {"samples_per_s": samples / wall, "wall_s": wall}


def run_sftlab(args, steps: int | None, extra: list[str], evaluate: bool = False) -> dict:
    """(c)/(d) ``sftlab.train.train`` on a composed config, validation and export off."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sftlab.train import train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"paths.output_dir={tmp}", f"hydra.run.dir={tmp}", f"seed={args.seed}",
            f"data.batch_size={args.batch_size}", f"model.max_length={args.max_length}",
            "export=false", "logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
            "+trainer.num_sanity_val_steps=0",
        ]
        if steps:
            overrides += [f"+trainer.max_steps={steps}", "+trainer.limit_val_batches=0", "test=false",
                          "~callbacks.model_checkpoint", "+trainer.enable_checkpointing=false"]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides + extra, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        t0 = time.perf_counter()
        m = train(cfg)
        wall = time.perf_counter() - t0
        out = {"samples_per_s": m["train_samples_per_s"], "wall_s": m["train_time_s"],
               "first_step_s": m.get("time_to_first_step_s"), "total_s": wall,
               "mfu": m.get("train_mfu"), "precision": m.get("precision")}
        if evaluate:
            out["test_acc"] = m.get("test/acc")
        return out


def _perf_options(defaults, name: str) -> dict | None:
    """The options of the default config's ``perf.<name>`` callback, or None when it is off."""
    entry = (defaults.get("perf") or {}).get(name)
    if entry is None or entry.get("enable", True) is False:
        return None
    return {k: v for k, v in entry.items() if k not in ("_target_", "enable")}


def machine_line(info: dict) -> str:
    """One line naming what the numbers depend on: processor, matmul flags, torch, threads."""
    from sftlab.perf.precision import MATMUL_FLAGS

    if info["device"] == "cuda":
        what = f"{info['name']} (native bf16: {info['native_bf16']})"
    else:
        what = f"{info['name']}, flags: {' '.join(info['flags']) or 'none of ' + '/'.join(MATMUL_FLAGS)}"
    line = f"machine: {what}; {os.cpu_count()} cores; torch {info['torch']}; {info['threads']} threads"
    if "mkl_fast_path" in info:
        line += f"; MKL fast path in sftlab arms: {'yes' if info['mkl_fast_path'] else 'no'}"
    return line


def calibrate_defaults(defaults):
    """The default config's precision resolved as train.py does (auto: measured), on MiniLM."""
    from sftlab.perf.precision import resolve_precision

    model, tok = model_and_tok()
    return resolve_precision(defaults, model), model, tok


def flops_per_example(model, tok, args, first_token_last_block: bool = False) -> float:
    """Mean model FLOPs of one training example of the train split (full fine-tuning; the last
    block for [CLS] only where the arm switches it, as ``train_mfu`` counts it)."""
    from sftlab.perf.flops import step_flops

    lengths = [len(x) for x in load_split(tok, "train", args.max_length)["input_ids"]]
    coef = step_flops(model, first_token_last_block=first_token_last_block)
    return sum(coef.batch(n, 1, n * n) for n in lengths) / len(lengths)


def compose_defaults(args):
    """sftlab's default config at the benchmark's batch size and max_length (no torch)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp", f"data.batch_size={args.batch_size}",
                                           f"model.max_length={args.max_length}"])


#: arms that run with sftlab's BLAS set-up although they are not ``train()`` (which does it itself)
FAST_BLAS = ("plain_sftlab", "hf_mkl")
#: the precision each non-sftlab arm's matmuls run in, for its MFU
ARM_PRECISION = {"hf": "32-true", "hf_mkl": "32-true", "plain": "32-true", "hf_3ep": "32-true"}


def child(args) -> None:
    """Run one arm in this (fresh) process and print its result as the last line (``RESULT {...}``)."""
    arm = args.child
    defaults = compose_defaults(args)
    if arm in FAST_BLAS:
        from sftlab.perf import blas

        blas.from_config(defaults)  # before torch, as train() does
    args.default_fast_dropout = _perf_options(defaults, "fast_dropout")
    args.default_release_memory = _perf_options(defaults, "release_memory")
    args.default_last_block = _perf_options(defaults, "last_block_cls_only")
    args.default_embedding_grad = _perf_options(defaults, "embedding_grad_rows")
    args.default_cpu_kernels = _perf_options(defaults, "cpu_kernels")
    if arm.startswith("sftlab@"):
        r = run_sftlab(args, args.steps, [f"trainer.precision={arm.split('@', 1)[1]}"])
    elif arm in ("sftlab", "fastest", "fastest_3ep"):
        r = run_sftlab(args, None if arm == "fastest_3ep" else args.steps, [] if arm == "sftlab" else FASTEST,
                       evaluate=arm == "fastest_3ep")
    else:
        # (b') trains in the default's precision: auto, as train() resolves it in this process
        calibration, model, tok = calibrate_defaults(defaults)
        args.default_precision = str(defaults.trainer.precision)
        precision = ARM_PRECISION.get(arm, args.default_precision)
        per_example = flops_per_example(model, tok, args, first_token_last_block=(
            arm == "plain_sftlab" and args.default_last_block is not None))
        del model, tok
        if arm in ("hf", "hf_mkl", "hf_3ep"):
            r = run_hf(args, None if arm == "hf_3ep" else args.steps, epochs=3 if arm == "hf_3ep" else 1.0,
                       evaluate=arm == "hf_3ep")
        elif arm in ("plain", "plain_sftlab"):
            r = run_plain(args, args.steps, sftlab_batches=arm == "plain_sftlab")
        else:
            raise SystemExit(f"unknown arm {arm!r}")
        if calibration is not None and calibration.peak_gflops(precision):
            r["mfu"] = r["samples_per_s"] * per_example / 1e9 / calibration.peak_gflops(precision)
    from sftlab.perf import blas

    r.update(rss_mb=rss_mb(), mkl_fast_path=blas.active())
    print("RESULT " + json.dumps(r), flush=True)


def run_child(args, arm: str) -> dict:
    """One arm in a fresh Python process; its output is shown only when it fails."""
    cmd = [sys.executable, __file__, "--child", arm, "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--seed", str(args.seed)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"arm {arm} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per arm (default: one epoch of the train split)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--accuracy", action="store_true", help="also full runs of (a) and (d)")
    parser.add_argument("--arms", default="hf,plain,plain_sftlab,sftlab,fastest")
    parser.add_argument("--precisions", default=None,
                        help="sftlab arms with trainer.precision forced, comma-separated (default: the "
                             "precisions this machine offers; '' for none)")
    parser.add_argument("--machine", action="store_true",
                        help="print the machine and the precision calibration, then stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one arm in this process
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    from sftlab.perf import blas

    defaults = compose_defaults(args)
    blas.from_config(defaults)  # this process shows the machine as sftlab's arms see it
    calibration, model, tok = calibrate_defaults(defaults)
    del model, tok
    from sftlab.perf.precision import candidates, device_type, machine

    info = calibration.machine if calibration else machine(device_type("auto"))
    print(machine_line(info), flush=True)
    if calibration:
        print(calibration.summary(), flush=True)
    if args.machine:
        return
    if args.precisions is None:  # the precisions worth an epoch: within 2x of the fastest's matmul rate
        offered = candidates(info)[0]
        rates = calibration.rates if calibration else {}
        top = max(rates.values(), default=0.0)
        keep = [p for p in offered if not top or rates.get(p, 0.0) >= top / 2]
        if len(keep) < len(offered):
            print(f"precision arms left out (matmuls under half the fastest's rate here; --precisions "
                  f"adds them): {', '.join(p for p in offered if p not in keep)}", flush=True)
        args.precisions = ",".join(keep)
    if args.steps is None:  # one epoch: ceil(train rows / batch size)
        import pandas as pd

        args.steps = -(-len(pd.read_csv(DATA / "train.csv")) // args.batch_size)
    args.default_precision = str(defaults.trainer.precision)
    arms = args.arms.split(",")
    precisions = [p for p in args.precisions.split(",") if p]
    arms += [f"sftlab@{p}" for p in precisions]
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for rep in range(args.repeats):
        for arm in arms:
            r = run_child(args, arm)
            results[arm].append(r)
            mfu = f"  MFU {r['mfu']:.3f}" if r.get("mfu") is not None else ""
            print(f"[rep {rep}] {arm:18s} {r['samples_per_s']:7.1f} samples/s  wall {r['wall_s']:6.1f} s{mfu}"
                  f"  MKL fast path: {'yes' if r.get('mkl_fast_path') else 'no'}", flush=True)
    best = {a: max(rs, key=lambda r: r["samples_per_s"]) for a, rs in results.items()}

    def ratio(x: str, y: str) -> float | None:
        if x in best and y in best:
            return round(best[x]["samples_per_s"] / best[y]["samples_per_s"], 3)
        return None

    summary = {
        "machine": machine_line(info),
        "calibration_gflops": calibration.rates if calibration else None,
        "train_mfu": {a: round(b["mfu"], 4) for a, b in best.items() if b.get("mfu") is not None},
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "default_precision": args.default_precision, "fastest": FASTEST,
        "samples_per_s": {a: round(b["samples_per_s"], 2) for a, b in best.items()},
        "sftlab_over_hf": ratio("sftlab", "hf"),
        "fastest_over_hf": ratio("fastest", "hf"),
        "sftlab_over_plain": ratio("sftlab", "plain"),
        # same batches and precision: wall-time ratio sftlab / plain loop (<= 1.05 is the goal)
        "sftlab_wall_over_plain_same_batches": (
            round(best["sftlab"]["wall_s"] / best["plain_sftlab"]["wall_s"], 3)
            if "sftlab" in best and "plain_sftlab" in best else None),
        "time_to_first_step_s": {a: round(b["first_step_s"], 2) for a, b in best.items() if b.get("first_step_s")},
        "mkl_fast_path": {a: bool(b.get("mkl_fast_path")) for a, b in best.items()},
        "sftlab_over_hf_mkl": ratio("sftlab", "hf_mkl"),
        "peak_rss_mb": {a: round(b["rss_mb"], 1) for a, b in best.items()},
    }
    if args.accuracy:
        print("accuracy runs: HF Trainer 3 epochs (fp32), sftlab fastest (its defaults + FASTEST) ...", flush=True)
        a = run_child(args, "hf_3ep")
        d = run_child(args, "fastest_3ep")
        summary["test_acc"] = {"hf": round(a["test_acc"], 4), "fastest": round(d["test_acc"], 4)}
        summary["full_run_samples_per_s"] = {"hf": round(a["samples_per_s"], 2), "fastest": round(d["samples_per_s"], 2)}
    print()
    print("| arm | samples/s | ratio to HF | MFU |")
    print("|---|---|---|---|")
    for a, b in best.items():
        r = b["samples_per_s"] / best["hf"]["samples_per_s"] if "hf" in best else float("nan")
        mfu = f"{b['mfu']:.3f}" if b.get("mfu") is not None else ""
        print(f"| {a} | {b['samples_per_s']:.1f} | {r:.2f}x | {mfu} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
