"""The study report as a W&B run: the dashboard shows the tables and charts next to the jobs.

Logged into the jobs' own W&B project and group (every job of a study shares one group,
``sweep_group``), as one extra run with ``job_type: report``: ``strategies`` and ``cells`` as
W&B tables, the charts as images, and the recommendation in the summary. Offline unless
credentials exist (the same rule as the jobs' logger, :func:`sftlab.loggers.resolve_offline`),
so the files land in ``<report>/wandb/`` and ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sftlab.report.jobs import load_yaml


def wandb_settings(jobs: list[Path], sweep: Path) -> dict[str, Any] | None:
    """project / entity / group of the jobs' W&B logger, or None when they did not use W&B."""
    for job in jobs:
        cfg = load_yaml(job / "config.yaml") or {}
        wb = ((cfg.get("logger") or {}).get("wandb") or {})
        if wb.get("_target_"):
            group = wb.get("group") or f"{cfg.get('task_name', 'train')}-{sweep.name}"
            return {"project": wb.get("project") or "sftlab", "entity": wb.get("entity"), "group": group}
    return None


def _table(rows: list[dict[str, Any]]):
    import wandb

    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    cols = list(rows[0]) if rows else []
    clean = [[None if isinstance(r[c], float) and not math.isfinite(r[c]) else r[c] for c in cols] for r in rows]
    return wandb.Table(columns=cols, data=clean)


def log_study(study: dict[str, Any], out: Path, settings: dict[str, Any]) -> Path:
    """Log the study into a ``job_type: report`` run of the jobs' group; return its folder."""
    import wandb

    from sftlab.loggers import resolve_offline

    run = wandb.init(project=settings["project"], entity=settings.get("entity"), group=settings["group"],
                     job_type="report", name=f"report-{settings['group']}", dir=str(out),
                     mode="offline" if resolve_offline("auto") else "online", reinit="finish_previous")
    try:
        run.log({"study/strategies": _table(study["strategies"]), "study/cells": _table(study["cells"])}
                | {f"study/{png.stem}": wandb.Image(str(png))
                   for png in (out / "val_vs_lr.png", out / "cost_accuracy.png") if png.is_file()})
        run.summary["recommendation"] = study["sentence"]
        if study.get("recommended"):
            run.summary["recommended_strategy"] = study["recommended"]["strategy"]
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder
