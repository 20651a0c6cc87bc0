"""Accuracy parity with the HF Trainer: sftlab's defaults vs the seed's recipe, per task, over seeds.

    python benchmarks/parity.py                          # ag_news, trec, conll2003; seeds 1,2,3 (make parity)
    python benchmarks/parity.py --tasks trec --seeds 1,2
    python benchmarks/parity.py --task mine="data=local data.train_file=a.csv data.validation_file=b.csv data.test_file=c.csv"
    python benchmarks/parity.py --out outputs/parity/<dir>   # re-run: finished (task, arm, seed) cells are kept

Why: a framework whose defaults lose to the plain HF Trainer on some task is a risk users cannot
see when only one task was ever measured. Each task runs two arms on the same model, files and
seeds:

  sftlab  ``python train.py <task overrides> seed=S export=false``: every sftlab default (length
          grouping, precision ``auto``, the best validation epoch tested, ...);
  hf      the HF Trainer with the seed recipe: lr 2e-5, batch 16, 3 epochs, weight decay 0.01,
          10% linear warmup, fp32, random batches, the last epoch tested. For token
          classification (NER) it is HF's run_ner recipe: the first sub-word of each word
          carries the tag, the rest are ignored (-100), and entity F1 is seqeval's.

Both read the task's files through the same composed data config (the labels are mapped by
``sftlab.data.labels.map_labels`` for both), tokenize at the same ``model.max_length``, and
every run is its own subprocess (no state shared between arms). Each task is scored by its main
metric (classification: test accuracy; NER: entity micro-F1, computed for both arms by the same
``tag_metrics``). The report gives per task the
mean and 95% Student-t interval of each arm's test score, the sftlab - hf difference paired
by seed with its interval, and a verdict (``sftlab.stats``: ``better``, ``worse``, ``within
noise``), plus the mean wall time per run. Results: ``<out>/<task>/<arm>/seed<S>.json``,
``<out>/parity.csv`` and ``<out>/parity.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: the shipped tasks: name -> the train.py overrides that select them
TASKS = {"ag_news": "data=ag_news", "trec": "data=trec", "conll2003": "data=conll2003"}
ARMS = ("sftlab", "hf")
#: the seed's recipe for the HF arm
HF_RECIPE = {"learning_rate": 2e-5, "per_device_train_batch_size": 16, "num_train_epochs": 3,
             "weight_decay": 0.01, "warmup_steps": 0.1, "lr_scheduler_type": "linear"}  # a float < 1 is a ratio (5.x)


def compose_train(overrides: list[str]):
    """The train config with ``overrides``, composed as train.py would (no run dir made)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import sftlab  # noqa: F401  (registers the ${sftlab.*} resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides + ["paths.output_dir=/tmp/parity-compose"])


# ----------------------------------------------------------------------------------- arms
def run_sftlab(task_overrides: list[str], seed: int, run_dir: Path, extra: list[str]) -> dict:
    """One ``python train.py`` run in its own process; the numbers from its metrics.json."""
    cmd = [sys.executable, str(ROOT / "train.py"), *task_overrides, f"seed={seed}", "export=false",
           f"hydra.run.dir={run_dir}", "~callbacks.progress_bar", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    metrics_file = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"sftlab run failed (rc {proc.returncode}): {' | '.join(tail)}")
    m = json.loads(metrics_file.read_text())
    main = m.get("main_metric", "acc")
    out = {"metric": main, "test_score": m[f"test/{main}"], "val_score": m.get(f"val/{main}"), "wall_s": wall,
           "train_time_s": m.get("train_time_s"), "precision": m.get("precision")}
    if "test/acc" in m and main == "acc":
        out["test_acc"] = m["test/acc"]  # the name the first cells were written with
    return out


def score(run: dict) -> float:
    """A cell's test score (cells written before NER carry only ``test_acc``)."""
    return float(run["test_score"] if "test_score" in run else run["test_acc"])


def run_hf(task_overrides: list[str], seed: int, extra: list[str]) -> dict:
    """The HF Trainer with the seed recipe on the task's files (called in a child process)."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    cfg = compose_train(task_overrides + extra)
    d = cfg.data
    if d.get("max_train_samples") or d.get("max_eval_samples"):
        raise SystemExit("parity compares whole files: drop data.max_train_samples / max_eval_samples "
                         "(the HF arm does not subsample) and give smaller files instead.")
    hf_logging.set_verbosity_error()
    set_seed(seed)
    if d.get("task", "classification") == "token_classification":
        return _hf_tokens(cfg, seed)
    return _hf_sequences(cfg, seed)


def _hf_sequences(cfg, seed: int) -> dict:
    """Sequence classification: AutoModelForSequenceClassification, test accuracy."""
    import numpy as np
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
    )

    from sftlab.data.labels import map_labels
    from sftlab.data.read import read_table

    d = cfg.data
    raw = {s: read_table(d[f"{s}_file"], s) for s in ("train", "validation", "test") if d.get(f"{s}_file")}
    names, frames = map_labels(raw, d.label_field, d.label_names)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})

    def encode(split: str) -> Dataset:
        df = frames[split]
        ds = Dataset.from_dict({"text": [str(t) for t in df[d.text_field]],
                                "labels": [int(x) for x in df[d.label_field]]})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=int(cfg.model.max_length)),
                      batched=True, remove_columns=["text"])

    pred, run = _hf_train(cfg, seed, model, encode("train"), encode("test"), DataCollatorWithPadding(tok))
    acc = float((np.asarray(pred.predictions).argmax(-1) == np.asarray(pred.label_ids)).mean())
    return {"metric": "acc", "test_score": acc, "test_acc": acc, **run}


def _hf_tokens(cfg, seed: int) -> dict:
    """Token classification as HF's run_ner does it: the first sub-word of a word carries its
    tag, the others -100; scored with the same seqeval function as sftlab (``tag_metrics``)."""
    import numpy as np
    from datasets import Dataset
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
    )

    from sftlab.data.tags import WHERE, map_tags, read_tagged, to_iob2
    from sftlab.pretrained import needs_prefix_space
    from sftlab.tasks.token_classification import tag_metrics

    d = cfg.data
    tokens_f, tags_f = d.get("tokens_field", "tokens"), d.get("tags_field", "ner_tags")
    raw = {}
    for s in ("train", "test"):
        df = read_tagged(d[f"{s}_file"], s, tokens_f, tags_f, int(d.get("tag_column", -1)))
        raw[s] = df.assign(**{tags_f: to_iob2(df[tags_f].tolist(), df[WHERE].tolist(),
                                              d.get("tag_scheme", "auto"), s)})
    names, frames = map_tags(raw, tags_f, d.get("label_names"))
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    if needs_prefix_space(tok):  # run_ner loads RoBERTa/GPT-2 tokenizers so for pre-split words
        tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path, add_prefix_space=True)
    model = AutoModelForTokenClassification.from_pretrained(
        cfg.model.name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})

    def align(batch):
        enc = tok(batch["tokens"], is_split_into_words=True, truncation=True, max_length=int(cfg.model.max_length))
        labels = []
        for i, tags in enumerate(batch["tags"]):
            prev, lab = None, []
            for w in enc.word_ids(i):
                lab.append(-100 if w is None or w == prev else tags[w])
                prev = w
            labels.append(lab)
        enc["labels"] = labels
        return enc

    def encode(split: str) -> Dataset:
        df = frames[split]
        ds = Dataset.from_dict({"tokens": [list(map(str, t)) for t in df[tokens_f]], "tags": list(df[tags_f])})
        return ds.map(align, batched=True, remove_columns=["tokens", "tags"])

    pred, run = _hf_train(cfg, seed, model, encode("train"), encode("test"), DataCollatorForTokenClassification(tok))
    best = np.asarray(pred.predictions).argmax(-1)
    gold = np.asarray(pred.label_ids)
    true = [[names[g] for g in row if g != -100] for row in gold]
    guess = [[names[p] for p, g in zip(prow, grow, strict=True) if g != -100] for prow, grow in zip(best, gold, strict=True)]
    f1 = tag_metrics(true, guess)["f1"]
    return {"metric": "f1", "test_score": f1, **run}


def _hf_train(cfg, seed: int, model, train, test, collator):
    """Train with the seed recipe, predict the test split: ``(predictions, timing fields)``."""
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, seed=seed, eval_strategy="no", save_strategy="no",
                                 report_to=[], logging_strategy="no", disable_tqdm=True,
                                 dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                                 num_train_epochs=float(cfg.trainer.max_epochs),
                                 **{k: v for k, v in HF_RECIPE.items() if k != "num_train_epochs"})
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
        t0 = time.perf_counter()
        out = trainer.train()
        wall = time.perf_counter() - t0
        pred = trainer.predict(test)
    return pred, {"wall_s": wall, "train_time_s": out.metrics.get("train_runtime"), "precision": "32-true"}


# ----------------------------------------------------------------------------------- report
def summarize(results: dict[str, dict[str, dict[int, dict]]]) -> list[dict]:
    """One row per task: each arm's mean and CI over seeds, sftlab - hf paired by seed, a verdict.

    ``results[task][arm][seed]`` is a run's dict (``test_score`` or ``test_acc``, ``metric``,
    ``wall_s``). Pure: no I/O.
    """
    from sftlab.stats import mean_ci, paired_diff, verdict

    rows = []
    for task, arms in results.items():
        metrics = {r.get("metric", "acc") for runs in arms.values() for r in runs.values()}
        row: dict = {"task": task, "metric": "/".join(sorted(metrics)) or "acc"}
        for arm in ARMS:
            runs = arms.get(arm, {})
            mean, std, lo, hi = mean_ci([score(r) for r in runs.values()])
            walls = [r["wall_s"] for r in runs.values() if r.get("wall_s") is not None]
            row.update({f"{arm}_n": len(runs), f"{arm}_mean": mean, f"{arm}_std": std, f"{arm}_ci_low": lo,
                        f"{arm}_ci_high": hi, f"{arm}_wall_s": sum(walls) / len(walls) if walls else float("nan")})
        a = {s: score(r) for s, r in arms.get("sftlab", {}).items()}
        b = {s: score(r) for s, r in arms.get("hf", {}).items()}
        diff, lo, hi, n = paired_diff(a, b)
        row.update({"diff_mean": diff, "diff_ci_low": lo, "diff_ci_high": hi, "pairs": n,
                    "verdict": verdict(lo, hi) if n >= 2 else "too few seeds"})
        rows.append(row)
    return rows


def markdown(rows: list[dict], machine: str, command: str) -> str:
    def pm(r: dict, arm: str) -> str:
        lo, hi = r[f"{arm}_ci_low"], r[f"{arm}_ci_high"]
        ci = f" [{lo:.4f}, {hi:.4f}]" if lo == lo else ""
        return f"{r[f'{arm}_mean']:.4f}{ci} (n={r[f'{arm}_n']})"

    lines = [f"Machine: {machine}", f"Command: `{command}`", "",
             "| task | test metric | sftlab [95% CI] | HF Trainer [95% CI] | sftlab - HF (paired) [95% CI] "
             "| verdict | s/run sftlab | s/run HF |", "|---|---|---|---|---|---|---:|---:|"]
    for r in rows:
        d = r["diff_mean"]
        diff = f"{d:+.4f} [{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}]" if d == d else "-"
        lines.append(f"| {r['task']} | {r['metric']} | {pm(r, 'sftlab')} | {pm(r, 'hf')} | {diff} | {r['verdict']} "
                     f"| {r['sftlab_wall_s']:.0f} | {r['hf_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info = fh.read()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")))
        model += " (" + ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) + ")"
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"shipped tasks ({', '.join(TASKS)})")
    parser.add_argument("--task", action="append", default=[], metavar='NAME="OVERRIDES"',
                        help="your own task: a name and the train.py overrides that select its data")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default=None, help="results dir (default outputs/parity/<time>)")
    parser.add_argument("--overrides", default="", help="more overrides for both arms, e.g. model=bert_base")
    parser.add_argument("--hf-job", nargs=3, metavar=("TASK_OVERRIDES", "SEED", "OUT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = shlex.split(args.overrides)
    if args.hf_job:
        overrides, seed, out_json = args.hf_job
        Path(out_json).write_text(json.dumps(run_hf(shlex.split(overrides), int(seed), extra)))
        return

    tasks = {t: TASKS[t] for t in args.tasks.split(",") if t}
    for spec in args.task:
        name, _, overrides = spec.partition("=")
        tasks[name] = overrides
    out = Path(args.out or ROOT / "outputs" / "parity" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, dict[int, dict]]] = {}
    for task, overrides in tasks.items():
        results[task] = {arm: {} for arm in ARMS}
        for seed in seeds:
            for arm in args.arms.split(","):
                cell = out / task / arm / f"seed{seed}.json"
                if not cell.is_file():  # a re-run keeps what is done
                    cell.parent.mkdir(parents=True, exist_ok=True)
                    if arm == "sftlab":
                        r = run_sftlab(shlex.split(overrides), seed, out / task / arm / f"seed{seed}", extra)
                    else:
                        t0 = time.perf_counter()
                        subprocess.run([sys.executable, __file__, "--overrides", args.overrides, "--hf-job",
                                        overrides, str(seed), str(cell) + ".tmp"], check=True, cwd=ROOT)
                        r = json.loads(Path(str(cell) + ".tmp").read_text())
                        r["wall_s"] = time.perf_counter() - t0
                        Path(str(cell) + ".tmp").unlink()
                    cell.write_text(json.dumps(r))
                results[task][arm][seed] = json.loads(cell.read_text())
                run = results[task][arm][seed]
                print(f"{task:10s} {arm:7s} seed {seed}: test {run.get('metric', 'acc')} {score(run):.4f}",
                      flush=True)
    rows = summarize(results)
    import csv

    with open(out / "parity.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md = markdown(rows, machine(), "python benchmarks/parity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    (out / "parity.md").write_text(md)
    print(md)
    print(f"written: {out / 'parity.md'}")


if __name__ == "__main__":
    main()
