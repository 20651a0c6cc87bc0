"""The strategy table: every fine-tuning strategy with its default hyperparameters, one run each.

    python benchmarks/strategies.py                              # 8 strategies x 3 epochs (~40+ min on 2 CPU cores)
    python benchmarks/strategies.py --epochs 1 --max-train-samples 400      # a smoke version
    python benchmarks/strategies.py --strategies full,lora -- optimizer.lr=5e-5   # Hydra overrides after --
    make strategies [ARGS="--epochs 1"]

Each strategy runs as its own ``python train.py strategy=<S> ...`` subprocess, exactly what a
user would type, into one folder: ``outputs/strategies/<time>/<S>/`` (a normal run dir with
metrics.json, checkpoints, model/ and ``stdout.log``). Why subprocesses rather than calling
``train()`` in a loop: each run gets a fresh process (no allocator or thread-pool state carried
from one strategy to the next, peak memory per strategy is its own), and a strategy that crashes
shows as failed in the table instead of ending the benchmark.

Sequential on purpose: on a 2-core machine two trainings at once would measure contention,
not the strategies. Default data and model: the embedded AG News sample (4000/1000/1000) and
all-MiniLM-L6-v2; the default config otherwise, so each strategy trains at its own default LR
(``lr`` in conf/strategy/<name>.yaml: 2e-5 for full, 1e-3 for head_only and bitfit, 5e-4 for
LoRA, ...). One seed per strategy: for differences that hold, run the study
(``python train.py -m hparams_search=study``) and ``python -m sftlab.report``.

Writes ``results.md`` (the table) and ``results.json`` next to the runs, prints the table,
and ends with one JSON line for machines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["full", "head_only", "partial", "gradual", "discriminative", "discriminative_ulmfit",
              "bitfit", "lora"]
COLUMNS = [
    ("strategy", "strategy"),
    ("trainable_params", "trainable params"),
    ("trainable_pct", "trainable %"),
    ("train_time_s", "train time (s)"),
    ("time_per_epoch_s", "time / epoch (s)"),
    ("train_samples_per_s", "train samples/s"),
    ("val/acc", "val acc"),
    ("test/acc", "test acc"),
    ("status", "status"),
]


def command(strategy: str, run_dir: Path, epochs: int, max_train_samples: int | None,
            overrides: list[str]) -> list[str]:
    """The train.py command line of one strategy (what the table's row ran)."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"strategy={strategy}", f"trainer.max_epochs={epochs}",
           f"hydra.run.dir={run_dir}", "task_name=strategies"]
    if max_train_samples:
        cmd.append(f"data.max_train_samples={max_train_samples}")
    return cmd + list(overrides)


def run_one(strategy: str, out: Path, epochs: int, max_train_samples: int | None,
            overrides: list[str], timeout: float | None) -> dict[str, Any]:
    """Run one strategy to completion; return its table row (failed runs included)."""
    run_dir = out / strategy
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(strategy, run_dir, epochs, max_train_samples, overrides)
    env = {**os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    with open(run_dir / "stdout.log", "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    return row_from_run(strategy, run_dir, rc=rc, wall_s=wall, cmd=cmd)


def row_from_run(strategy: str, run_dir: Path, rc: int | str = 0, wall_s: float | None = None,
                 cmd: list[str] | None = None) -> dict[str, Any]:
    """A table row from a run dir's metrics.json; a run that wrote none is ``failed``."""
    path = run_dir / "metrics.json"
    m = json.loads(path.read_text()) if path.is_file() else {}
    status = m.get("status") or "failed"
    if rc != 0 and status == "completed":
        status = f"failed (exit {rc})"  # e.g. the export crashed after metrics were written
    row: dict[str, Any] = {"strategy": strategy, "status": status, "run_dir": str(run_dir),
                           "wall_s": round(wall_s, 1) if wall_s is not None else None,
                           "command": " ".join(cmd[1:]) if cmd else None}
    if m.get("error") or (status != "completed" and not m):
        row["error"] = m.get("error") or f"exit {rc}, no metrics.json (see {run_dir / 'stdout.log'})"
    for key in ("trainable_params", "total_params", "train_time_s", "train_samples_per_s", "val/acc",
                "test/acc", "epochs", "global_step", "peak_rss_mb"):
        row[key] = m.get(key)
    if row["trainable_params"] is not None and row["total_params"]:
        row["trainable_pct"] = 100.0 * row["trainable_params"] / row["total_params"]
    else:
        row["trainable_pct"] = None
    epochs = row["epochs"] or None
    row["time_per_epoch_s"] = row["train_time_s"] / epochs if row["train_time_s"] is not None and epochs else None
    return row


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return ""
    if key == "trainable_params":
        return f"{int(v):,}"
    if key == "trainable_pct":
        return f"{v:.2f}" if v >= 0.01 else f"{v:.4f}"
    if key in ("val/acc", "test/acc"):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).replace("|", "\\|")


def markdown(rows: list[dict[str, Any]], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|" + "|".join("---" if k in ("strategy", "status") else "---:" for k, _ in COLUMNS) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "Failed:"] + [f"- {r['strategy']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:  # everything after -- goes to train.py as Hydra overrides
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="trainer.max_epochs (default 3, the default config)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all 8)")
    parser.add_argument("--max-train-samples", type=int, default=None,
                        help="data.max_train_samples, for a quicker run (default: all 4000)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the runs and the table (default: outputs/strategies/<time>)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per strategy (default: none)")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if not (ROOT / "conf" / "strategy" / f"{s}.yaml").is_file()]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {sorted(p.stem for p in (ROOT / 'conf' / 'strategy').glob('*.yaml'))}")
    out = args.out or ROOT / "outputs" / "strategies" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    header = (f"# Strategies: {args.epochs} epoch(s), "
              f"{args.max_train_samples or 'all'} train samples, default hyperparameters"
              + (f" + `{' '.join(overrides)}`" if overrides else "")
              + f"\n\n{platform.node()} · {os.cpu_count()} CPUs · python {platform.python_version()} · "
              f"{dt.datetime.now():%Y-%m-%d %H:%M} · runs in `{out}`")
    rows = []
    for i, s in enumerate(strategies, 1):
        print(f"[{i}/{len(strategies)}] {s} ...", flush=True)
        row = run_one(s, out, args.epochs, args.max_train_samples, overrides, args.timeout)
        print(f"    {row['status']}: val/acc {_fmt('val/acc', row['val/acc']) or '-'}, "
              f"wall {row['wall_s']} s", flush=True)
        rows.append(row)
        # rewrite after every strategy: a long benchmark stopped half-way keeps its table
        (out / "results.md").write_text(markdown(rows, header), encoding="utf-8")
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    table = markdown(rows, header)
    print()
    print(table)
    print(f"written to {out / 'results.md'}")
    summary = {"benchmark": "strategies", "epochs": args.epochs, "max_train_samples": args.max_train_samples,
               "overrides": overrides, "dir": str(out),
               "rows": {r["strategy"]: {k: r.get(k) for k, _ in COLUMNS if k != "strategy"} for r in rows}}
    print(json.dumps(summary))
    return 0 if all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
