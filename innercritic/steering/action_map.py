"""Per-square action maps of a maze policy, unsteered, steered and their difference.

The "vector field" pictures of Mini et al. 2023 ("Understanding and Controlling a Maze-Solving
Policy Network"): the mouse is placed on every free square of one maze in turn (``CheeseMaze.observe``
with positions), the policy's action distribution there is read, and an arrow shows its mean
displacement sum_a pi(a | s) * delta_a. The steered map adds ``coefficient * vector`` at the
vector's hook (Turner et al. 2023, "Steering GPT-2-XL by adding an activation vector"); the
difference map shows steered minus unsteered arrows, coloured by the total-variation distance of
the two distributions at each square.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas, without pyplot, so no
global state or display is involved; save them with ``fig.savefig(path)``.

Run (the ``SteeringPlots`` callback draws them after a scan)::

    python train.py test -c configs/steer/maze.yaml --model.agent_ckpt A.ckpt
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from innercritic.agents.hooks import AddVector, HookedModule
from innercritic.envs.factory import make_env
from innercritic.envs.maze_values import ACTION_DELTAS, decision_square, free_squares
from innercritic.steering.scan import HELDOUT_SEED_OFFSET
from innercritic.steering.vectors import LevelVectors, SteeringVector, check_steering

__all__ = ["ActionMap", "action_map", "action_map_figure", "draw_action_map"]


@dataclass
class ActionMap:
    """Action distributions at every free, non-cheese square of one maze."""

    walls: np.ndarray  # bool (n, n), True = wall
    cheese: tuple[int, int] | None  # (row, col) of the cheese, None when removed
    squares: np.ndarray  # int64 (F, 2) (row, col) of each square drawn
    probs: np.ndarray  # float64 (F, A) action distribution at each square
    values: np.ndarray  # float64 (F,) the critic's value at each square
    level_seed: int  # the maze's level seed (rebuild it with generate_level)

    @property
    def arrows(self) -> np.ndarray:
        """(F, 2) mean displacement (d_row, d_col) of the action distribution at each square."""
        return self.probs[:, : len(ACTION_DELTAS)] @ ACTION_DELTAS.astype(np.float64)


@torch.no_grad()
def action_map(agent: HookedModule, env: Any, i: int = 0, interventions: Mapping[str, Any] | None = None) -> ActionMap:
    """The :class:`ActionMap` of env ``i``'s current maze (a ``CheeseMaze``), with ``interventions`` installed."""
    walls = env.walls(i)
    cheese = tuple(int(v) for v in env.cheese_pos[i])
    cheese = None if cheese == (-1, -1) else cheese
    squares = free_squares(walls)
    if cheese is not None:
        squares = squares[~((squares[:, 0] == cheese[0]) & (squares[:, 1] == cheese[1]))]
    device = next(agent.parameters()).device
    obs = torch.from_numpy(env.observe(i, squares)).to(device)
    if interventions:
        with agent.intervene(interventions):
            logits, value = agent(obs)
    else:
        logits, value = agent(obs)
    probs = torch.softmax(logits.double(), -1).cpu().numpy()
    return ActionMap(walls, cheese, squares, probs, value.double().cpu().numpy(), int(env.level_seeds[i]))


def draw_action_map(ax: Any, amap: ActionMap, title: str = "", arrows: np.ndarray | None = None, colour: np.ndarray | None = None,
                    decision: tuple[int, int] | None = None, gain: float = 1.0) -> None:
    """Draw walls, cheese, start, decision square and one arrow per square onto matplotlib axes ``ax``.

    ``arrows`` replaces the map's own mean displacements (e.g. a difference of two maps), drawn
    ``gain`` times longer; ``colour`` (F,) colours them on a viridis scale.
    """
    n = amap.walls.shape[0]
    ax.imshow(amap.walls, cmap="Greys", vmin=0, vmax=1.6, origin="upper", interpolation="nearest")
    d = (amap.arrows if arrows is None else arrows) * float(gain)
    rows, cols = amap.squares[:, 0].astype(float), amap.squares[:, 1].astype(float)
    # angles="xy" in data coordinates: with the image's y axis pointing down, +d_row points down.
    kwargs = dict(angles="xy", scale_units="xy", scale=1.25, width=0.006, headwidth=4, headlength=4, headaxislength=3.5)
    if colour is None:
        ax.quiver(cols, rows, d[:, 1], d[:, 0], color="tab:blue", **kwargs)
    else:
        q = ax.quiver(cols, rows, d[:, 1], d[:, 0], colour, cmap="viridis", clim=(0.0, max(1e-6, float(np.max(colour)))), **kwargs)
        ax.figure.colorbar(q, ax=ax, fraction=0.046, pad=0.04, label="total variation")
    if amap.cheese is not None:
        ax.plot(amap.cheese[1], amap.cheese[0], marker="o", color="gold", markeredgecolor="black", markersize=9, label="cheese")
    ax.plot(0, n - 1, marker="s", color="tab:green", markersize=6, alpha=0.7, label="start")
    ax.plot(n - 1, 0, marker="^", color="tab:red", markersize=6, alpha=0.7, label="top-right")
    if decision is not None:
        ax.plot(decision[1], decision[0], marker="D", fillstyle="none", color="tab:orange", markersize=10, label="decision square")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def action_map_figure(
    agent: HookedModule,
    vector: SteeringVector | LevelVectors,
    coefficient: float,
    env_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    positions: Sequence[Sequence[int]] | None = None,
    tries: int = 50,
) -> tuple[Any, dict[str, Any]]:
    """A three-panel figure (unsteered, steered, difference) for one held-out maze, and its data.

    The maze is the first of up to ``tries`` held-out levels (seeded from ``HELDOUT_SEED_OFFSET +
    seed``) that has a decision square, so the picture shows the choice between cheese and corner.
    A :class:`LevelVectors` is built in that maze, as a scan builds it. Returns ``(figure, data)`` where
    data holds both :class:`ActionMap` objects and summary numbers (mean total variation, level seed).
    """
    from matplotlib.figure import Figure  # a lazy import: scans that draw nothing never load matplotlib

    check_steering(agent, vector, positions)
    pos = None if positions is None else [tuple(int(v) for v in p) for p in positions]
    base = HELDOUT_SEED_OFFSET + int(seed)
    env = make_env("maze", 1, seed=base, **dict(env_kwargs or {}))
    decision = None
    try:
        for t in range(max(1, int(tries))):
            env.reset(seed=base + t)
            cheese = tuple(int(v) for v in env.cheese_pos[0])
            decision = decision_square(env.walls(0), cheese)
            if decision is not None:
                break
        device = next(agent.parameters()).device
        tensor = vector.build(agent, env, [0])[0] if isinstance(vector, LevelVectors) else vector.tensor
        steer = {vector.hook: AddVector(tensor.to(device), coeff=float(coefficient), positions=pos)}
        plain = action_map(agent, env, 0)
        steered = action_map(agent, env, 0, steer)
    finally:
        env.close()
    tv = 0.5 * np.abs(steered.probs - plain.probs).sum(1)
    fig = Figure(figsize=(12.5, 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    draw_action_map(axes[0], plain, "unsteered", decision=decision)
    draw_action_map(axes[1], steered, f"steered: {vector.source} x {coefficient:g} at {vector.hook}", decision=decision)
    diff = steered.arrows - plain.arrows
    longest = float(np.linalg.norm(diff, axis=1).max(initial=0.0))
    # Small differences are the common case; drawn to scale they would vanish, so the longest is
    # stretched to most of a square and the factor goes into the title.
    gain = 0.9 / longest if longest > 0 else 1.0
    draw_action_map(axes[2], plain, f"steered - unsteered (arrows x{gain:.3g}; mean TV {tv.mean():.3f})", arrows=diff, colour=tv,
                    decision=decision, gain=gain)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"action maps, level seed {plain.level_seed}", fontsize=10)
    data = {"unsteered": plain, "steered": steered, "total_variation": tv, "mean_total_variation": float(tv.mean()),
            "level_seed": plain.level_seed, "decision_square": decision}
    return fig, data
