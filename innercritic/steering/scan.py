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

All the (vector, coefficient) runs of a scan play as blocks of one lockstep run (:func:`play_blocks`,
:func:`run_scans`): block k's episodes are exactly those its own run would play, while the blocks'
forward passes are batched and cached where that changes no bit (``innercritic.steering.lockstep``);
``batched=False`` plays each run on its own, as scans did before.

Run::

    python train.py test -c configs/steer/maze.yaml --model.agent_ckpt A.ckpt
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from innercritic.agents.hooks import HookedModule
from innercritic.agents.noisy import PolicyVersion
from innercritic.envs.episodes import run_episodes
from innercritic.envs.factory import env_family
from innercritic.envs.maze_values import decision_square, first_move_toward
from innercritic.stats import normal_interval, wilson_interval
from innercritic.steering.lockstep import LockstepForward, Steer
from innercritic.steering.vectors import LevelVectors, SteeringVector, check_steering, target_square
from innercritic.errors import InnerCriticError

__all__ = [
    "HELDOUT_SEED_OFFSET",
    "Steer",
    "MEAN_METRICS",
    "PROPORTION_METRICS",
    "check_coefficients",
    "normal_interval",
    "play_blocks",
    "play_episodes",
    "run_scan",
    "run_scans",
    "summarise_episodes",
    "wilson_interval",
]

# Scan levels come from a seed range neither training (small seeds), PPO evaluation
# (1_000_000_007 + ...) nor vector construction (3_000_000_019 + ...) draws from.
HELDOUT_SEED_OFFSET = 2_000_000_011
POLICY = PolicyVersion("policy")  # scans sample the (steered) policy itself, no noise

PROPORTION_METRICS = ("success", "p_cheese", "p_top_right", "p_decision_cheese", "p_decision_top_right", "p_target")
MEAN_METRICS = ("return", "length", "kl", "value_change", "pi_decision_cheese", "pi_decision_top_right")


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
    batched: bool = True,
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
    and actions (for tests of exact reproduction). ``batched``: see :func:`play_blocks` (the same
    episodes either way).
    """
    return play_blocks(agent, env_spec, env_kwargs, episodes, seed, [interventions], num_envs, trace, track_targets, batched)[0]


@torch.inference_mode()
def play_blocks(
    agent: HookedModule,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    episodes: int,
    seed: int,
    blocks: Sequence[Mapping[str, Any] | Steer | None],
    num_envs: int | None = None,
    trace: bool = False,
    track_targets: bool = False,
    batched: bool = True,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`play_episodes` for each intervention of ``blocks``, all played in one lockstep run.

    Result k is exactly what ``play_episodes(..., interventions=blocks[k])`` returns, array for array
    and bit for bit: every block plays the same levels with its own generator seeded as a run of its
    own (``run_episodes(blocks=K)``), a per-level vector is built once per level for all the blocks
    that add it, and the forward passes of all blocks are batched and cached where that leaves every
    bit unchanged (``innercritic.steering.lockstep``). ``batched=False`` gives each block whole-network
    calls of its own, as a run played alone makes them: the reference the batched path is tested
    against, and what it falls back to where this machine's kernels do not allow it. ``progress``
    names a bar counting the episodes of all blocks.
    """
    episodes = _check_count(episodes, "episodes")
    n = min(_check_count(num_envs, "num_envs") if num_envs is not None else episodes, episodes)
    blocks = list(blocks)
    if not blocks:
        raise InnerCriticError("blocks is empty; give at least one intervention (None: the unsteered agent)")
    K = len(blocks)
    steered = [bool(b) for b in blocks]
    is_maze = env_family(env_spec) == "maze"
    device = _device(agent)
    forward = LockstepForward(agent, blocks, batched=batched)
    steps: list[list[dict[str, np.ndarray]]] = [[] for _ in range(K)]
    norms: list[list[np.ndarray]] = [[] for _ in range(K)]
    # Per round: each env's decision square and the moves there toward cheese and corner (the same in
    # every block: the same levels), and per block the policy's probabilities of those moves and the
    # first move the mouse made there.
    state: dict[str, Any] = {}

    def on_reset(envs: Sequence[Any], m: int) -> None:
        for k, norm in enumerate(forward.start(envs, m)):
            if norm is not None:
                norms[k].append(norm)
        if is_maze:
            state["ds"], state["toward"], state["pi"] = _decision_squares(envs[0], m, forward, K)
            state["first_move"] = [np.full(envs[0].num_envs, -1, np.int64) for _ in range(K)]
        if track_targets:
            state["target"] = np.array([target_square(envs[0], i) for i in range(envs[0].num_envs)], np.int64)
            state["on_target"] = [np.zeros(envs[0].num_envs, bool) for _ in range(K)]

    def act(envs: Sequence[Any], obs: Sequence[np.ndarray], pending: Sequence[np.ndarray],
            generators: Sequence[torch.Generator]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        idx = [np.flatnonzero(p) for p in pending]
        outputs = forward([o[i] if len(i) else None for o, i in zip(obs, idx)], idx)
        results = []
        for k in range(K):
            if not len(idx[k]):
                results.append((np.zeros(len(obs[k]), np.int64), {}))  # finished: ignored, and its generator untouched
                continue
            env, i = envs[k], idx[k]
            logits_s, value_s, logits_u, value_u = outputs[k]
            action = np.zeros(len(obs[k]), np.int64)
            action[i] = POLICY.sample(logits_s, generators[k]).cpu().numpy()
            extras = {}
            if steered[k]:
                kl, dv = np.zeros(len(obs[k])), np.zeros(len(obs[k]))
                logp_s, logp_u = torch.log_softmax(logits_s.double(), -1), torch.log_softmax(logits_u.double(), -1)
                # Rounding can leave a hair below 0 for near-identical distributions; KL never is.
                kl[i] = (logp_s.exp() * (logp_s - logp_u)).sum(-1).clamp_min(0.0).cpu().numpy()
                dv[i] = (value_s.float() - value_u.float()).double().cpu().numpy()
                extras = {"kl": kl, "value_change": dv}
            if is_maze:
                # The first visit to the decision square decides; later visits are after a wrong turn.
                first = state["first_move"][k]
                at = (state["toward"][i, 0] >= 0) & (first[i] < 0) & (env.mouse_pos[i] == state["ds"][i]).all(1)
                first[i[at]] = action[i[at]]
            if track_targets:
                state["on_target"][k][i] |= (env.mouse_pos[i] == state["target"][i]).all(1)
            if trace:
                steps[k].append({"env": i.copy(), "obs": obs[k][i].copy(), "action": action[i].copy()})
            results.append((action, extras))
        return results

    def round_records() -> list[dict[str, np.ndarray]]:
        if not is_maze:
            return [{} for _ in range(K)]
        toward = state["toward"]
        records = []
        for k in range(K):
            first = state["first_move"][k]
            # Checked at the start of each step: a target first stood on by the last step of a cut episode is missed.
            targets = {"p_target": state["on_target"][k]} if track_targets else {}
            records.append({**targets, "has_decision": toward[:, 0] >= 0, "reached_decision": first >= 0,
                            "decision_cheese": (first >= 0) & (first == toward[:, 0]), "decision_top_right": (first >= 0) & (first == toward[:, 1]),
                            "pi_decision_cheese": state["pi"][k][:, 0], "pi_decision_top_right": state["pi"][k][:, 1]})
        return records

    eps = run_episodes(env_spec, env_kwargs, episodes, HELDOUT_SEED_OFFSET + int(seed), n, act, device, on_reset, round_records,
                       progress=progress, blocks=K)
    results = []
    for k, ep in enumerate(eps):
        zeros = np.zeros(len(ep["length"]))
        result: dict[str, Any] = {"return": ep["return"], "length": ep["length"], "success": ep["success"],
                                  "kl": ep.get("sum/kl", zeros) / ep["length"], "value_change": ep.get("sum/value_change", zeros) / ep["length"]}
        if isinstance(blocks[k], Steer):
            result["vector_norm"] = np.concatenate(norms[k])
        if track_targets:
            result["p_target"] = ep["p_target"]
        if is_maze:
            result.update(p_cheese=ep["success"], p_top_right=ep["top_right"],
                          **{key: ep[key] for key in ("has_decision", "reached_decision", "decision_cheese", "decision_top_right",
                                                      "pi_decision_cheese", "pi_decision_top_right")})
        if trace:
            result["trace"] = steps[k]
        results.append(result)
    return results


def _decision_squares(env: Any, m: int, forward: LockstepForward, blocks: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per env: its decision square (row, col); the actions there toward the cheese and toward the
    top-right corner (n, 2; -1: no decision square); and per block, the steered policy's
    probabilities of those two actions with the mouse placed there (n, 2; nan: none)."""
    n = env.num_envs
    ds_rc = np.full((n, 2), -1, np.int64)
    toward = np.full((n, 2), -1, np.int64)
    pi = [np.full((n, 2), np.nan) for _ in range(blocks)]
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
        rows_a, x = np.array(rows), np.concatenate(views)
        # Every block plays the same levels: the same views, each block's own forward pass.
        outputs = forward([x] * blocks, [rows_a] * blocks, reference=False)
        for k in range(blocks):
            probs = POLICY.probs(outputs[k][0].float()).double().cpu().numpy()
            pi[k][rows_a] = np.take_along_axis(probs, toward[rows_a], axis=1)
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
    batched: bool = True,
) -> list[dict[str, Any]]:
    """One row per coefficient: ``episodes`` held-out episodes with ``coefficient * vector`` at its hook.

    Everything is validated before the first episode: the hook exists, the vector fits it, the
    positions lie on its grid, the coefficients are a non-empty list of finite numbers. Rows hold
    ``source``, ``hook``, ``coefficient``, ``vector_norm``, ``positions``, ``episodes`` and every
    metric with ``_lo`` / ``_hi`` bounds (see the module docstring). ``progress(i, coefficient,
    row)`` is called for each coefficient once its row is known. All coefficients play in one
    lockstep run (:func:`run_scans`); ``batched=False`` plays them one run each, with the same rows.
    """
    rows = run_scans(agent, env_spec, env_kwargs, [vector], coefficients, episodes, seed, positions, num_envs, batched)[0]
    if progress is not None:
        for i, row in enumerate(rows):
            progress(i, row["coefficient"], row)
    return rows


def run_scans(
    agent: HookedModule,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    vectors: Sequence[SteeringVector | LevelVectors],
    coefficients: Sequence[float],
    episodes: int = 100,
    seed: int = 0,
    positions: Sequence[Sequence[int]] | None = None,
    num_envs: int | None = None,
    batched: bool = True,
    progress: str | None = None,
) -> list[list[dict[str, Any]]]:
    """:func:`run_scan` for several vectors at the same coefficients (a vector and its random control):
    ``rows[v][i]`` is vector v's row at ``coefficients[i]``, equal to what ``run_scan`` gives for it.

    Every (vector, nonzero coefficient) is one block of a single lockstep run (:func:`play_blocks`)
    and coefficient 0, the unsteered agent whatever the vector, is one block shared by all vectors;
    ``batched=False`` plays each block as a run of its own, one after another, with whole-network
    calls (the path of scans before the lockstep runs: the reference, and a benchmark's baseline).
    ``progress`` names a bar counting the episodes of all blocks.
    """
    vectors = list(vectors)
    if not vectors:
        raise InnerCriticError("vectors is empty; give at least one SteeringVector or LevelVectors")
    for vector in vectors:
        if not isinstance(vector, (SteeringVector, LevelVectors)):
            raise InnerCriticError(f"vector must be a SteeringVector or LevelVectors, got {type(vector).__name__}")
    coefficients = check_coefficients(coefficients)
    _check_count(episodes, "episodes")
    family = env_family(env_spec)
    for vector in vectors:
        if isinstance(vector, LevelVectors) and family != "maze":
            raise InnerCriticError(f"a per-level {vector.contrast!r} vector needs the cheese maze (env 'maze'); {env_spec!r} has no cheese or corner "
                                   "to contrast: use a fixed vector (file, probe, mean_difference or random)")
        check_steering(agent, vector, positions)
    pos = None if positions is None else [tuple(int(v) for v in p) for p in positions]
    retarget = [isinstance(v, LevelVectors) and v.contrast == "retarget" for v in vectors]
    # At 0 no vector is added, so the steered agent is the unsteered one and the reference forward
    # pass (for KL and value change) would only copy it: one unsteered block serves every vector.
    # Tests check that an installed coefficient-0 vector reproduces the same episodes bit for bit.
    plays: list[tuple[int | None, float]] = ([(None, 0.0)] if 0.0 in coefficients else []) + \
        [(v, c) for v in range(len(vectors)) for c in dict.fromkeys(coefficients) if c != 0]
    blocks = [None if v is None else Steer(vectors[v], c, pos) for v, c in plays]
    track = any(retarget)
    if batched:
        results = play_blocks(agent, env_spec, env_kwargs, episodes, seed, blocks, num_envs, track_targets=track, progress=progress)
    else:
        results = [play_episodes(agent, env_spec, env_kwargs, episodes, seed, block, num_envs, track_targets=track, batched=False)
                   for block in blocks]
    played = dict(zip(plays, results))
    rows: list[list[dict[str, Any]]] = []
    for v, vector in enumerate(vectors):
        rows.append([])
        for c in coefficients:
            result = dict(played[(None, 0.0) if c == 0 else (v, c)])
            if not retarget[v]:
                result.pop("p_target", None)  # tracked for another vector of the run; not a figure of this one
            norm = float(np.mean(result["vector_norm"])) if "vector_norm" in result else (vector.norm if isinstance(vector, SteeringVector) else None)
            rows[v].append({"source": vector.source, "hook": vector.hook, "coefficient": c, "vector_norm": norm,
                            "per_level": isinstance(vector, LevelVectors),
                            "positions": None if pos is None else [list(p) for p in pos], **summarise_episodes(result)})
    return rows


def _device(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")
