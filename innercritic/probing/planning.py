"""One-step lookahead planning with a value source: does a probe's value make a good policy?

Method. At state s, for every action a, a copy of the environment takes a and returns the reward
r, the next observation s' and whether the episode terminated or was truncated. The planner scores

    q(s, a) = r + gamma * (1 - terminal) * v(s')

and acts ``argmax_a q``. A terminal is worth exactly its reward (v is never read there); a time-limit
truncation bootstraps through v(s'), because the world goes on after a time limit (the same
convention as the td probe loss and LSTD). Ties (q within ``tie_tol`` of the best) go to the lowest
action index, or, with ``tie_break="policy"``, to the tied action with the highest policy logit.

A value source is any callable ``value_fn(obs uint8 (B, C, H, W)) -> float (B,)``:
:func:`critic_value_fn` (the agent's own critic), :func:`probe_value_fn` (a linear probe on a
standardised hook activation), :func:`linear_value_fn` (the same from a closed-form ridge / LSTD
fit) and, in the cheese maze, :func:`exact_value_fn` (the exact value of the agent's policy: the
planner's own check, since lookahead on the true value of a policy that reaches the cheese must too).
Environments: the cheese maze (the whole batch is looked ahead at once with
``clone_state``/``restore_state``) and gymnasium ``SyncVectorEnv`` envs such as MiniGrid (each
sub-env is deep-copied once per action: about 1.3 ms per copy for DoorKey-5x5, so MiniGrid planning
costs ~10 ms per env and step).

Evaluation (DESIGN.md, "Evaluation protocol", planning bullet): :func:`evaluate_planner` runs the
planner (success, return, length, the maze's p_cheese / p_top_right, agreement with the policy's
argmax on the planner's own states), :func:`agreement_on_policy_states` compares planner and policy
on the states the policy visits, and :func:`compare_planners` puts every value source next to the
policy and a uniformly random policy, on the same levels, with 95% intervals. Every env counts its
first episode only, as ``datamodules.rollout.RolloutDataModule.evaluate`` does, and with the same
seeding: the "policy" row of :func:`compare_planners` with ``seed=S`` reproduces ``evaluate``'s
numbers for a base seed S (pass ``datamodules.rollout.EVAL_SEED_OFFSET`` for its held-out levels).

Run::

    from innercritic.probing.planning import compare_planners, critic_value_fn, linear_value_fn
    rows = compare_planners(agent, "maze", {"size": 9, "cheese": "anywhere"},
                            {"critic": critic_value_fn(agent),
                             "ridge": linear_value_fn(agent, "encoder.hook_hidden", standardiser, ridge)},
                            gamma=0.99, episodes=200, seed=1_000_000_007)

Tests: ``OMP_NUM_THREADS=1 pytest tests/test_planning.py``.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv
from torch import Tensor

from innercritic.agents.noisy import PolicyVersion
from innercritic.envs.episodes import run_episodes
from innercritic.errors import InnerCriticError
from innercritic.stats import Z95, normal_interval, wilson_interval

if TYPE_CHECKING:
    from innercritic.probing.closed_form import LinearValue, Standardiser

__all__ = [
    "TIE_BREAKS",
    "ValueFn",
    "agreement_on_policy_states",
    "compare_planners",
    "critic_value_fn",
    "evaluate_planner",
    "exact_value_fn",
    "greedy_actions",
    "linear_value_fn",
    "lookahead_q",
    "plan_actions",
    "probe_value_fn",
]

ValueFn = Callable[[Tensor], Tensor]
TIE_BREAKS = ("lowest", "policy")
_POLICY = PolicyVersion("policy")


# ---------------------------------------------------------------------------------------------
# Value sources.


def _device(agent: torch.nn.Module) -> torch.device:
    return next(agent.parameters()).device


def critic_value_fn(agent: torch.nn.Module) -> ValueFn:
    """The agent's own critic head: ``agent(obs)[1]``."""
    device = _device(agent)

    @torch.inference_mode()
    def value(obs: Tensor) -> Tensor:
        return agent(obs.to(device))[1]

    return value


def exact_value_fn(agent: torch.nn.Module, gamma: float, version: str = "policy") -> ValueFn:
    """The exact value, under ``version`` of the agent's policy, of a cheese-maze observation.

    Each maze (walls and cheese channels) is solved once, on first sight, by
    :func:`~innercritic.envs.maze_values.policy_value` with the policy's action probabilities at every
    free square; later observations of it are a look-up at the mouse's square. An observation with no
    cheese is worth 0.
    """
    from innercritic.agents.noisy import parse_version
    from innercritic.envs.maze_values import policy_value
    from innercritic.probing.maze_exact import every_square

    policy = parse_version(version)
    device = _device(agent)
    solved: dict[bytes, np.ndarray] = {}

    def solve(first: np.ndarray) -> np.ndarray:
        frames, free = every_square(first)
        with torch.inference_mode():
            probs = policy.probs(agent.policy_logits(torch.from_numpy(frames).to(device)).float().cpu()).double().numpy()
        return policy_value(first[0] > 0, tuple(np.argwhere(first[2] > 0)[0]), probs / probs.sum(1, keepdims=True), gamma)

    def value(obs: Tensor) -> Tensor:
        x = obs.cpu().numpy()
        out = np.zeros(len(x))
        for k, frame in enumerate(x):
            if not frame[2].any():
                continue
            key = frame[0].tobytes() + frame[2].tobytes()
            if key not in solved:
                solved[key] = solve(frame)
            out[k] = solved[key].reshape(-1)[frame[1].reshape(-1).argmax()]
        return torch.from_numpy(np.nan_to_num(out, nan=0.0))

    return value


def probe_value_fn(agent: torch.nn.Module, hook: str, mean: Tensor, std: Tensor, w: Tensor, b: float | Tensor) -> ValueFn:
    """A linear probe on one hook point: ``((act(obs).flatten() - mean) / std) @ w + b``.

    ``mean``, ``std`` and ``w`` have shape (D,), D the flattened size of the activation at ``hook``;
    ``std`` must be positive (it is used as given, not floored). The arithmetic is float64, so a
    probe fitted in numpy float64 gives the same numbers here.
    """
    agent.hook_point(hook)  # an unknown name fails now, with the list of valid ones
    device = _device(agent)
    mean, std, w = (torch.as_tensor(t).to(device=device, dtype=torch.float64).reshape(-1) for t in (mean, std, w))
    if not (mean.shape == std.shape == w.shape):
        raise InnerCriticError(f"mean, std and w must all have shape (D,), got {tuple(mean.shape)}, {tuple(std.shape)}, {tuple(w.shape)}")
    if not bool((std > 0).all()):
        raise InnerCriticError("std must be positive everywhere (floor it as Standardiser does)")
    bias = float(b)
    dim = mean.shape[0]

    @torch.inference_mode()
    def value(obs: Tensor) -> Tensor:
        _, cache = agent.run_with_cache(obs.to(device), names=[hook])
        # reshape, not view: a channels_last network gives non-contiguous conv activations.
        x = cache[hook].reshape(obs.shape[0], -1).to(torch.float64)
        if x.shape[1] != dim:
            raise InnerCriticError(f"hook {hook!r} has {x.shape[1]} features per sample, the probe has {dim}")
        return ((x - mean) / std) @ w + bias

    return value


def linear_value_fn(agent: torch.nn.Module, hook: str, standardiser: "Standardiser", probe: "LinearValue") -> ValueFn:
    """:func:`probe_value_fn` from a closed-form fit (``fit_ridge``/``fit_lstd``'s ``LinearValue`` on
    features standardised by ``standardiser``)."""
    return probe_value_fn(
        agent,
        hook,
        torch.from_numpy(np.asarray(standardiser.mean, dtype=np.float64)),
        torch.from_numpy(np.asarray(standardiser.std, dtype=np.float64)),
        torch.from_numpy(np.asarray(probe.w, dtype=np.float64)),
        float(probe.b),
    )


def _values(value_fn: ValueFn, obs: np.ndarray) -> np.ndarray:
    if len(obs) == 0:
        return np.zeros(0)
    v = value_fn(torch.from_numpy(np.ascontiguousarray(obs)))
    v = torch.as_tensor(v).detach().to("cpu", torch.float64).numpy().reshape(-1)
    if v.shape != (len(obs),):
        raise InnerCriticError(f"value_fn returned {v.shape[0]} values for {len(obs)} observations; it must return shape (B,)")
    return v


# ---------------------------------------------------------------------------------------------
# The lookahead.


def _is_maze(env: Any) -> bool:
    return hasattr(env.unwrapped, "clone_state") and hasattr(env.unwrapped, "restore_state")


def _check_env(env: Any) -> None:
    if not (_is_maze(env) or isinstance(env.unwrapped, SyncVectorEnv)):
        raise InnerCriticError(
            f"planning needs a copyable env: a CheeseMaze (clone_state/restore_state) or a gymnasium "
            f"SyncVectorEnv such as make_env('MiniGrid-...'); got {type(env.unwrapped).__name__}"
        )


def _maze_transitions(env: Any, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    maze = env.unwrapped
    A, N = int(maze.single_action_space.n), maze.num_envs
    state = maze.clone_state()
    reward = np.zeros((N, A))
    terminal = np.zeros((N, A), bool)
    next_obs = np.zeros((N, A, *maze.single_observation_space.shape), np.uint8)
    try:
        for a in range(A):
            maze.restore_state(state)
            obs, r, term, trunc, info = maze.step(np.full(N, a, np.int64))
            # Same-step autoreset has already replaced an ended episode's obs by the next episode's
            # first one; s' is the last obs of the ended episode.
            done = term | trunc
            next_obs[:, a] = np.where(done[:, None, None, None], info["final_obs"], obs)
            reward[:, a] = r
            terminal[:, a] = term
    finally:
        maze.restore_state(state)
    return reward[active], terminal[active], next_obs[active], np.flatnonzero(active)


def _vector_transitions(env: Any, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    vec = env.unwrapped
    A = int(vec.single_action_space.n)
    rows = np.flatnonzero(active)
    reward = np.zeros((len(rows), A))
    terminal = np.zeros((len(rows), A), bool)
    next_obs = np.zeros((len(rows), A, *vec.single_observation_space.shape), vec.single_observation_space.dtype)
    for k, i in enumerate(rows.tolist()):
        for a in range(A):
            # The wrapped sub-env, not the unwrapped one: the copy then returns observations through
            # the same wrappers, and its RNG (in the unwrapped env) is copied along with it. Stepping
            # the copy directly also skips the vector env's autoreset, so s' is the episode's last obs.
            clone = copy.deepcopy(vec.envs[i])
            obs, r, term, _, _ = clone.step(a)
            next_obs[k, a] = obs
            reward[k, a] = r
            terminal[k, a] = term
    return reward, terminal, next_obs, rows


def lookahead_q(env: Any, value_fn: ValueFn, gamma: float, active: np.ndarray | None = None) -> np.ndarray:
    """q(s, a) = r + gamma * (1 - terminal) * v(s') for every env and action: float64 (N, A).

    The env's state is left exactly as it was. Rows not in ``active`` (bool (N,), default all) are
    NaN and cost nothing on MiniGrid (on the maze the batch is stepped whole anyway, but their next
    observations are not valued). All next observations go through ``value_fn`` in one batch.
    """
    _check_env(env)
    N, A = int(env.num_envs), int(env.single_action_space.n)
    active = np.ones(N, bool) if active is None else np.asarray(active, bool).reshape(N)
    transitions = _maze_transitions if _is_maze(env) else _vector_transitions
    reward, terminal, next_obs, rows = transitions(env, active)
    v = _values(value_fn, next_obs.reshape(-1, *next_obs.shape[2:])).reshape(len(rows), A)
    # where(), not (1 - terminal) * v: a value source may return nan or inf at terminal states.
    q_rows = np.where(terminal, reward, reward + float(gamma) * v)
    q = np.full((N, A), np.nan)
    q[rows] = q_rows
    return q


def greedy_actions(q: np.ndarray, tie_logits: np.ndarray | Tensor | None = None, tie_tol: float = 1e-6) -> np.ndarray:
    """argmax of each row of ``q`` (N, A) as int64 (N,).

    Actions within ``tie_tol`` of the row's best are tied (a network can value one observation a
    few ulps differently at two batch positions). Ties go to the lowest action index, or to the
    tied action with the highest ``tie_logits`` (N, A) when given. All-NaN rows give action 0.
    """
    q = np.asarray(q, np.float64)
    qf = np.where(np.isnan(q), -np.inf, q)
    tied = qf >= qf.max(axis=1, keepdims=True) - tie_tol
    if tie_logits is None:
        return tied.argmax(axis=1).astype(np.int64)  # argmax of a bool row is its first True
    if isinstance(tie_logits, Tensor):
        tie_logits = tie_logits.detach().to("cpu", torch.float64).numpy()
    logits = np.asarray(tie_logits, np.float64)
    if logits.shape != q.shape:
        raise InnerCriticError(f"tie_logits has shape {logits.shape}; it must match q {q.shape}")
    return np.where(tied, logits, -np.inf).argmax(axis=1).astype(np.int64)


def plan_actions(
    env: Any,
    value_fn: ValueFn,
    gamma: float,
    active: np.ndarray | None = None,
    tie_logits: np.ndarray | Tensor | None = None,
    tie_tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """The planner's actions at the env's current states: (actions int64 (N,), q float64 (N, A)).

    See :func:`lookahead_q` for ``active`` and :func:`greedy_actions` for the tie rule; rows not in
    ``active`` get action 0 and NaN q.
    """
    q = lookahead_q(env, value_fn, gamma, active)
    return greedy_actions(q, tie_logits, tie_tol), q


# ---------------------------------------------------------------------------------------------
# Episodes.


def _logits(agent: torch.nn.Module, obs: np.ndarray) -> Tensor:
    with torch.inference_mode():
        return agent(torch.from_numpy(obs).to(_device(agent)))[0]


def _agreement(hits: np.ndarray, steps: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """Fraction of all decisions that agree, with a Wilson interval on an effective sample size.

    Decisions within an episode are correlated, so a Wilson interval over all of them would be too
    narrow. The effective size divides the decision count by the design effect (cluster-robust
    variance of the ratio over episodes / binomial variance), kept between the number of episodes
    and the number of decisions; it is the number of episodes when the fraction is exactly 0 or 1.
    """
    hits, steps = np.asarray(hits, np.float64), np.asarray(steps, np.float64)
    total, k = float(steps.sum()), len(steps)
    if total == 0:
        return math.nan, math.nan, math.nan
    p = float(hits.sum()) / total
    n_eff = float(k)
    if k >= 2 and 0.0 < p < 1.0:
        var = k / (k - 1) * float(((hits - p * steps) ** 2).sum()) / total**2
        n_eff = total if var == 0 else min(total, max(float(k), p * (1 - p) / var))
    _, lo, hi = wilson_interval(p * n_eff, n_eff, z)
    return p, lo, hi


def _summary(ep: dict[str, np.ndarray], maze: bool) -> dict[str, Any]:
    n = len(ep["return"])
    out: dict[str, Any] = {"episodes": n}
    k = float(ep["success"].sum())
    out["success"] = k / n
    _, out["success_lo"], out["success_hi"] = wilson_interval(k, n)
    for name in ("return", "length"):
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = normal_interval(ep[name])
    if maze:
        out["p_cheese"], out["p_cheese_lo"], out["p_cheese_hi"] = out["success"], out["success_lo"], out["success_hi"]
        k = float(ep["top_right"].sum())
        out["p_top_right"] = k / n
        _, out["p_top_right_lo"], out["p_top_right_hi"] = wilson_interval(k, n)
    return out


def _per_episode(ep: dict[str, np.ndarray], maze: bool) -> dict[str, np.ndarray]:
    keys = ["return", "length", "success"] + (["top_right", "level_seed"] if maze else [])
    return {k: ep[k].copy() for k in keys}


def _check_tie_break(tie_break: str, policy: torch.nn.Module | None) -> None:
    if tie_break not in TIE_BREAKS:
        raise InnerCriticError(f"tie_break={tie_break!r} is invalid; valid: {', '.join(repr(t) for t in TIE_BREAKS)}")
    if tie_break == "policy" and policy is None:
        raise InnerCriticError("tie_break='policy' needs the policy (the agent) to read its logits")


def evaluate_planner(
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    value_fn: ValueFn,
    gamma: float,
    episodes: int,
    seed: int,
    policy: torch.nn.Module | None = None,
    num_envs: int = 100,
    tie_break: str = "lowest",
    tie_tol: float = 1e-6,
    progress: str | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` episodes with the planner acting (deterministic given ``seed``; ``progress`` names a bar).

    Returns success, return and length with 95% intervals (``*_lo``, ``*_hi``: Wilson for rates,
    normal for means), on the maze also p_cheese and p_top_right, and with ``policy`` (the agent)
    ``agree_own_states``: how often the planner's action is the policy's argmax on the planner's
    own states. ``per_episode`` holds the per-episode arrays (on the maze with each level seed).
    """
    _check_tie_break(tie_break, policy)

    def act(env: Any, obs: np.ndarray, pending: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits = None if policy is None else _logits(policy, obs)
        actions, _ = plan_actions(env, value_fn, gamma, pending, logits if tie_break == "policy" else None, tie_tol)
        if logits is None:
            return actions, {}
        return actions, {"agree": actions == logits.argmax(-1).cpu().numpy()}

    ep = run_episodes(env_spec, env_kwargs, episodes, seed, num_envs, act, progress=progress)
    maze = env_spec == "maze"
    out = _summary(ep, maze)
    if policy is not None:
        out["agree_own_states"], out["agree_own_states_lo"], out["agree_own_states_hi"] = _agreement(ep["sum/agree"], ep["length"])
    out["per_episode"] = _per_episode(ep, maze)
    return out


def _policy_rollout(
    agent: torch.nn.Module,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    sources: Mapping[str, ValueFn],
    gamma: float,
    episodes: int,
    seed: int,
    num_envs: int,
    tie_break: str,
    tie_tol: float,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """The sampled policy's episodes, with, at every visited state, whether each planner, the
    sampled action and a uniformly random action agree with the policy's argmax."""
    # The runner seeds the sampler as RolloutDataModule.evaluate's, so the policy's episodes are the ones it reports.
    uniform = torch.Generator().manual_seed(seed + 1)

    def act(env: Any, obs: np.ndarray, pending: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits = _logits(agent, obs)
        sampled = _POLICY.sample(logits, generator).cpu().numpy()
        best = logits.argmax(-1).cpu().numpy()
        random = torch.randint(logits.shape[-1], (len(obs),), generator=uniform).numpy()
        matches = {"policy": sampled == best, "random": random == best}
        for name, value_fn in sources.items():
            planned, _ = plan_actions(env, value_fn, gamma, pending, logits if tie_break == "policy" else None, tie_tol)
            matches[f"source:{name}"] = planned == best
        return sampled, matches

    return run_episodes(env_spec, env_kwargs, episodes, seed, num_envs, act, device=_device(agent), progress=progress)


def agreement_on_policy_states(
    agent: torch.nn.Module,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    value_fn: ValueFn,
    gamma: float,
    episodes: int,
    seed: int,
    num_envs: int = 100,
    tie_break: str = "lowest",
    tie_tol: float = 1e-6,
) -> dict[str, float]:
    """Roll out the sampled policy and, at every visited state, compare the planner's action with the
    policy's argmax: ``{"agree_policy_states", "agree_policy_states_lo", "agree_policy_states_hi",
    "decisions"}`` (the fraction agreeing over all decisions, with its 95% interval)."""
    _check_tie_break(tie_break, agent)
    ep = _policy_rollout(agent, env_spec, env_kwargs, {"planner": value_fn}, gamma, episodes, seed, num_envs, tie_break, tie_tol)
    p, lo, hi = _agreement(ep["sum/source:planner"], ep["length"])
    return {"agree_policy_states": p, "agree_policy_states_lo": lo, "agree_policy_states_hi": hi, "decisions": int(ep["length"].sum())}


def compare_planners(
    agent: torch.nn.Module,
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    sources: Mapping[str, ValueFn],
    gamma: float,
    episodes: int,
    seed: int,
    num_envs: int = 100,
    tie_break: str = "lowest",
    tie_tol: float = 1e-6,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per value source's planner, then a ``"policy"`` row and a ``"random"`` row.

    ``progress`` shows a bar per row's episodes (on stderr).

    Keys: source, episodes, success, return, length, agree_policy_states, agree_own_states (each
    with ``_lo``/``_hi``, 95%), on the maze p_cheese and p_top_right too. Every row plays the same
    levels (same ``seed``). The policy row samples its actions (as training's evaluation does); its
    agreement columns are how often the sampled action is its own argmax. The random row acts
    uniformly at random; its agreement is that of a random action with the policy's argmax.
    """
    _check_tie_break(tie_break, agent)
    for reserved in ("policy", "random"):
        if reserved in sources:
            raise InnerCriticError(f"source name {reserved!r} is reserved for the reference rows; rename it")
    maze = env_spec == "maze"
    def bar(row: str) -> str | None:
        return f"planning: {row}" if progress else None

    on_policy = _policy_rollout(agent, env_spec, env_kwargs, sources, gamma, episodes, seed, num_envs, tie_break, tie_tol, bar("policy"))
    steps = on_policy["length"]

    def agree_cols(prefix: str, hits: np.ndarray, n: np.ndarray) -> dict[str, float]:
        p, lo, hi = _agreement(hits, n)
        return {prefix: p, f"{prefix}_lo": lo, f"{prefix}_hi": hi}

    rows = []
    for name, value_fn in sources.items():
        res = evaluate_planner(env_spec, env_kwargs, value_fn, gamma, episodes, seed, agent, num_envs, tie_break, tie_tol, bar(name))
        row = {"source": name, **{k: v for k, v in res.items() if k != "per_episode" and not k.startswith("agree")}}
        row.update(agree_cols("agree_policy_states", on_policy[f"sum/source:{name}"], steps))
        row.update({k: v for k, v in res.items() if k.startswith("agree_own_states")})
        rows.append(row)

    policy_row = {"source": "policy", **_summary(on_policy, maze)}
    policy_row.update(agree_cols("agree_policy_states", on_policy["sum/policy"], steps))
    policy_row.update(agree_cols("agree_own_states", on_policy["sum/policy"], steps))
    rows.append(policy_row)

    uniform = torch.Generator().manual_seed(seed + 2)

    def act_random(env: Any, obs: np.ndarray, pending: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits = _logits(agent, obs)
        actions = torch.randint(logits.shape[-1], (len(obs),), generator=uniform).numpy()
        return actions, {"agree": actions == logits.argmax(-1).cpu().numpy()}

    rand = run_episodes(env_spec, env_kwargs, episodes, seed, num_envs, act_random, progress=bar("random"))
    random_row = {"source": "random", **_summary(rand, maze)}
    random_row.update(agree_cols("agree_policy_states", on_policy["sum/random"], steps))
    random_row.update(agree_cols("agree_own_states", rand["sum/agree"], rand["length"]))
    rows.append(random_row)
    return rows
