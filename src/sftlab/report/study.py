"""The study: strategies × learning rates × seeds, reduced to what the numbers can support.

Rows (one per job, :mod:`sftlab.report.jobs`) are grouped into **cells**, one per (strategy,
lr): ``n`` completed jobs (the seeds), ``failed`` others, and for each metric the mean, the
sample standard deviation and a 95% Student-t interval over seeds (:mod:`sftlab.stats`).

Each strategy is then taken **at the LR it would choose**: the cell with the best mean
*validation* metric (never test: choosing on test would report an optimistic test number).
Its test metric is compared with ``full`` at full's chosen LR, **paired by seed** (runs that
share a seed share the split and the data order, so the per-seed difference cancels that
noise), giving ``better``, ``worse`` or ``within noise``.

The recommendation follows the same rule of no peeking: the best strategy is the one with the
highest mean validation metric; every strategy whose paired validation difference to it is
within noise qualifies, and the cheapest of those (mean train time) is recommended, with its
test mean and interval for the record.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from sftlab.console import fmt
from sftlab.stats import mean_ci, paired_diff, verdict

BASELINE = "full"


def main_metric(rows: list[dict[str, Any]]) -> str:
    """The task's main metric name (``acc`` for classification), as the jobs recorded it."""
    names = {r.get("main_metric") or "acc" for r in rows if r["status"] == "completed"}
    return names.pop() if len(names) == 1 else "acc"


def _metric(row: dict[str, Any], key: str) -> float | None:
    v = row.get("metrics", {}).get(key, row.get(key))
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def metric_keys(main: str) -> list[str]:
    keys = ["val/acc", "test/acc"]
    return keys + ([f"val/{main}", f"test/{main}"] if main != "acc" else [])


def cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per (strategy, lr) with n, failed, per-metric mean/std/ci and mean costs."""
    main = main_metric(rows)
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        lr = float(r["lr"]) if r.get("lr") is not None else None
        groups[(str(r["strategy"]), lr)].append(r)
    out = []
    for (strategy, lr), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
        done = [r for r in members if r["status"] == "completed"]
        cell: dict[str, Any] = {"strategy": strategy, "lr": lr, "n": len(done),
                                "failed": len(members) - len(done)}
        for key in metric_keys(main):
            mean, std, lo, hi = mean_ci([v for r in done if (v := _metric(r, key)) is not None])
            cell.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_ci_low": lo, f"{key}_ci_high": hi})
        for key in ("train_time_s", "trainable_params", "peak_rss_mb"):
            cell[key if key == "trainable_params" else f"{key}_mean"] = mean_ci(
                [v for r in done if (v := _metric(r, key)) is not None])[0]
        # per-seed values for the paired comparisons (not written to cells.csv)
        cell["_by_seed"] = {key: {r.get("seed", r["job"]): _metric(r, key) for r in done}
                            for key in (f"val/{main}", f"test/{main}")}
        out.append(cell)
    return out


def _better(cell: dict[str, Any], main: str) -> float:
    v = cell[f"val/{main}_mean"]
    return v if cell["n"] and math.isfinite(v) else -math.inf


def strategies(cell_rows: list[dict[str, Any]], main: str) -> list[dict[str, Any]]:
    """One row per strategy at the LR with the best mean validation metric, paired vs ``full``."""
    chosen: dict[str, dict[str, Any]] = {}
    for c in cell_rows:
        if c["n"] and (c["strategy"] not in chosen or _better(c, main) > _better(chosen[c["strategy"]], main)):
            chosen[c["strategy"]] = c
    base = chosen.get(BASELINE)
    out = []
    for name, c in sorted(chosen.items(), key=lambda kv: -_better(kv[1], main)):
        test = f"test/{main}"
        row = {"strategy": name, "lr": c["lr"], "n": c["n"], f"val/{main}_mean": c[f"val/{main}_mean"],
               f"{test}_mean": c[f"{test}_mean"], f"{test}_ci_low": c[f"{test}_ci_low"],
               f"{test}_ci_high": c[f"{test}_ci_high"], "train_time_s_mean": c["train_time_s_mean"],
               "trainable_params": c["trainable_params"]}
        if base is not None and name != BASELINE:
            mean, lo, hi, n = paired_diff(c["_by_seed"][test], base["_by_seed"][test])
            row.update(diff_vs_full_mean=mean, diff_vs_full_ci_low=lo, diff_vs_full_ci_high=hi,
                       diff_vs_full_n=n, verdict=verdict(lo, hi) if n else "")
        else:
            row.update(diff_vs_full_mean=0.0 if name == BASELINE else math.nan, diff_vs_full_ci_low=math.nan,
                       diff_vs_full_ci_high=math.nan, diff_vs_full_n=0, verdict="baseline" if name == BASELINE else "")
        row["_cell"] = c
        out.append(row)
    return out


def recommend(strategy_rows: list[dict[str, Any]], main: str) -> tuple[dict[str, Any] | None, str]:
    """The cheapest strategy within noise of the best on validation, and the sentence saying so."""
    if not strategy_rows:
        return None, "No completed jobs yet: nothing to recommend."
    best = strategy_rows[0]  # sorted by mean validation metric
    val = f"val/{main}"
    ok = [best]
    for r in strategy_rows[1:]:
        mean, lo, hi, n = paired_diff(r["_cell"]["_by_seed"][val], best["_cell"]["_by_seed"][val])
        if n >= 2 and verdict(lo, hi) != "worse":
            ok.append(r)
    cost = [r for r in ok if r.get("train_time_s_mean") is not None and math.isfinite(r["train_time_s_mean"])]
    pick = min(cost, key=lambda r: r["train_time_s_mean"]) if cost else best
    test = f"test/{main}"
    lo, hi = pick[f"{test}_ci_low"], pick[f"{test}_ci_high"]
    ci = f" [{fmt(lo)}, {fmt(hi)}]" if math.isfinite(lo) else ""
    why = ("the best on validation" if pick is best else
           f"within noise of the best ({best['strategy']}) on validation, and cheaper")
    n_note = "" if pick["n"] >= 2 else " (one seed: run more seeds before trusting this)"
    sentence = (f"Recommended: **{pick['strategy']}** at lr {fmt(pick['lr'])}: {why}; "
                f"test {main} {fmt(pick[f'{test}_mean'])}{ci} over {pick['n']} seed(s), "
                f"{fmt(pick['train_time_s_mean'], 1)} s of training{n_note}.")
    return pick, sentence


def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    rows = _public(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        if not rows:
            fh.write("")
            return
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_study(rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """cells.csv, strategies.csv and README.md; returns what the charts and W&B need."""
    main = main_metric(rows)
    cell_rows = cells(rows)
    strat_rows = strategies(cell_rows, main)
    pick, sentence = recommend(strat_rows, main)
    write_csv(cell_rows, out / "cells.csv")
    write_csv(strat_rows, out / "strategies.csv")
    done = sum(r["status"] == "completed" for r in rows)
    unfinished = [r for r in rows if r["status"] != "completed"]
    test = f"test/{main}"
    lines = ["# Study report", "",
             f"{len(rows)} jobs: {done} completed, {len(unfinished)} failed or unfinished "
             "(counted, never averaged in).", "", sentence, "",
             f"## Strategies (each at the LR it chooses on mean val/{main}; paired vs {BASELINE} by seed)", "",
             f"| strategy | lr | n | val/{main} | {test} (95% CI) | vs {BASELINE} (95% CI) | verdict | train s | trainable |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in strat_rows:
        diff = ("" if not math.isfinite(r["diff_vs_full_ci_low"]) else
                f"{r['diff_vs_full_mean'] * 100:+.2f} pt [{r['diff_vs_full_ci_low'] * 100:+.2f}, "
                f"{r['diff_vs_full_ci_high'] * 100:+.2f}]")
        ci = (f" [{fmt(r[f'{test}_ci_low'])}, {fmt(r[f'{test}_ci_high'])}]"
              if math.isfinite(r[f"{test}_ci_low"]) else "")
        lines.append(f"| {r['strategy']} | {fmt(r['lr'])} | {r['n']} | {fmt(r[f'val/{main}_mean'])} | "
                     f"{fmt(r[f'{test}_mean'])}{ci} | {diff} | {r['verdict']} | "
                     f"{fmt(r['train_time_s_mean'], 1)} | {fmt(_int(r['trainable_params']))} |")
    lines += ["", "## Cells (strategy × lr): mean ± std over seeds", "",
              f"| strategy | lr | n | failed | val/{main} | {test} |", "|---|---:|---:|---:|---:|---:|"]
    for c in cell_rows:
        lines.append(f"| {c['strategy']} | {fmt(c['lr'])} | {c['n']} | {c['failed']} | "
                     f"{_pm(c, f'val/{main}')} | {_pm(c, test)} |")
    if unfinished:
        lines += ["", "## Failed or unfinished jobs", ""]
        lines += [f"- job {r['job']} ({r['overrides']}): {r['status']}{': ' + r['error'] if r['error'] else ''}"
                  for r in unfinished]
    lines += ["", "Charts: `val_vs_lr.png` (mean validation metric ± 95% CI against LR), "
              "`cost_accuracy.png` (test metric ± 95% CI against train time and trainable parameters; "
              "the Pareto front is outlined).", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return {"main": main, "cells": cell_rows, "strategies": strat_rows, "recommended": pick,
            "sentence": sentence}


def _int(v: Any) -> Any:
    return int(v) if isinstance(v, float) and math.isfinite(v) else v


def _pm(cell: dict[str, Any], key: str) -> str:
    mean, std = cell[f"{key}_mean"], cell[f"{key}_std"]
    if not math.isfinite(mean):
        return ""
    return fmt(mean) + (f" ± {fmt(std)}" if math.isfinite(std) else "")
