"""Means, confidence intervals and paired differences over seeds: what a study may claim.

Why: fine-tuning accuracy swings with the seed (Dodge et al. 2020; Mosbach et al. 2021), and
on a 1,000-row test set one seed's standard error is about a point, so two strategies a few
tenths apart in one run each are indistinguishable. A study runs every cell with several
seeds; this module turns those numbers into what can be said:

- :func:`mean_ci`: the mean over seeds with a Student-t confidence interval (n - 1 degrees of
  freedom; a normal interval is far too narrow for 3 seeds);
- :func:`paired_diff`: strategy A minus strategy B over the seeds both ran. Runs that share a
  seed share the data order and the split, so the per-seed difference cancels that variation
  and its interval is much tighter than comparing two independent means;
- :func:`verdict`: ``better`` / ``worse`` when the interval excludes 0, else ``within noise``.

scipy gives the t quantile (it is what the tests compare against). Pure functions of lists of
floats: no pandas, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

CONFIDENCE = 0.95


def _t(n: int, confidence: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sample std, ci_low, ci_high) of ``values``; NaN where undefined (n < 1, n < 2)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return (math.nan,) * 4
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t(n, confidence) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def paired_diff(a: Mapping[object, float], b: Mapping[object, float],
                confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """(mean, ci_low, ci_high, n) of ``a[s] - b[s]`` over the seeds ``s`` in both."""
    common = [s for s in a if s in b and _finite(a[s]) and _finite(b[s])]
    diffs = [float(a[s]) - float(b[s]) for s in common]
    mean, _, lo, hi = mean_ci(diffs, confidence)
    return mean, lo, hi, len(diffs)


def verdict(ci_low: float, ci_high: float) -> str:
    """``better`` / ``worse`` if the interval of a difference excludes 0, else ``within noise``."""
    if _finite(ci_low) and ci_low > 0:
        return "better"
    if _finite(ci_high) and ci_high < 0:
        return "worse"
    return "within noise"


def _finite(v: object) -> bool:
    try:
        return math.isfinite(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
