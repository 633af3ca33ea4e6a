"""Confidence intervals shared by every report of rates and means (planning, steering scans)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Z95", "normal_interval", "wilson_interval"]

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
