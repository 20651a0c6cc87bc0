"""The sweep's job charts: val accuracy against LR, and against trainable parameters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sftlab.report.tables import _finite


def write_charts(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "completed" and r.get("val/acc") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({r["strategy"] for r in done}):
        pts = sorted((float(r["lr"]), float(r["val/acc"])) for r in done if r["strategy"] == s and r["lr"])
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=s)
    _finish(fig, ax, "learning rate", "val accuracy", "val accuracy vs learning rate", out / "val_acc_vs_lr.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    labelled: list[tuple[float, float, str]] = []
    for s in sorted({r["strategy"] for r in done}):
        pts = [(float(r["trainable_params"]), float(r["val/acc"]), r["lr"]) for r in done
               if r["strategy"] == s and r.get("trainable_params")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=s)
            # which LR each point is (strategies that train the same parameters share an x);
            # one label for points that coincide, e.g. full and discriminative at one LR
            for x, y, lr in pts:
                if not _finite(lr):
                    continue
                text = _short_lr(float(lr))
                if any(t == text and abs(math.log10(x / lx)) < 0.05 and abs(y - ly) < 0.02
                       for lx, ly, t in labelled):
                    continue
                labelled.append((x, y, text))
                ax.annotate(text, (x, y), xytext=(4, 2), textcoords="offset points", fontsize=7)
    _finish(fig, ax, "trainable parameters", "val accuracy", "trainable parameters vs accuracy (labels: lr)",
            out / "params_vs_acc.png")


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path, legend_size: float | None = None) -> None:
    """Log-x axes, labels, grid and legend; save ``path`` and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short_lr(lr: float) -> str:
    """1e-04 -> "1e-4", 2.5e-05 -> "2.5e-5", 0.003 -> "0.003": chart labels, not table cells."""
    if lr >= 1e-3:
        return f"{lr:.2g}"
    mant, exp = f"{lr:.1e}".split("e")
    return f"{mant.removesuffix('.0')}e{int(exp)}"




def _yerr(mean: float, lo: float, hi: float) -> tuple[float, float]:
    return (mean - lo, hi - mean) if math.isfinite(lo) and math.isfinite(hi) else (0.0, 0.0)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both counts (lower cost, higher metric)."""
    front = []
    for i, (c, m) in enumerate(points):
        if not any((c2 <= c and m2 >= m) and (c2 < c or m2 > m) for j, (c2, m2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_study_charts(study: dict[str, Any], out: Path) -> None:
    """``val_vs_lr.png`` (mean ± CI per strategy) and ``cost_accuracy.png`` (with the Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = study["main"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in sorted({c["strategy"] for c in study["cells"]}):
        pts = sorted((c["lr"], c[f"val/{main}_mean"], c[f"val/{main}_ci_low"], c[f"val/{main}_ci_high"])
                     for c in study["cells"] if c["strategy"] == s and c["n"] and c["lr"])
        if pts:
            errs = [_yerr(m, lo, hi) for _, m, lo, hi in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=list(zip(*errs, strict=True)),
                        marker="o", capsize=3, label=s)
    _finish(fig, ax, "learning rate", f"val {main} (mean, 95% CI)", f"val {main} vs learning rate",
            out / "val_vs_lr.png", legend_size=7)

    rows = [r for r in study["strategies"] if math.isfinite(r[f"test/{main}_mean"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, cost, label in ((axes[0], "train_time_s_mean", "train time (s, mean)"),
                            (axes[1], "trainable_params", "trainable parameters")):
        pts = [(float(r[cost]), float(r[f"test/{main}_mean"])) for r in rows
               if r.get(cost) is not None and math.isfinite(float(r[cost])) and float(r[cost]) > 0]
        named = [r for r in rows if r.get(cost) is not None and math.isfinite(float(r[cost])) and float(r[cost]) > 0]
        for (x, y), r in zip(pts, named, strict=True):
            lo, hi = _yerr(y, r[f"test/{main}_ci_low"], r[f"test/{main}_ci_high"])
            ax.errorbar([x], [y], yerr=[[lo], [hi]], marker="o", capsize=3, label=r["strategy"])
            ax.annotate(r["strategy"], (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
        front = pareto_front(pts)
        if front:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, alpha=0.6,
                    label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"test {main} (mean, 95% CI)")
    fig.suptitle(f"cost vs test {main} (each strategy at its chosen LR)")
    fig.tight_layout()
    fig.savefig(out / "cost_accuracy.png", dpi=100)
    plt.close(fig)
