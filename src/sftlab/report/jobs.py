"""Reading a sweep: one row per job, from its ``.hydra/`` files and its ``metrics.json``.

A job that broke has ``status: failed`` (and the error) in its metrics.json; one with no
metrics.json is ``unfinished`` (still running, or killed before it could write one). Both are
rows, so a report counts them instead of silently averaging fewer runs. A sweep still running
is read as it is: its unfinished jobs are rows with their status.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = [
    "job", "strategy", "lr", "seed", "status", "val/acc", "val/f1_macro", "test/acc", "test/f1_macro",
    "trainable_params", "train_time_s", "train_samples_per_s", "peak_rss_mb", "overrides", "error",
]


def load_yaml(path: Path, resolve: bool = False) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=resolve) if path.is_file() else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job of the sweep: a folder holding ``.hydra/overrides.yaml``, sorted by job number."""
    jobs = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    jobs = [j for j in jobs if j != sweep_dir and "report" not in j.parts]

    def key(p: Path):
        rel = p.relative_to(sweep_dir).parts[0]
        return (0, int(rel)) if rel.isdigit() else (1, rel)

    return sorted(set(jobs), key=key)


def _select(path: Path, key: str) -> Any:
    """One key of a saved config, interpolations to other keys resolved (``${strategy.lr}``)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return None
    try:
        return OmegaConf.select(OmegaConf.load(path), key, default=None, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001  (a resolver only Hydra knows: treat as absent)
        return None


def job_lr(job: Path, metrics: dict[str, Any]) -> float | None:
    """The base LR the job trained with: ``optimizer.lr × optimizer.lr_scale``.

    From metrics.json when the run recorded it (``lr``), else from the job's resolved
    ``config.yaml`` (written when the run started), else from Hydra's composed config.
    """
    if _finite(metrics.get("lr")):
        return float(metrics["lr"])
    for path in (job / "config.yaml", job / ".hydra" / "config.yaml"):
        lr = _select(path, "optimizer.lr")
        if _finite(lr):
            scale = _select(path, "optimizer.lr_scale")
            return float(lr) * (float(scale) if _finite(scale) else 1.0)
    return None


def read_job(job: Path, sweep_dir: Path) -> dict[str, Any]:
    overrides = load_yaml(job / ".hydra" / "overrides.yaml") or []
    hydra_cfg = load_yaml(job / ".hydra" / "hydra.yaml") or {}
    choices = (hydra_cfg.get("hydra", {}).get("runtime", {}) or {}).get("choices", {}) or {}
    metrics_path = job / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    seed = metrics.get("seed", _select(job / ".hydra" / "config.yaml", "seed"))
    row: dict[str, Any] = {
        "job": str(job.relative_to(sweep_dir)),
        "strategy": choices.get("strategy") or metrics.get("strategy", ""),
        "lr": job_lr(job, metrics),
        "seed": seed,
        # no metrics.json: the job is still running, or was killed before it could write one
        # (SIGKILL, a lost machine); a run that failed in Python writes status: failed
        "status": metrics.get("status", "unfinished" if not metrics else "completed"),
        "overrides": " ".join(map(str, overrides)),
        "error": metrics.get("error", "" if metrics else "no metrics.json (still running, or killed before writing one)"),
        # the task's main metric (classification: acc; token classification: f1)
        "main_metric": metrics.get("main_metric", "acc"),
    }
    for col in COLUMNS:
        if col not in row:
            row[col] = metrics.get(col)
    # every split metric, for the study (val/<main>, test/<main> of any task)
    row["metrics"] = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
    return row


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
