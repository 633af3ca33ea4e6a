"""Probe-quality metrics on numpy arrays (float64 math, python floats out).

All functions take 1-d arrays (anything ``np.asarray`` flattens to one dimension) and raise a
one-line ``ValueError`` when lengths differ or there are fewer than two samples.
"""

from __future__ import annotations

import numpy as np

from innercritic.errors import InnerCriticError

__all__ = [
    "dominance_accuracy",
    "mse_over_var",
    "normalised_td_error",
    "pearson",
    "r2",
    "spearman",
]


def _vectors(*arrays: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    """Return the arrays as flat float64 vectors of one common length >= 2."""
    out = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    lengths = {len(a) for a in out}
    if len(lengths) != 1:
        shown = ", ".join(f"{n}={len(a)}" for n, a in zip(names, out, strict=True))
        raise InnerCriticError(f"mismatched lengths: {shown}")
    if len(out[0]) < 2:
        raise InnerCriticError(f"need at least 2 samples, got {len(out[0])}")
    return out


def r2(pred: np.ndarray, target: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot of ``pred`` against ``target``."""
    p, t = _vectors(pred, target, names=("pred", "target"))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    ss_res = float(np.sum((t - p) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else float("-inf")
    return 1.0 - ss_res / ss_tot


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either input is constant."""
    p, t = _vectors(pred, target, names=("pred", "target"))
    pc, tc = p - p.mean(), t - t.mean()
    denom = float(np.sqrt(np.sum(pc**2) * np.sum(tc**2)))
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.sum(pc * tc) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends - 1) / 2.0 + 1.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties share their mean rank)."""
    p, t = _vectors(pred, target, names=("pred", "target"))
    return pearson(_average_ranks(p), _average_ranks(t))


def mse_over_var(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean squared error divided by the (population) variance of ``target``; equals 1 - R^2."""
    p, t = _vectors(pred, target, names=("pred", "target"))
    var = float(t.var())
    mse = float(np.mean((p - t) ** 2))
    if var == 0.0:
        return 0.0 if mse == 0.0 else float("inf")
    return mse / var


def normalised_td_error(
    v: np.ndarray,
    v_next: np.ndarray,
    reward: np.ndarray,
    terminal: np.ndarray,
    gamma: float,
) -> float:
    """Mean of (v - r - gamma (1 - terminal) v_next)^2 divided by Var(v).

    ``terminal`` is 1 only at true terminations: truncated steps carry terminal=0 and bootstrap.
    """
    v_, vn, r, d = _vectors(
        v, v_next, reward, terminal, names=("v", "v_next", "reward", "terminal")
    )
    delta = v_ - r - gamma * (1.0 - d) * vn
    mse = float(np.mean(delta**2))
    var = float(v_.var())
    # A constant prediction (up to float rounding) has no scale to normalise by.
    if var <= 1e-12 * max(1.0, float(np.mean(v_**2))):
        return 0.0 if mse == 0.0 else float("inf")
    return mse / var


def dominance_accuracy(v0: np.ndarray, vi: np.ndarray) -> float:
    """Fraction of states where the policy's value ``v0`` strictly exceeds the noisy one ``vi``."""
    a, b = _vectors(v0, vi, names=("v0", "vi"))
    return float(np.mean(a > b))
