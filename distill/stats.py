"""Bootstrap confidence intervals for evaluation figures: pure numpy, no Ray.

    idx = resample_indices(n=200, samples=1000, seed=0)     # one shared resampling per set
    lo, hi = mean_ci(correct, idx)                           # 95% CI of an accuracy
    lo, hi = ratio_ci(student, teacher, idx)                 # of "% of teacher kept" (paired)

Every model is scored on the same prompts, so intervals of differences and ratios resample the
prompts once and apply the same indices to both models (a paired bootstrap): the prompts'
difficulty cancels, and the interval is as narrow as the data allow. Percentile intervals.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95


def resample_indices(n: int, samples: int, seed: int = 0) -> np.ndarray:
    """[samples, n] indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return (float(lo), float(hi))


def mean_ci(values: Sequence[float], idx: np.ndarray) -> tuple[float, float]:
    """95% CI of the mean of per-item values."""
    return _interval(np.asarray(values, dtype=float)[idx].mean(axis=1))


def diff_ci(a: Sequence[float], b: Sequence[float], idx: np.ndarray) -> tuple[float, float]:
    """95% CI of mean(a) - mean(b), paired by item."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return _interval(a[idx].mean(axis=1) - b[idx].mean(axis=1))


def ratio_ci(a: Sequence[float], b: Sequence[float], idx: np.ndarray) -> tuple[float, float]:
    """95% CI of mean(a) / mean(b), paired by item (resamples where mean(b) is 0 are left out)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    num, den = a[idx].mean(axis=1), b[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(np.where(den > 0, num / den, np.nan))


def statistic_ci(stat: Callable[[np.ndarray], float], idx: np.ndarray) -> tuple[float, float]:
    """95% CI of any statistic of a resample (given its indices): for corpus-level metrics."""
    return _interval(np.array([stat(row) for row in idx], dtype=float))


def separation(diff: float, ci: tuple[float, float], n: int, what: str, metric: str) -> str:
    """One sentence: does the data separate the student from the teacher on this set?"""
    lo, hi = ci
    span = f"{diff:+.3f} {metric} (95% CI {lo:+.3f} to {hi:+.3f}, {n} prompts)"
    if lo > 0:
        return f"{what}: the student is better than the teacher by {span}."
    if hi < 0:
        return f"{what}: the student is below the teacher by {span}."
    return f"{what}: {n} prompts are too few to separate student from teacher: the difference is {span}."
