"""Coefficient scans: play held-out episodes with ``coefficient * vector`` added at a hook point.

Activation addition (Turner et al. 2023, "Steering GPT-2-XL by adding an activation vector") applied
to an RL policy as in Mini et al. 2023 ("Understanding and Controlling a Maze-Solving Policy
Network"): at every coefficient of a grid, ``episodes`` episodes are played with the vector added on
every forward pass (optionally only at chosen spatial positions of a conv activation), and the
behaviour is summarised with confidence intervals.

Reproducibility is the point of the design: every coefficient plays the same env seeds and draws its
actions from a generator seeded the same way, so coefficient 0 reproduces the unsteered agent bit
for bit (``AddVector`` returns the activation itself at 0), and any difference between coefficients
is the vector's doing, not the dice's. Episodes are each env's *first* episode after a reset (as in
``RolloutDataModule.evaluate``), so short episodes are not over-represented, on levels seeded from a
range (``HELDOUT_SEED_OFFSET``) that training and vector construction never use.

Metrics of one row (proportions get Wilson intervals, means mean +- 1.96 SE over episodes; every
metric ``m`` comes with ``m_lo`` and ``m_hi``):

- ``return``, ``success`` (terminated with positive reward), ``length``;
- ``kl``: KL(steered || unsteered) of the action distributions at the states the steered agent
  visits (one extra forward pass without the vector), averaged per episode, then over episodes;
- ``value_change``: the critic's value with the vector minus without it, at the same states;
- maze only: ``p_cheese`` (reached the cheese), ``p_top_right`` (stood on the top-right corner at
  some step), ``p_first_move_cheese`` (of the episodes that reach their maze's decision square, the
  share whose first move there heads for the cheese; ``n_decision`` counts them) and
  ``pi_first_move_cheese`` (the steered policy's probability of that move with the mouse placed on
  the decision square, over every maze that has one: the smoother figure Mini et al. report).

Run::

    python train.py test -c configs/steer/maze.yaml --model.agent_ckpt A.ckpt
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from innercritic.agents.hooks import AddVector, HookedModule
from innercritic.agents.noisy import PolicyVersion
from innercritic.envs.factory import env_family, make_env
from innercritic.envs.maze_values import decision_square, first_move_toward
from innercritic.stats import normal_interval, wilson_interval
from innercritic.steering.vectors import SteeringVector, check_vector

__all__ = [
    "HELDOUT_SEED_OFFSET",
    "MEAN_METRICS",
    "PROPORTION_METRICS",
    "check_coefficients",
    "normal_interval",
    "play_episodes",
    "run_scan",
    "summarise_episodes",
    "wilson_interval",
]

# Scan levels come from a seed range neither training (small seeds), PPO evaluation
# (1_000_000_007 + ...) nor vector construction (3_000_000_019 + ...) draws from.
HELDOUT_SEED_OFFSET = 2_000_000_011
POLICY = PolicyVersion("policy")  # scans sample the (steered) policy itself, no noise

PROPORTION_METRICS = ("success", "p_cheese", "p_top_right", "p_first_move_cheese")
MEAN_METRICS = ("return", "length", "kl", "value_change", "pi_first_move_cheese")


def check_coefficients(coefficients: Sequence[float]) -> list[float]:
    """The coefficients as floats; a one-line ValueError for an empty list or a non-finite value."""
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence) and not isinstance(coefficients, np.ndarray):
        raise ValueError(f"coefficients must be a list of numbers, e.g. [-1, 0, 1], got {coefficients!r}")
    out = []
    for c in coefficients:
        try:
            value = float(c)
        except (TypeError, ValueError):
            raise ValueError(f"coefficient {c!r} is not a number; coefficients must be finite numbers, e.g. [-1, 0, 1]") from None
        if not math.isfinite(value):
            raise ValueError(f"coefficient {c!r} is not finite; coefficients must be finite numbers, e.g. [-1, 0, 1]")
        out.append(value)
    if not out:
        raise ValueError("coefficients is empty; give at least one coefficient, e.g. [-1, 0, 1] (0 is the unsteered agent)")
    return out


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


@torch.inference_mode()
def play_episodes(
    agent: HookedModule,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    episodes: int,
    seed: int = 0,
    interventions: Mapping[str, Any] | None = None,
    num_envs: int | None = None,
    trace: bool = False,
) -> dict[str, Any]:
    """Play each env's first episode ``episodes`` times with ``interventions`` installed; per-episode arrays.

    Env ``i`` of round ``r`` is reset with seed ``HELDOUT_SEED_OFFSET + seed + r * num_envs`` and the
    actions come from one generator seeded ``HELDOUT_SEED_OFFSET + seed``, whatever the
    interventions, so two calls differ only by what the interventions change. Only envs still in
    their first episode are forwarded (the others step with action 0 and are not counted), which keeps
    the long tail of a scan cheap. ``trace=True`` also returns every step's observations and actions
    (for tests of exact reproduction).
    """
    episodes = _check_count(episodes, "episodes")
    n = min(_check_count(num_envs, "num_envs") if num_envs is not None else episodes, episodes)
    steered = bool(interventions)
    is_maze = env_family(env_spec) == "maze"
    device = _device(agent)
    base = HELDOUT_SEED_OFFSET + int(seed)
    env = make_env(env_spec, n, seed=base, **dict(env_kwargs or {}))
    generator = torch.Generator(device=device).manual_seed(base)
    keys = ["return", "length", "success", "kl", "value_change"]
    if is_maze:
        keys += ["p_cheese", "p_top_right", "has_decision", "reached_decision", "first_move_cheese", "pi_first_move_cheese"]
    out: dict[str, list] = {k: [] for k in keys}
    steps: list[dict[str, np.ndarray]] = []

    def forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if steered:
            with agent.intervene(interventions):
                logits_s, value_s = agent(x)
            logits_u, value_u = agent(x)
        else:
            logits_s, value_s = agent(x)
            logits_u, value_u = logits_s, value_s
        return logits_s, value_s, logits_u, value_u

    try:
        for r in range(-(-episodes // n)):
            obs, _ = env.reset(seed=base + r * n)
            m = min(n, episodes - r * n)
            pending = np.zeros(n, bool)
            pending[:m] = True
            ret = np.zeros(n)
            length = np.zeros(n, np.int64)
            success = np.zeros(n, bool)
            kl_sum = np.zeros(n)
            dv_sum = np.zeros(n)
            top_right = np.zeros(n, bool)
            if is_maze:
                ds_rc, toward, pi_toward = _decision_squares(env, m, forward, device)
                reached = np.zeros(n, bool)
                first_cheese = np.zeros(n, bool)
            action = np.zeros(n, np.int64)
            while pending.any():
                idx = np.flatnonzero(pending)
                logits_s, value_s, logits_u, value_u = forward(torch.from_numpy(obs[idx]).to(device))
                chosen = POLICY.sample(logits_s, generator)
                action[:] = 0
                action[idx] = chosen.cpu().numpy()
                if steered:
                    logp_s, logp_u = torch.log_softmax(logits_s.double(), -1), torch.log_softmax(logits_u.double(), -1)
                    # Rounding can leave a hair below 0 for near-identical distributions; KL never is.
                    kl_sum[idx] += (logp_s.exp() * (logp_s - logp_u)).sum(-1).clamp_min(0.0).cpu().numpy()
                    dv_sum[idx] += (value_s.float() - value_u.float()).double().cpu().numpy()
                if is_maze:
                    # The first visit to the decision square decides; later visits are after a wrong turn.
                    mouse = env.mouse_pos[idx]
                    at = (toward[idx] >= 0) & ~reached[idx] & (mouse == ds_rc[idx]).all(1)
                    if at.any():
                        hit = idx[at]
                        reached[hit] = True
                        first_cheese[hit] = action[hit] == toward[hit]
                if trace:
                    steps.append({"env": idx.copy(), "obs": obs[idx].copy(), "action": action[idx].copy()})
                obs, reward, terminated, truncated, info = env.step(action)
                ret[idx] += reward[idx]
                length[idx] += 1
                if is_maze:
                    top_right[idx] |= np.asarray(info["at_top_right"])[idx]
                done = (terminated | truncated) & pending
                success |= done & terminated & (reward > 0)
                pending &= ~done
            out["return"].append(ret[:m])
            out["length"].append(length[:m])
            out["success"].append(success[:m])
            out["kl"].append(kl_sum[:m] / length[:m])
            out["value_change"].append(dv_sum[:m] / length[:m])
            if is_maze:
                out["p_cheese"].append(success[:m])
                out["p_top_right"].append(top_right[:m])
                out["has_decision"].append(toward[:m] >= 0)
                out["reached_decision"].append(reached[:m])
                out["first_move_cheese"].append(first_cheese[:m])
                out["pi_first_move_cheese"].append(pi_toward[:m])
    finally:
        env.close()
    result: dict[str, Any] = {k: np.concatenate(v) for k, v in out.items()}
    if trace:
        result["trace"] = steps
    return result


def _decision_squares(env: Any, m: int, forward: Callable, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per env: its decision square (row, col), the action toward the cheese there (-1: none), and the
    steered policy's probability of that action with the mouse placed there (nan: none)."""
    n = env.num_envs
    ds_rc = np.full((n, 2), -1, np.int64)
    toward = np.full(n, -1, np.int64)
    pi = np.full(n, np.nan)
    cheese = env.cheese_pos
    views, rows = [], []
    for i in range(m):
        walls = env.walls(i)
        ds = decision_square(walls, cheese[i])
        if ds is None:
            continue
        ds_rc[i] = ds
        toward[i] = first_move_toward(walls, ds, cheese[i])
        views.append(env.observe(i, np.array([ds], dtype=np.int64)))
        rows.append(i)
    if rows:
        logits_s = forward(torch.from_numpy(np.concatenate(views)).to(device))[0]
        probs = POLICY.probs(logits_s.float()).double().cpu().numpy()
        rows_a = np.array(rows)
        pi[rows_a] = probs[np.arange(len(rows)), toward[rows_a]]
    return ds_rc, toward, pi


def summarise_episodes(episodes: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Metrics with interval bounds from :func:`play_episodes`' per-episode arrays."""
    row: dict[str, Any] = {"episodes": int(len(episodes["return"]))}

    def put(name: str, triple: tuple[float, float, float]) -> None:
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = triple

    for name in ("return", "length", "kl", "value_change"):
        put(name, normal_interval(episodes[name]))
    put("success", wilson_interval(int(np.sum(episodes["success"])), len(episodes["success"])))
    if "p_cheese" in episodes:
        put("p_cheese", wilson_interval(int(np.sum(episodes["p_cheese"])), len(episodes["p_cheese"])))
        put("p_top_right", wilson_interval(int(np.sum(episodes["p_top_right"])), len(episodes["p_top_right"])))
        reached = np.asarray(episodes["reached_decision"], bool)
        put("p_first_move_cheese", wilson_interval(int(np.sum(episodes["first_move_cheese"][reached])), int(reached.sum())))
        row["n_decision"] = int(reached.sum())
        has = np.asarray(episodes["has_decision"], bool)
        put("pi_first_move_cheese", normal_interval(np.asarray(episodes["pi_first_move_cheese"])[has]))
        row["n_decision_mazes"] = int(has.sum())
    return row


def run_scan(
    agent: HookedModule,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    vector: SteeringVector,
    coefficients: Sequence[float],
    episodes: int = 100,
    seed: int = 0,
    positions: Sequence[Sequence[int]] | None = None,
    num_envs: int | None = None,
    progress: Callable[[int, float, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per coefficient: ``episodes`` held-out episodes with ``coefficient * vector`` at its hook.

    Everything is validated before the first episode: the hook exists, the vector fits it, the
    positions lie on its grid, the coefficients are a non-empty list of finite numbers. Rows hold
    ``source``, ``hook``, ``coefficient``, ``vector_norm``, ``positions``, ``episodes`` and every
    metric with ``_lo`` / ``_hi`` bounds (see the module docstring). ``progress(i, coefficient,
    row)`` is called after each coefficient.
    """
    if not isinstance(vector, SteeringVector):
        raise ValueError(f"vector must be a SteeringVector, got {type(vector).__name__}")
    coefficients = check_coefficients(coefficients)
    _check_count(episodes, "episodes")
    env_family(env_spec)
    check_vector(agent, vector.tensor, vector.hook, positions)
    pos = None if positions is None else [tuple(int(v) for v in p) for p in positions]
    tensor = vector.tensor.to(_device(agent))
    rows = []
    for i, c in enumerate(coefficients):
        intervention = {vector.hook: AddVector(tensor, coeff=c, positions=pos)}
        # At 0, AddVector returns its input, so the steered agent is the unsteered one and the reference
        # forward pass (for KL and value change) would only copy it: skip both. Tests check that an
        # installed coefficient-0 vector reproduces the same episodes bit for bit.
        result = play_episodes(agent, env_spec, env_kwargs, episodes, seed, intervention if c != 0 else None, num_envs)
        row = {"source": vector.source, "hook": vector.hook, "coefficient": c, "vector_norm": vector.norm,
               "positions": None if pos is None else [list(p) for p in pos], **summarise_episodes(result)}
        rows.append(row)
        if progress is not None:
            progress(i, c, row)
    return rows


def _device(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")
