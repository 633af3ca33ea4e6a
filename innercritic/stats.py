"""Confidence intervals shared by every report of rates and means (planning, steering scans, probes)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["Z95", "bootstrap_r2", "grouped_r2", "normal_interval", "wilson_interval"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, trials: float, z: float = Z95) -> tuple[float, float, float]:
    """(proportion, lower, upper): the Wilson score interval; ``trials`` may be an effective, non-integer
    count. nan for no trials."""
    if trials <= 0:
        return math.nan, math.nan, math.nan
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # Clamped to contain p: rounding would otherwise put a bound a few ulps past it at p = 0 or 1.
    return p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def normal_interval(values: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(mean, mean - z SE, mean + z SE) over independent values; nan bounds below 2 values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    se = float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, mean - z * se, mean + z * se


def _group_sums(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, equal_groups: bool) -> np.ndarray:
    """Per group: (weight, weighted sum of target, of target^2, of squared error), (k, 4)."""
    _, g = np.unique(groups, return_inverse=True)
    k = int(g.max()) + 1 if len(g) else 0
    w = 1.0 / np.bincount(g, minlength=k)[g] if equal_groups else np.ones_like(target)
    return np.stack([np.bincount(g, weights=a, minlength=k) for a in (w, w * target, w * target * target, w * (pred - target) ** 2)], 1)


def _r2_of_sums(sums: np.ndarray) -> np.ndarray:
    n, s1, s2, sse = sums.T
    sst = s2 - s1 * s1 / n
    return 1.0 - sse / np.where(sst > 0, sst, np.nan)


def grouped_r2(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, equal_groups: bool = True) -> float:
    """R^2 with every group (episode) weighing the same in both sums, whatever its length: over the states a
    policy visits, a few long, wandering episodes otherwise hold most of the target's variance and decide
    the figure (5 of 200 test episodes held 84% of it on the gamma-0.99 maze agent; BENCHMARKS.md)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if len(target) < 2:
        return math.nan
    return float(_r2_of_sums(_group_sums(pred, target, groups, equal_groups).sum(0, keepdims=True))[0])


@lru_cache(maxsize=32)
def _resamples(k: int, draws: int, seed: int) -> np.ndarray:
    """(draws, k) counts of each of k groups in ``draws`` resamples with replacement; read-only.

    Drawn once per (k, draws, seed) and kept: an evaluation table asks for hundreds of intervals over the
    same test episodes, each of which would draw these same counts again (the seed is shared, so every
    source's interval comes from the same reruns)."""
    counts = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=draws).astype(np.float64)
    counts.setflags(write=False)
    return counts


def bootstrap_r2(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, draws: int = 1000, seed: int = 0,
                 level: float = 0.95, equal_groups: bool = False) -> tuple[float, float]:
    """Percentile interval of R^2 of ``pred`` against ``target`` when whole ``groups`` (episodes, mazes) are
    resampled with replacement: the states of one episode are not independent, so this is the interval
    that a rerun on other episodes would fall in. ``equal_groups`` bootstraps :func:`grouped_r2` instead of
    the per-state R^2. Computed from per-group sums, so 1000 draws cost one (draws x groups) matrix product.
    nan below 2 groups."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    sums = _group_sums(pred, target, groups, equal_groups)
    k = len(sums)
    if k < 2:
        return math.nan, math.nan
    r2 = _r2_of_sums(_resamples(k, draws, seed) @ sums)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.nanpercentile(r2, [tail, 100 - tail])
    return float(lo), float(hi)
