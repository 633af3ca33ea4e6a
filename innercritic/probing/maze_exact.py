"""Exact values of a maze policy at every square, beside its critic's, and figures that compare them.

A cheese maze is small enough to solve: with the policy's action probabilities at every free square
(the agent looking at the maze with the mouse moved there), the Bellman equations of
:func:`~innercritic.envs.maze_values.policy_value` give the exact value of each square. These
functions do that for a batch of mazes given by their first observations, and also return the
critic's value and how often the policy visits each square from the start within the step limit
(the state distribution a trajectory cache samples), so the critic can be judged both over all
squares and over the squares the policy actually sees (``benchmarks/critic_exact.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from innercritic.agents.noisy import parse_version
from innercritic.envs.maze_values import policy_value, transition_table
from innercritic.probing.metrics import pearson, r2, spearman

__all__ = ["every_square", "maze_square_values", "square_figures", "within_group_spearman"]


def every_square(first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one maze's observation (3, S, S) (walls, mouse, cheese): the frames (F, 3, S, S) with the mouse
    moved to each free square, and those squares (F, 2) in row-major order (the cheese's included)."""
    free = np.argwhere(first[0] == 0)
    many = np.repeat(first[None], len(free), axis=0)
    many[:, 1] = 0
    many[np.arange(len(free)), 1, free[:, 0], free[:, 1]] = 1
    return many, free


def _occupancy(walls: np.ndarray, probs: np.ndarray, cheese: int, start: int, steps: int) -> np.ndarray:
    """Expected visits of each free square (F,) in the first ``steps`` steps from ``start`` (F-indexed), the
    cheese absorbing: the state distribution of the policy's episodes under the step limit."""
    table = transition_table(walls)
    F = len(table)
    P = np.zeros((F, F))
    np.add.at(P, (np.repeat(np.arange(F), 4), table.ravel()), probs.ravel())
    P[cheese] = 0.0  # entering the cheese ends the episode
    d = np.zeros(F)
    d[start] = 1.0
    visits = np.zeros(F)
    for _ in range(steps):
        visits += d
        d = d @ P
        d[cheese] = 0.0
        if d.sum() < 1e-9:
            break
    return visits


@torch.no_grad()
def maze_square_values(agent: torch.nn.Module, first_obs: np.ndarray, gamma: float, version: str = "policy",
                       max_steps: int | None = None, batch: int = 4096) -> list[dict[str, Any]]:
    """Per maze of ``first_obs`` (N, 3, S, S), at every free square but the cheese: ``exact`` (the exact value
    of ``version`` of the policy), ``critic`` (the agent's value), ``occupancy`` (expected visits from the
    start within ``max_steps``, default 4 n^2 for the maze's n open rows and columns), ``squares`` (F, 2) and
    ``frames`` (F, 3, S, S), the observations with the mouse there."""
    policy = parse_version(version)
    device = next(agent.parameters()).device
    out = []
    for first in np.asarray(first_obs):
        frames, free = every_square(first)
        x = torch.from_numpy(frames).to(device)
        logits, value = zip(*(agent(x[i:i + batch]) for i in range(0, len(x), batch)))
        probs = policy.probs(torch.cat(logits).float().cpu()).double().numpy()
        probs /= probs.sum(1, keepdims=True)
        walls = first[0] > 0
        cheese_at = tuple(np.argwhere(first[2] > 0)[0])
        start_at = tuple(np.argwhere(first[1] > 0)[0])
        index = {tuple(sq): k for k, sq in enumerate(free.tolist())}
        exact = policy_value(walls, cheese_at, probs, gamma)[free[:, 0], free[:, 1]]
        # The maze proper: the frame's padding is wall, so the open extent is the bounding box of the free squares.
        n = int(free[:, 0].max() - free[:, 0].min() + 1)
        visits = _occupancy(walls, probs, index[cheese_at], index[start_at], max_steps or 4 * n * n)
        keep = np.arange(len(free)) != index[cheese_at]
        out.append({"squares": free[keep], "frames": frames[keep], "exact": exact[keep],
                    "critic": torch.cat(value).double().cpu().numpy()[keep], "occupancy": visits[keep]})
    return out


def _grouped_ranks(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Average ranks (1..n_g, ties sharing their mean rank) of ``x`` inside each group (``group``: 0..k-1)."""
    order = np.lexsort((x, group))
    xs, gs = x[order], group[order]
    starts = np.flatnonzero(np.r_[True, (xs[1:] != xs[:-1]) | (gs[1:] != gs[:-1])])  # runs of equal values in a group
    ends = np.r_[starts[1:], len(x)]
    first = np.searchsorted(gs, gs[starts])  # where each run's group begins in the sorted order
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0 + 1.0 - first, ends - starts)
    return ranks


def within_group_spearman(pred: np.ndarray, target: np.ndarray, group: np.ndarray) -> float:
    """Mean over groups (mazes) of the Spearman correlation inside each group with at least 3 rows and a
    non-constant target (and prediction): whether the squares of one maze are ranked right, whatever the
    maze's level. Every group at once (ranks by one sort, correlations from per-group sums): a test split
    has hundreds of episodes and every table row asks."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _, g = np.unique(group, return_inverse=True)
    k = int(g.max()) + 1 if len(g) else 0
    n = np.bincount(g, minlength=k).astype(np.float64)
    centred = []
    for x in (pred, target):
        ranks = _grouped_ranks(x, g)
        centred.append(ranks - (np.bincount(g, ranks, minlength=k) / np.maximum(n, 1))[g])
    pc, tc = centred
    var_p, var_t = np.bincount(g, pc * pc, minlength=k), np.bincount(g, tc * tc, minlength=k)
    keep = (n >= 3) & (var_p > 0) & (var_t > 0)  # the ranks vary exactly when the values do
    if not keep.any():
        return float("nan")
    rho = np.bincount(g, pc * tc, minlength=k)[keep] / np.sqrt(var_p[keep] * var_t[keep])
    return float(np.mean(np.clip(rho, -1.0, 1.0)))


def _weighted_r2(pred: np.ndarray, target: np.ndarray, weight: np.ndarray) -> float:
    w = weight / weight.sum()
    mean = float(w @ target)
    return 1.0 - float(w @ (pred - target) ** 2) / max(float(w @ (target - mean) ** 2), 1e-300)


def _weighted_pearson2(pred: np.ndarray, target: np.ndarray, weight: np.ndarray) -> float:
    w = weight / weight.sum()
    pc, tc = pred - w @ pred, target - w @ target
    denom = float(w @ pc ** 2) * float(w @ tc ** 2)
    return float(w @ (pc * tc)) ** 2 / denom if denom > 0 else float("nan")


def square_figures(mazes: Sequence[dict[str, Any]], weighting: str = "uniform", boot: int = 1000,
                   seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """The critic against the exact value over the squares of ``mazes``: name -> (figure, 95% low, high),
    the interval a percentile bootstrap over mazes. ``weighting`` is ``uniform`` (every square once) or
    ``occupancy`` (each square by the policy's expected visits)."""
    if weighting not in ("uniform", "occupancy"):
        raise ValueError(f"weighting {weighting!r} is invalid; valid: 'uniform', 'occupancy'")

    def figures(idx: np.ndarray) -> dict[str, float]:
        pred = np.concatenate([mazes[i]["critic"] for i in idx])
        target = np.concatenate([mazes[i]["exact"] for i in idx])
        if weighting == "occupancy":
            weight = np.concatenate([mazes[i]["occupancy"] for i in idx])
            return {"r2": _weighted_r2(pred, target, weight), "pearson2": _weighted_pearson2(pred, target, weight)}
        group = np.concatenate([np.full(len(mazes[i]["exact"]), k) for k, i in enumerate(idx)])
        return {"r2": r2(pred, target), "pearson2": pearson(pred, target) ** 2, "spearman": spearman(pred, target),
                "within_maze_spearman": within_group_spearman(pred, target, group)}

    point = figures(np.arange(len(mazes)))
    rng = np.random.default_rng(seed)
    draws = [figures(rng.integers(0, len(mazes), len(mazes))) for _ in range(boot)]
    return {k: (v, float(np.nanpercentile([d[k] for d in draws], 2.5)), float(np.nanpercentile([d[k] for d in draws], 97.5)))
            for k, v in point.items()}
