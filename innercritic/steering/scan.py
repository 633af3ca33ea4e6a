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
  some step), ``p_decision_cheese`` and ``p_decision_top_right`` (of the episodes that reach their
  maze's decision square, where the paths to the cheese and to the corner part, the share whose first
  move there heads for the cheese, or for the corner: the literature's metric; ``n_decision`` counts
  them) and ``pi_decision_cheese`` / ``pi_decision_top_right`` (the steered policy's probability of
  that move with the mouse placed on the decision square, over every maze that has one: the smoother
  figure Mini et al. report); with a ``retarget`` vector, ``p_target`` (the mouse stood on its level's
  retargeting square at some step).

A vector is a :class:`SteeringVector` (the same in every maze) or :class:`LevelVectors` (each maze's
own contrast vector, built after its reset, as Mini et al. build the cheese vector); rows record
``per_level`` and ``vector_norm`` (the mean over the episodes' vectors for per-level ones).

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
from innercritic.envs.episodes import run_episodes
from innercritic.envs.factory import env_family
from innercritic.envs.maze_values import decision_square, first_move_toward
from innercritic.stats import normal_interval, wilson_interval
from innercritic.steering.vectors import LevelVectors, SteeringVector, check_steering, target_square
from innercritic.errors import InnerCriticError

__all__ = [
    "HELDOUT_SEED_OFFSET",
    "Steer",
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

PROPORTION_METRICS = ("success", "p_cheese", "p_top_right", "p_decision_cheese", "p_decision_top_right", "p_target")
MEAN_METRICS = ("return", "length", "kl", "value_change", "pi_decision_cheese", "pi_decision_top_right")


class Steer:
    """What a scan adds at one hook: ``coefficient * vector``, the vector fixed or one per level.

    A :class:`SteeringVector` is added as it is in every maze; a :class:`LevelVectors` is built anew
    for each level after its reset (:meth:`start`), so every env of a batch gets its own maze's vector
    and :meth:`interventions` hands each forward pass the rows of the envs it runs on.
    """

    def __init__(self, vector: SteeringVector | LevelVectors, coefficient: float, positions: Sequence[Sequence[int]] | None = None) -> None:
        self.vector = vector
        self.coefficient = float(coefficient)
        self.positions = None if positions is None else [tuple(int(v) for v in p) for p in positions]
        self._fixed: Tensor | None = None
        self._per_env: Tensor | None = None

    @property
    def per_level(self) -> bool:
        return isinstance(self.vector, LevelVectors)

    def start(self, agent: HookedModule, env: Any, m: int) -> np.ndarray:
        """Called after each reset of ``env``: builds the first ``m`` envs' vectors; returns their norms."""
        device = _device(agent)
        if not self.per_level:
            if self._fixed is None:
                self._fixed = self.vector.tensor.to(device)
            return np.full(m, self.vector.norm)
        vectors = self.vector.build(agent, env, range(m))
        self._per_env = torch.zeros((env.num_envs, *vectors.shape[1:]), dtype=vectors.dtype)
        self._per_env[:m] = vectors
        self._per_env = self._per_env.to(device)
        return vectors.double().flatten(1).norm(dim=1).numpy()

    def interventions(self, rows: np.ndarray) -> dict[str, AddVector]:
        """The intervention for a forward pass over the envs ``rows``."""
        tensor = self._fixed if not self.per_level else self._per_env[torch.as_tensor(rows, device=self._per_env.device)]
        return {self.vector.hook: AddVector(tensor, coeff=self.coefficient, positions=self.positions)}


def check_coefficients(coefficients: Sequence[float]) -> list[float]:
    """The coefficients as floats; a one-line ValueError for an empty list or a non-finite value."""
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence) and not isinstance(coefficients, np.ndarray):
        raise InnerCriticError(f"coefficients must be a list of numbers, e.g. [-1, 0, 1], got {coefficients!r}")
    out = []
    for c in coefficients:
        try:
            value = float(c)
        except (TypeError, ValueError):
            raise InnerCriticError(f"coefficient {c!r} is not a number; coefficients must be finite numbers, e.g. [-1, 0, 1]") from None
        if not math.isfinite(value):
            raise InnerCriticError(f"coefficient {c!r} is not finite; coefficients must be finite numbers, e.g. [-1, 0, 1]")
        out.append(value)
    if not out:
        raise InnerCriticError("coefficients is empty; give at least one coefficient, e.g. [-1, 0, 1] (0 is the unsteered agent)")
    return out


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InnerCriticError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


@torch.inference_mode()
def play_episodes(
    agent: HookedModule,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    episodes: int,
    seed: int = 0,
    interventions: Mapping[str, Any] | Steer | None = None,
    num_envs: int | None = None,
    trace: bool = False,
    track_targets: bool = False,
) -> dict[str, Any]:
    """Play each env's first episode ``episodes`` times with ``interventions`` installed; per-episode arrays.

    ``track_targets`` (maze) also records ``p_target``: whether the mouse stood on its level's
    retargeting square (``vectors.target_square``) at some step.

    ``interventions`` is a mapping of hook name to intervention, installed as it is on every forward
    pass, or a :class:`Steer`, whose per-level vectors are built after each reset. The episodes are
    played by ``innercritic.envs.episodes.run_episodes`` from seed ``HELDOUT_SEED_OFFSET + seed``,
    whatever the interventions, so two calls differ only by what the interventions change. Only envs
    still in their first episode are forwarded (the others step with action 0 and are not counted),
    which keeps the long tail of a scan cheap. ``trace=True`` also returns every step's observations
    and actions (for tests of exact reproduction).
    """
    episodes = _check_count(episodes, "episodes")
    n = min(_check_count(num_envs, "num_envs") if num_envs is not None else episodes, episodes)
    steer = interventions if isinstance(interventions, Steer) else None
    steered = bool(interventions)
    is_maze = env_family(env_spec) == "maze"
    device = _device(agent)
    steps: list[dict[str, np.ndarray]] = []
    norms: list[np.ndarray] = []
    # Per round: each env's decision square, the moves there toward cheese and corner, the policy's
    # probabilities of them, and the first move the mouse made there.
    state: dict[str, np.ndarray] = {}

    def forward(x: Tensor, rows: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if steered:
            with agent.intervene(steer.interventions(rows) if steer is not None else interventions):
                logits_s, value_s = agent(x)
            logits_u, value_u = agent(x)
        else:
            logits_s, value_s = agent(x)
            logits_u, value_u = logits_s, value_s
        return logits_s, value_s, logits_u, value_u

    def on_reset(env: Any, m: int) -> None:
        if steer is not None:
            norms.append(steer.start(agent, env, m))
        if is_maze:
            state["ds"], state["toward"], state["pi"] = _decision_squares(env, m, forward, device)
            state["first_move"] = np.full(env.num_envs, -1, np.int64)
        if track_targets:
            state["target"] = np.array([target_square(env, i) for i in range(env.num_envs)], np.int64)
            state["on_target"] = np.zeros(env.num_envs, bool)

    def act(env: Any, obs: np.ndarray, pending: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        idx = np.flatnonzero(pending)
        logits_s, value_s, logits_u, value_u = forward(torch.from_numpy(obs[idx]).to(device), idx)
        action = np.zeros(len(obs), np.int64)
        action[idx] = POLICY.sample(logits_s, generator).cpu().numpy()
        extras = {}
        if steered:
            kl, dv = np.zeros(len(obs)), np.zeros(len(obs))
            logp_s, logp_u = torch.log_softmax(logits_s.double(), -1), torch.log_softmax(logits_u.double(), -1)
            # Rounding can leave a hair below 0 for near-identical distributions; KL never is.
            kl[idx] = (logp_s.exp() * (logp_s - logp_u)).sum(-1).clamp_min(0.0).cpu().numpy()
            dv[idx] = (value_s.float() - value_u.float()).double().cpu().numpy()
            extras = {"kl": kl, "value_change": dv}
        if is_maze:
            # The first visit to the decision square decides; later visits are after a wrong turn.
            first = state["first_move"]
            at = (state["toward"][idx, 0] >= 0) & (first[idx] < 0) & (env.mouse_pos[idx] == state["ds"][idx]).all(1)
            first[idx[at]] = action[idx[at]]
        if track_targets:
            state["on_target"][idx] |= (env.mouse_pos[idx] == state["target"][idx]).all(1)
        if trace:
            steps.append({"env": idx.copy(), "obs": obs[idx].copy(), "action": action[idx].copy()})
        return action, extras

    def round_records() -> dict[str, np.ndarray]:
        if not is_maze:
            return {}
        toward, first = state["toward"], state["first_move"]
        # Checked at the start of each step: a target first stood on by the last step of a cut episode is missed.
        targets = {"p_target": state["on_target"]} if track_targets else {}
        return {**targets, "has_decision": toward[:, 0] >= 0, "reached_decision": first >= 0,
                "decision_cheese": (first >= 0) & (first == toward[:, 0]), "decision_top_right": (first >= 0) & (first == toward[:, 1]),
                "pi_decision_cheese": state["pi"][:, 0], "pi_decision_top_right": state["pi"][:, 1]}

    ep = run_episodes(env_spec, env_kwargs, episodes, HELDOUT_SEED_OFFSET + int(seed), n, act, device, on_reset, round_records)
    zeros = np.zeros(len(ep["length"]))
    result: dict[str, Any] = {"return": ep["return"], "length": ep["length"], "success": ep["success"],
                              "kl": ep.get("sum/kl", zeros) / ep["length"], "value_change": ep.get("sum/value_change", zeros) / ep["length"]}
    if steer is not None:
        result["vector_norm"] = np.concatenate(norms)
    if track_targets:
        result["p_target"] = ep["p_target"]
    if is_maze:
        result.update(p_cheese=ep["success"], p_top_right=ep["top_right"],
                      **{k: ep[k] for k in ("has_decision", "reached_decision", "decision_cheese", "decision_top_right",
                                            "pi_decision_cheese", "pi_decision_top_right")})
    if trace:
        result["trace"] = steps
    return result


def _decision_squares(env: Any, m: int, forward: Callable, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per env: its decision square (row, col); the actions there toward the cheese and toward the
    top-right corner (n, 2; -1: no decision square); and the steered policy's probabilities of those
    two actions with the mouse placed there (n, 2; nan: none)."""
    n = env.num_envs
    ds_rc = np.full((n, 2), -1, np.int64)
    toward = np.full((n, 2), -1, np.int64)
    pi = np.full((n, 2), np.nan)
    cheese = env.cheese_pos
    views, rows = [], []
    for i in range(m):
        walls = env.walls(i)
        ds = decision_square(walls, cheese[i])
        if ds is None:
            continue
        ds_rc[i] = ds
        toward[i] = first_move_toward(walls, ds, cheese[i]), first_move_toward(walls, ds, (0, walls.shape[0] - 1))
        views.append(env.observe(i, np.array([ds], dtype=np.int64)))
        rows.append(i)
    if rows:
        rows_a = np.array(rows)
        logits_s = forward(torch.from_numpy(np.concatenate(views)).to(device), rows_a)[0]
        probs = POLICY.probs(logits_s.float()).double().cpu().numpy()
        pi[rows_a] = np.take_along_axis(probs, toward[rows_a], axis=1)
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
        has = np.asarray(episodes["has_decision"], bool)
        for goal in ("cheese", "top_right"):
            put(f"p_decision_{goal}", wilson_interval(int(np.sum(episodes[f"decision_{goal}"][reached])), int(reached.sum())))
            put(f"pi_decision_{goal}", normal_interval(np.asarray(episodes[f"pi_decision_{goal}"])[has]))
        row["n_decision"] = int(reached.sum())
        row["n_decision_mazes"] = int(has.sum())
    if "p_target" in episodes:
        put("p_target", wilson_interval(int(np.sum(episodes["p_target"])), len(episodes["p_target"])))
    return row


def run_scan(
    agent: HookedModule,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    vector: SteeringVector | LevelVectors,
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
    if not isinstance(vector, (SteeringVector, LevelVectors)):
        raise InnerCriticError(f"vector must be a SteeringVector or LevelVectors, got {type(vector).__name__}")
    coefficients = check_coefficients(coefficients)
    _check_count(episodes, "episodes")
    family = env_family(env_spec)
    if isinstance(vector, LevelVectors):
        if family != "maze":
            raise InnerCriticError(f"a per-level {vector.contrast!r} vector needs the cheese maze (env 'maze'); {env_spec!r} has no cheese or corner "
                             "to contrast: use a fixed vector (file, probe, mean_difference or random)")
    check_steering(agent, vector, positions)
    pos = None if positions is None else [tuple(int(v) for v in p) for p in positions]
    rows = []
    for i, c in enumerate(coefficients):
        # At 0 no vector is added, so the steered agent is the unsteered one and the reference forward
        # pass (for KL and value change) would only copy it: skip both. Tests check that an installed
        # coefficient-0 vector reproduces the same episodes bit for bit.
        steer = Steer(vector, c, pos)
        retarget = isinstance(vector, LevelVectors) and vector.contrast == "retarget"
        result = play_episodes(agent, env_spec, env_kwargs, episodes, seed, steer if c != 0 else None, num_envs, track_targets=retarget)
        norm = float(np.mean(result["vector_norm"])) if "vector_norm" in result else (vector.norm if isinstance(vector, SteeringVector) else None)
        row = {"source": vector.source, "hook": vector.hook, "coefficient": c, "vector_norm": norm,
               "per_level": isinstance(vector, LevelVectors),
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
