"""What a run writes into its dir: metrics.json, the confusion matrix, per-example predictions.

``metrics.json`` holds flat keys (``val/acc``, ``test/f1_macro``, ``train_samples_per_s`` ...)
for a completed run, or ``status: failed`` / ``interrupted`` and why for one that was not;
sweep reports and ``resume=`` read it. Callbacks add their own numbers to it through
:func:`run_stats`: any callback with a ``run_stats() -> dict`` method contributes its keys
(``TrainThroughput`` the training time and speed, ``FiniteLossGuard`` the skipped steps), so
the pipeline needs to know none of them by name.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Any

from sftlab.files import write_json

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and finished children, e.g. data workers)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(self_kb, child_kb) / 1024, 1)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries of a Lightning results dict that are numbers, as floats."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def run_stats(trainer, module, strategy) -> dict[str, Any]:
    """How the run went: sizes, steps, memory, and what every reporting callback measured.

    Read right after ``fit``: evaluating the best checkpoint afterwards restores every
    callback's state (throughput, skipped steps) to what it was at that checkpoint.
    """
    from sftlab.layers import count_params

    trainable, total = count_params(module.model)
    stats: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_mb": peak_rss_mb(),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        # how many processes trained it, on how many nodes (DDP, torchrun, SLURM)
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        # who started the processes: LightningEnvironment, TorchElasticEnvironment (torchrun),
        # SLURMEnvironment (srun); null for one process
        "cluster": type(getattr(trainer.strategy, "cluster_environment", None)).__name__
        if getattr(trainer.strategy, "cluster_environment", None) is not None else None,
        "strategy": strategy.name,
        "status": "completed",
    }
    for cb in trainer.callbacks:
        report = getattr(cb, "run_stats", None)
        if callable(report):
            stats.update(report())
    return stats


def save_confusion(confusion, label_names: list[str], out: Path) -> None:
    """The test confusion matrix as CSV (rows = true, cols = predicted) and as a PNG heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat = confusion.numpy().astype(int)
    lines = ["true\\pred," + ",".join(label_names)]
    lines += [f"{name}," + ",".join(map(str, row)) for name, row in zip(label_names, mat, strict=True)]
    (out / "confusion_matrix.csv").write_text("\n".join(lines) + "\n")
    k = len(label_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.0 * k + 2))
    ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(k), label_names, rotation=45, ha="right")
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(mat[i, j]), ha="center", va="center",
                    color="white" if mat[i, j] > mat.max() / 2 else "black")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)


def save_test_predictions(module, label_names: list[str], out: Path) -> None:
    """Per-example test predictions in the file's row order (the loader sorts by length)."""
    rows = sorted(module.test_predictions)
    lines = ["idx,true_id,label_id,label," + ",".join(f"p_{n}" for n in label_names)]
    for idx, true, probs in rows:
        best = max(range(len(probs)), key=probs.__getitem__)
        lines.append(f"{idx},{true},{best},{label_names[best]}," + ",".join(f"{p:.6f}" for p in probs))
    (out / "test_predictions.csv").write_text("\n".join(lines) + "\n")


def save_tag_predictions(rows, out: Path) -> None:
    """Token classification: per test sentence (file row order) its true and predicted tags."""
    import json

    lines = [json.dumps({"idx": idx, "tags": true, "predicted": pred}) for idx, true, pred in sorted(rows)]
    (out / "test_predictions.jsonl").write_text("\n".join(lines) + "\n")


def save_results(cfg, out: Path, module, label_names: list[str], metrics: dict[str, Any], loggers) -> None:
    """metrics.json, the confusion matrix, per-example test predictions, and the summary table."""
    from sftlab.console import print_metrics_table
    from sftlab.loggers import log_confusion_to_wandb

    if module.test_confusion is not None:
        save_confusion(module.test_confusion, label_names, out)
        save_test_predictions(module, label_names, out)
        rows = sorted(module.test_predictions)
        preds = [max(range(len(p)), key=p.__getitem__) for _, _, p in rows]
        log_confusion_to_wandb(loggers, [t for _, t, _ in rows], preds, label_names)
    elif getattr(module, "test_tag_rows", None):
        save_tag_predictions(module.test_tag_rows, out)
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)
                        and not k.startswith(("val/", "test/"))}, step=int(metrics.get("global_step", 0)))
        lg.save()
    write_json(out / "metrics.json", metrics)
    print_metrics_table(metrics, title=f"{metrics.get('strategy', '')} · {out.name}")
    log.info("Run dir: %s", out)


# ------------------------------------------------------------ how a run that did not complete ended
def record_interrupted(run_dir: Path, err) -> None:
    """``status: interrupted``, where it stopped and how to continue (``err``: RunInterrupted)."""
    _record(run_dir, {"status": "interrupted", "signal": err.signal_name, "global_step": err.step,
                      "checkpoint": err.checkpoint, "resume": f"python train.py resume={run_dir}"})


def record_failure(run_dir: Path, err: BaseException) -> None:
    """``status: failed`` and the error, for the sweep report and ``resume=``."""
    _record(run_dir, {"status": "failed", "error": f"{type(err).__name__}: {err}"})


def _record(run_dir: Path, data: dict[str, Any]) -> None:
    """Write a run's end state into its metrics.json, never hiding the error that ended it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "metrics.json", data)
    except Exception:  # noqa: BLE001
        pass
