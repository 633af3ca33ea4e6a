"""Collecting trajectory datasets from an agent and its noisy versions, with activations (no Lightning).

What one collection makes: for each policy version (``"policy"``, ``"eps:0.25"``, ``"temp:2.0"`` ...,
see :mod:`innercritic.agents.noisy`), ``episodes_per_version`` complete episodes on the env the
agent was trained on (with ``env_overrides`` merged into its keyword arguments), every state stored
with what the agent computed there: the critic's value and the activations of chosen hook points,
from the same forward pass that chose the action.

Episodes. A version's episodes are split into shards of ``episodes_per_shard`` episodes. A shard
runs ``E = min(num_envs, episodes)`` envs side by side; env slot ``j`` runs a fixed quota of
consecutive episodes (``episodes // E``, one more for the first ``episodes % E`` slots) and then
stops counting. The set of episodes is fixed by the seeds before anything runs, not by which
episodes finish first, so short episodes are not over-represented (collecting "the first N episodes
to finish" would be), and every episode is complete. Once a slot's quota is done, the network no
longer runs on it (its env may still be stepped, unused). Several episodes per slot keep the batch
full for most of the shard, which is what keeps collection near the speed of plain rollouts.

Seeds. Env seeds derive from ``(seed, shard index)`` only and action seeds from ``(seed, version
index, shard index)``: every version plays the same levels (the maze's slot ``j`` draws the same
level sequence whatever the actions), which pairs the versions' episodes state for state and lets
the datamodule split all versions' episode ``u`` into the same split. A shard is a pure function of
the agent, the env and its seeds: re-running it reproduces it bit for bit, which is what makes
resuming an interrupted collection exact.

Rows. Each episode is stored as its states in order, ``T`` transition rows (``last=False``: the state,
the action taken, the reward, and whether the episode terminated / was truncated right after it),
then one row for the state it ended in (``last=True``; action ``-1``, reward 0, ``terminal`` and
``truncated`` say how the episode ended; its critic value and activations are stored). So the next
state of transition row ``k`` is always row ``k + 1``, and a truncated episode's last transition
has a real state to bootstrap from. Returns ``G_t = r_t + gamma G_{t+1}`` are computed in float64
and stored as float32; ``G`` at the final row is 0 after a terminal and the critic's value there
after a truncation (those episodes' rows are flagged ``bootstrapped``).

Speed. One forward pass per step gives the actions, the critic's values and the activations (and
the values and activations of the final states of the episodes that ended on the step before, in
the same batch). Rows are copied once into reusable blocks (:class:`RowBuffers`); a background
thread writes and hashes shard k while shard k + 1 is played; envs are reused across shards.

Per-row fields (``n`` rows; dtypes are what is stored):

    obs uint8 (C, H, W)      action int64 (-1 on last rows)   reward float32   terminal, truncated, last,
    bootstrapped bool        return float32                   value float32 (critic)
    episode int64 (global id = version * episodes_per_version + index within the version)
    step int32               version int32 (index into the manifest's versions)
    act.<hook point>         float32 or float16, the hook's per-sample shape
    maze only: level_seed int64, mouse int32 (2,) = (row, col) in maze coordinates

Per-episode fields (``ep_*``): ep_id int64, ep_start int64 (first row, within the shard), ep_length
int32 (transitions), ep_terminated, ep_truncated bool, ep_reward float32 (undiscounted sum), and
for the maze ep_level_seed int64, ep_maze_size int32, ep_cheese int32 (2,): with the manifest's
cheese mode, ``generate_level(ep_level_seed, ep_maze_size, cheese)`` rebuilds the maze, and
``maze_values.policy_value`` then gives exact values at each stored mouse square.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from innercritic.errors import InnerCriticError
from innercritic.agents.checkpoint import check_env_compatible, load_agent
from innercritic.agents.networks import ActorCritic
from innercritic.agents.noisy import PolicyVersion, parse_version
from innercritic.cache.format import (
    CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    REQUEST,
    SHARD_META,
    TMP_PREFIX,
    GatheredRows,
    TrajectoryCache,
    CacheError,
    CacheIntegrityError,
    CacheMismatchError,
    diff_requests,
    file_sha256,
    format_differences,
    read_json,
    remove_stale_tmp,
    shard_name,
    write_json_atomic,
    write_shard,
)
from innercritic.envs.factory import env_family, make_env

__all__ = [
    "ACTIVATION_DTYPES",
    "agent_fingerprint",
    "build_cache",
    "build_cache_from_checkpoint",
    "cache_status",
    "discounted_returns",
    "make_request",
    "plan_shards",
    "rollout_shard",
    "RowBuffers",
]

ACTIVATION_DTYPES = ("float32", "float16")


# ---------------------------------------------------------------------------------------------
# The request: everything that determines a cache's contents, as plain JSON.


def agent_fingerprint(agent: ActorCritic) -> str:
    """sha256 of the agent's architecture and weights (not of a checkpoint file's bytes).

    Two checkpoints holding the same network (say, one re-saved with another optimiser state) make
    the same data, so they match the same cache.
    """
    digest = hashlib.sha256(json.dumps(agent.config, sort_keys=True).encode())
    for key, tensor in sorted(agent.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise InnerCriticError(f"{what} must be plain JSON values (numbers, strings, lists, dicts), got {value!r}") from None


def _hook_shapes(agent: ActorCritic, hook_points: Sequence[str]) -> dict[str, list[int]]:
    valid = agent.hook_names
    unknown = [h for h in hook_points if h not in valid]
    if unknown:
        raise InnerCriticError(f"unknown hook point(s) {unknown}; this agent's hook points are: {', '.join(valid)}")
    with torch.no_grad():
        _, cache = agent.run_with_cache(torch.zeros(1, *agent.obs_shape, dtype=torch.uint8), names=list(hook_points))
    return {name: list(act.shape[1:]) for name, act in cache.items()}


def make_request(
    agent: ActorCritic,
    env_info: Mapping[str, Any],
    *,
    versions: Sequence[str] = ("policy", "eps:0.25", "eps:0.5"),
    episodes_per_version: int = 200,
    hook_points: Sequence[str] | None = None,
    gamma: float | None = None,
    activation_dtype: str = "float32",
    env_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    towers: str | Sequence[str] = "encoder",
    num_envs: int = 32,
    episodes_per_shard: int = 128,
) -> dict[str, Any]:
    """Validate a collection's settings and return its request: the JSON that names the cache's contents.

    ``env_info`` is the second value of :func:`load_agent` (spec, kwargs, obs_shape, num_actions,
    gamma). ``hook_points=None`` takes the representation hook points of ``towers`` (``"encoder"``, the
    policy's tower; ``"critic_encoder"``; a list of them; or ``"all"``, every tower the network has);
    ``gamma=None`` the checkpoint's.
    Two requests make the same cache exactly when they are equal.
    """
    versions = list(versions)
    if not versions:
        raise InnerCriticError("versions must list at least one policy version, e.g. ['policy', 'eps:0.25']")
    parsed = [parse_version(v) for v in versions]
    names = [p.name for p in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InnerCriticError(f"versions {versions} name the same version more than once: {dupes}")
    if hook_points is None:
        tower_names = [towers] if isinstance(towers, str) else list(towers)
        if tower_names == ["all"]:
            tower_names = ["encoder", "critic_encoder"] if agent.separate_critic else ["encoder"]
        hook_points = [h for tower in tower_names for h in agent.representation_hook_names(tower)]
    hook_points = list(hook_points)
    if isinstance(hook_points, str) or not hook_points:
        raise InnerCriticError(f"hook_points must be a non-empty list of hook point names, got {hook_points!r}")
    if len(set(hook_points)) != len(hook_points):
        raise InnerCriticError(f"hook_points {hook_points} lists a hook point twice")
    shapes = _hook_shapes(agent, hook_points)
    if gamma is None:
        gamma = env_info.get("gamma")
        if gamma is None:
            raise InnerCriticError("the checkpoint records no discount: pass gamma explicitly")
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise InnerCriticError(f"gamma must be in (0, 1], got {gamma}")
    if activation_dtype not in ACTIVATION_DTYPES:
        raise InnerCriticError(f"activation_dtype must be one of {list(ACTIVATION_DTYPES)}, got {activation_dtype!r}")
    for name, value in (("episodes_per_version", episodes_per_version), ("num_envs", num_envs), ("episodes_per_shard", episodes_per_shard)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InnerCriticError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InnerCriticError(f"seed must be a non-negative integer, got {seed!r}")
    overrides = _jsonable(dict(env_overrides or {}), "env_overrides")
    kwargs = {**_jsonable(dict(env_info.get("kwargs") or {}), "the checkpoint's env kwargs"), **overrides}
    spec = env_info["spec"]
    env_family(spec)
    # One env built now: bad overrides fail here, and an agent that cannot act in the env fails clearly.
    probe = make_env(spec, 1, seed=0, **kwargs)
    current = {"spec": spec, "obs_shape": list(probe.single_observation_space.shape), "num_actions": int(probe.single_action_space.n)}
    probe.close()
    check_env_compatible({**env_info, "obs_shape": list(agent.obs_shape), "num_actions": agent.num_actions}, current, "the agent")
    return {
        "env": {"spec": spec, "kwargs": kwargs, "overrides": overrides},
        "agent": {"weights_sha256": agent_fingerprint(agent), "config": _jsonable(agent.config, "agent config")},
        "gamma": gamma,
        "versions": names,
        "hook_points": hook_points,
        "hook_shapes": shapes,
        "activation_dtype": activation_dtype,
        "episodes_per_version": int(episodes_per_version),
        "episodes_per_shard": int(episodes_per_shard),
        "num_envs": int(num_envs),
        "seed": int(seed),
    }


def plan_shards(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every shard of a request, in cache order: version index, shard index, episode count, first id, seeds."""
    epv, eps = request["episodes_per_version"], request["episodes_per_shard"]
    plan = []
    for v, version in enumerate(request["versions"]):
        for s in range(math.ceil(epv / eps)):
            count = min(eps, epv - s * eps)
            plan.append({
                "name": shard_name(v, s), "version": v, "version_name": version, "shard": s, "episodes": count,
                "first_episode": v * epv + s * eps,
                "env_seed": _derive_seed(request["seed"], 0, s),
                "action_seed": _derive_seed(request["seed"], 1, v, s),
            })
    return plan


def _derive_seed(*words: int) -> int:
    # < 2**30: env seeds s + i must stay int32 for ale-py (its vector env rejects larger ones).
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint32)[0]) >> 2


# ---------------------------------------------------------------------------------------------
# One shard: a batched rollout with one forward pass per step.


def discounted_returns(reward: np.ndarray, value: np.ndarray, ep_start: np.ndarray, ep_length: np.ndarray,
                       ep_truncated: np.ndarray, gamma: float) -> np.ndarray:
    """Returns of every row (float64), for rows laid out episode by episode with a final row each.

    Row ``ep_start[e] + t`` is transition t of episode e (t < ep_length[e]); row ``ep_start[e] +
    ep_length[e]`` is its final state, whose return is ``value`` there after a truncation, else 0.
    """
    ret = np.zeros(reward.shape[0], dtype=np.float64)
    last = ep_start + ep_length
    ret[last] = np.where(ep_truncated, value[last].astype(np.float64), 0.0)
    reward = reward.astype(np.float64)
    for t in range(int(ep_length.max(initial=0)) - 1, -1, -1):
        rows = ep_start[ep_length > t] + t
        ret[rows] = reward[rows] + gamma * ret[rows + 1]
    return ret


def _frame_rc(frames: np.ndarray, channel: int, offset: np.ndarray) -> np.ndarray:
    """(row, col) in maze coordinates of the one set pixel of ``channel`` in (B, C, S, S) maze frames."""
    S = frames.shape[-1]
    flat = frames[:, channel].reshape(len(frames), -1).argmax(1)
    return np.stack([flat // S - offset, flat % S - offset], axis=1).astype(np.int32)


class RowBuffers:
    """Per-field row storage in fixed-size blocks, reused from shard to shard.

    Each step's rows are copied once, from the network's output into a block, so the torch
    allocator reuses its memory as in a plain rollout. Blocks are added as a shard grows and never
    copied (a doubling array would copy and touch about twice the memory in the first shard); after
    the first shard they are reused and no new pages are touched. Writing gathers the rows episode by
    episode straight from the blocks into the files (:class:`GatheredRows`).
    """

    def __init__(self, block_rows: int = 4096) -> None:
        self.block_rows = int(block_rows)
        self.blocks: dict[str, list[np.ndarray]] = {}
        self.n = 0

    def reset(self) -> None:
        self.n = 0

    def append(self, rows: Mapping[str, Any]) -> None:
        count = len(next(iter(rows.values())))
        B = self.block_rows
        for key, value in rows.items():
            value = np.asarray(value)
            blocks = self.blocks.setdefault(key, [])
            if blocks and (blocks[0].shape[1:] != value.shape[1:] or blocks[0].dtype != value.dtype):
                if self.n:
                    raise RuntimeError(f"row buffer {key!r} changed shape or dtype within a shard")  # pragma: no cover
                blocks.clear()
            done, pos = 0, self.n
            while done < count:
                b, off = divmod(pos, B)
                while len(blocks) <= b:
                    blocks.append(np.empty((B, *value.shape[1:]), dtype=value.dtype))
                k = min(count - done, B - off)
                blocks[b][off:off + k] = value[done:done + k]
                done += k
                pos += k
        self.n += count

    def source(self, key: str) -> list[np.ndarray]:
        """The blocks holding field ``key`` (row r is ``blocks[r // block_rows][r % block_rows]``)."""
        return self.blocks[key][: -(-self.n // self.block_rows)]

    def __getitem__(self, key: str) -> np.ndarray:
        """Field ``key`` of all rows so far, as one new array."""
        blocks = self.source(key)
        if not blocks:
            return np.empty((0, *self.blocks[key][0].shape[1:]), dtype=self.blocks[key][0].dtype)
        return np.concatenate(blocks)[: self.n]


@torch.inference_mode()
def rollout_shard(
    agent: ActorCritic,
    request: Mapping[str, Any],
    shard: Mapping[str, Any],
    *,
    on_episodes: Callable[[int], None] | None = None,
    workspace: RowBuffers | None = None,
    envs: dict[int, Any] | None = None,
) -> dict[str, np.ndarray | GatheredRows]:
    """Play one shard (an entry of :func:`plan_shards`) and return its arrays, rows in episode order.

    ``on_episodes(k)`` is called as k more episodes finish (progress bars). Without ``workspace``
    every field is a plain array. With one (what :func:`build_cache` passes), the observations and
    activations come back as :class:`GatheredRows` views into the workspace, valid until its next
    use: the writer gathers them into the files without another in-memory copy. ``envs`` (number of
    envs -> vector env) lends envs to reuse across shards (an Atari vector env takes seconds to
    build); the caller closes them. A reused env is reseeded by ``reset(seed=...)``, which makes the
    shard the same as with a fresh env.
    """
    spec, kwargs = request["env"]["spec"], request["env"]["kwargs"]
    is_maze = env_family(spec) == "maze"
    version: PolicyVersion = parse_version(shard["version_name"])
    hooks = list(request["hook_points"])
    act_dtype = np.float16 if request["activation_dtype"] == "float16" else np.float32
    episodes = int(shard["episodes"])
    E = min(int(request["num_envs"]), episodes)
    quota = np.full(E, episodes // E, dtype=np.int64)
    quota[: episodes % E] += 1
    first_local = np.concatenate([[0], np.cumsum(quota)[:-1]])
    device = next(agent.parameters()).device
    lazy = workspace is not None
    rows = workspace if lazy else RowBuffers()
    rows.reset()
    act_keys = {h: f"act.{h}" for h in hooks}

    env = None if envs is None else envs.get(E)
    owned = env is None
    if owned:
        env = make_env(spec, E, seed=None, **kwargs)  # seeded by the reset below (make_env would reset once more)
        if envs is not None:
            envs[E], owned = env, False
    try:
        obs, info = env.reset(seed=shard["env_seed"])
        generator = torch.Generator(device=device).manual_seed(int(shard["action_seed"]))
        finished = np.zeros(E, dtype=np.int64)  # episodes finished per slot
        active = np.ones(E, dtype=bool)
        t_in_episode = np.zeros(E, dtype=np.int64)
        all_slots = np.arange(E)
        no_seed = np.zeros(E, dtype=np.int64)
        pending: dict[str, np.ndarray] | None = None  # final states of the episodes that ended on the last step

        while active.any() or pending is not None:
            slots = all_slots if active.all() else np.flatnonzero(active)
            n = len(slots)
            batch_obs = obs.copy() if n == E else obs[slots]  # a copy: an env may reuse its output buffer
            if pending is not None:
                batch_obs = np.concatenate([batch_obs, pending["obs"]]) if n else pending["obs"]
            (logits, value), acts = agent.run_with_cache(torch.from_numpy(batch_obs).to(device), names=hooks)
            step_rows: dict[str, Any] = {"obs": batch_obs, "value": value.float().cpu().numpy()}
            for h in hooks:
                step_rows[act_keys[h]] = acts[h].cpu().numpy().astype(act_dtype, copy=False)
            parts: list[dict[str, np.ndarray]] = []
            ended_rows = None
            if n:
                action = version.sample(logits[:n], generator).cpu().numpy()
                full_action = np.zeros(E, dtype=np.int64)
                full_action[slots] = action
                obs, reward, terminated, truncated, info = env.step(full_action)
                term, trunc = terminated[slots], truncated[slots]
                row_seed = (np.asarray(info["level_seed"], dtype=np.int64) if is_maze else no_seed)[slots]
                parts.append({
                    "ep": first_local[slots] + finished[slots], "step": t_in_episode[slots], "action": action,
                    "reward": np.asarray(reward, dtype=np.float32)[slots], "terminal": term, "truncated": trunc,
                    "last": np.zeros(n, dtype=bool), "level_seed": row_seed,
                })
                t_in_episode[slots] += 1
                ended = term | trunc
                if ended.any():
                    ended_slots = slots[ended]
                    ended_rows = {
                        "obs": np.asarray(info["final_obs"])[ended_slots],
                        "ep": first_local[ended_slots] + finished[ended_slots],
                        "step": t_in_episode[ended_slots].copy(),
                        "terminal": term[ended], "truncated": trunc[ended], "level_seed": row_seed[ended],
                    }
                    finished[ended_slots] += 1
                    t_in_episode[ended_slots] = 0
                    active[ended_slots] = finished[ended_slots] < quota[ended_slots]
                    if on_episodes is not None:
                        on_episodes(len(ended_slots))
            if pending is not None:
                m = len(pending["ep"])
                parts.append({
                    "ep": pending["ep"], "step": pending["step"], "action": np.full(m, -1, dtype=np.int64),
                    "reward": np.zeros(m, dtype=np.float32), "terminal": pending["terminal"], "truncated": pending["truncated"],
                    "last": np.ones(m, dtype=bool), "level_seed": pending["level_seed"],
                })
            for key in parts[0]:
                step_rows[key] = parts[0][key] if len(parts) == 1 else np.concatenate([p[key] for p in parts])
            rows.append(step_rows)
            pending = ended_rows
    finally:
        if owned:
            env.close()

    order = np.lexsort((rows["step"], rows["ep"]))
    local_ep = rows["ep"][order]
    out: dict[str, Any] = {"obs": GatheredRows(rows.source("obs"), order, rows.block_rows)}
    for key, dtype in (("action", np.int64), ("reward", np.float32), ("terminal", bool), ("truncated", bool), ("last", bool)):
        out[key] = rows[key][order].astype(dtype, copy=False)
    value = rows["value"][order].astype(np.float32, copy=False)
    ep_start = np.flatnonzero(np.r_[True, local_ep[1:] != local_ep[:-1]]).astype(np.int64)
    ep_end = np.r_[ep_start[1:], len(local_ep)]
    if len(ep_start) != episodes or not np.array_equal(local_ep[ep_start], np.arange(episodes)):
        raise RuntimeError(f"shard {shard['name']}: collected {len(ep_start)} episodes, expected {episodes}")  # pragma: no cover
    ep_length = (ep_end - ep_start - 1).astype(np.int32)
    last_rows = ep_end - 1
    ep_terminated, ep_truncated = out["terminal"][last_rows], out["truncated"][last_rows]
    ep_index = np.repeat(np.arange(len(ep_start)), ep_end - ep_start)
    ret = discounted_returns(out["reward"], value, ep_start, ep_length.astype(np.int64), ep_truncated, request["gamma"])
    out["return"] = ret.astype(np.float32)
    out["bootstrapped"] = ep_truncated[ep_index]
    out["value"] = value
    out["episode"] = (shard["first_episode"] + local_ep).astype(np.int64)
    out["step"] = rows["step"][order].astype(np.int32)
    out["version"] = np.full(len(order), shard["version"], dtype=np.int32)
    for h in hooks:
        out[act_keys[h]] = GatheredRows(rows.source(act_keys[h]), order, rows.block_rows)
    out.update({
        "ep_id": (shard["first_episode"] + np.arange(len(ep_start))).astype(np.int64),
        "ep_start": ep_start,
        "ep_length": ep_length,
        "ep_terminated": ep_terminated,
        "ep_truncated": ep_truncated,
        "ep_reward": np.add.reduceat(out["reward"].astype(np.float64), ep_start).astype(np.float32),
    })
    if is_maze:
        from innercritic.envs.maze import level_size

        seeds = rows["level_seed"][order]
        ep_seed = seeds[ep_start]
        size_arg = kwargs.get("size", 9)
        size_arg = tuple(size_arg) if isinstance(size_arg, list) else size_arg
        ep_size = np.array([level_size(int(s), size_arg) for s in ep_seed.tolist()], dtype=np.int32)
        frame_obs = rows["obs"]
        offset = ((frame_obs.shape[-1] - ep_size) // 2).astype(np.int64)
        out["level_seed"] = seeds
        out["mouse"] = _frame_rc(np.take(frame_obs[:, 1:2], order, axis=0), 0, offset[ep_index])
        out["ep_level_seed"] = ep_seed
        out["ep_maze_size"] = ep_size
        out["ep_cheese"] = _frame_rc(np.asarray(GatheredRows(rows.source("obs"), order[ep_start], rows.block_rows)), 2, offset)
    if not lazy:
        out = {k: np.asarray(v) for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------
# The whole cache: check what is on disk, collect the missing shards, write the manifest last.


def cache_status(cache_dir: str | Path, request: Mapping[str, Any] | None = None) -> str:
    """``"missing"`` (no cache), ``"complete"`` (manifest present) or ``"partial"`` (interrupted).

    With ``request``, a cache (complete or partial) made for another request raises
    :class:`CacheMismatchError` naming the differing fields. A non-empty folder that is not a cache
    raises :class:`CacheError`.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.exists():
        return "missing"
    if not cache_dir.is_dir():
        raise CacheError(f"cache_dir {str(cache_dir)!r} is a file, not a folder")
    if (cache_dir / MANIFEST).is_file():
        stored, status = read_json(cache_dir / MANIFEST).get("request", {}), "complete"
    elif (cache_dir / REQUEST).is_file():
        stored, status = read_json(cache_dir / REQUEST).get("request", {}), "partial"
    else:
        foreign = sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(TMP_PREFIX))
        if foreign:
            raise CacheError(f"cache_dir {str(cache_dir)!r} is not empty and holds no trajectory cache "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose another folder")
        return "missing"
    if request is not None:
        diffs = diff_requests(stored, _jsonable(dict(request), "request"))
        if diffs:
            what = "an interrupted collection for a different request" if status == "partial" else "a different collection"
            raise CacheMismatchError(f"{format_differences(cache_dir, diffs)} ({what}); pass rebuild=True to delete "
                                     f"and rebuild it, or choose another cache_dir")
    return status


def _clear_cache(cache_dir: Path) -> None:
    """Delete a cache's own files (manifest, request, shard folders, temporaries); refuse anything else."""
    names = [p for p in cache_dir.iterdir()]
    ours = {MANIFEST, REQUEST}
    foreign = [p.name for p in names if not (p.name in ours or p.name.startswith(TMP_PREFIX)
                                              or (p.is_dir() and (p / SHARD_META).is_file()))]
    if foreign:
        raise CacheError(f"refusing to rebuild {str(cache_dir)!r}: it holds files that are not part of a cache: {sorted(foreign)[:5]}")
    (cache_dir / MANIFEST).unlink(missing_ok=True)  # first: the folder stops being a complete cache at once
    for p in names:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _fields_schema(sample: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": np.dtype(a.dtype).str, "shape": list(a.shape[1:]), "per": "episode" if k.startswith("ep_") else "row"}
            for k, a in sample.items()}


def _completed_entry(cache_dir: Path, shard: Mapping[str, Any], request_sha: str) -> dict[str, Any] | None:
    folder = cache_dir / shard["name"]
    if not folder.is_dir():
        return None
    meta_path = folder / SHARD_META
    if not meta_path.is_file():
        raise CacheIntegrityError(f"shard folder {str(folder)!r} has no {SHARD_META}; it was not written by this code: rebuild the cache")
    entry = read_json(meta_path)
    if entry.get("request_sha256") != request_sha or entry.get("episodes") != shard["episodes"]:
        raise CacheMismatchError(f"shard {str(folder)!r} was collected for another request; rebuild the cache")
    for info in entry["files"].values():
        path = cache_dir / info["file"]
        if not path.is_file() or file_sha256(path) != info[CHECKSUM]:
            raise CacheIntegrityError(f"cache file {str(path)!r} of an already collected shard is missing or corrupt; rebuild the cache")
    return entry


def build_cache(
    agent: ActorCritic,
    request: Mapping[str, Any],
    cache_dir: str | Path,
    *,
    rebuild: bool = False,
    progress: bool = True,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Make sure ``cache_dir`` holds the cache ``request`` describes; collect what is missing. Returns the manifest.

    A complete cache for the same request is reused as is; one for another request (complete or
    interrupted) raises :class:`CacheMismatchError` unless ``rebuild=True``, which deletes it first.
    An interrupted collection for the same request is resumed: complete shards are checked (sha256)
    and kept, the others collected. ``rebuild=True`` never discards a matching, intact cache: it
    replaces what does not match, and what fails its checksums.

    ``on_shard(entry)`` is called, in shard order, after each shard is on disk; ``source`` is stored
    in the manifest as is (where the agent came from; not compared). Shard ``k`` is written by a
    background thread while shard ``k + 1`` is played, so memory holds two shards' rows at most.
    """
    cache_dir = Path(cache_dir)
    request = _jsonable(dict(request), "request")
    try:
        status = cache_status(cache_dir, request)
    except CacheMismatchError:
        if not rebuild:
            raise
        _clear_cache(cache_dir)
        status = "missing"
    if status == "complete":
        if not rebuild:
            return read_json(cache_dir / MANIFEST)
        try:  # rebuild=True replaces a matching cache only when its files are damaged
            return TrajectoryCache(cache_dir, verify=True).manifest
        except CacheError:
            _clear_cache(cache_dir)
            status = "missing"
    cache_dir.mkdir(parents=True, exist_ok=True)
    request_sha = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    if status == "missing":
        write_json_atomic(cache_dir / REQUEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "request": request})
    remove_stale_tmp(cache_dir)

    plan = plan_shards(request)
    total = sum(s["episodes"] for s in plan)
    bar = _progress_bar(total, progress, f"collecting {cache_dir.name}")
    entries: list[dict[str, Any]] = []
    # Two workspaces: one shard is written (a background thread: file writes and sha256 release the
    # GIL) while the next one is played. Entries and on_shard still come in shard order.
    workspaces = (RowBuffers(), RowBuffers())
    envs: dict[int, Any] = {}
    writing: Future | None = None

    def finish(entry: dict[str, Any]) -> None:
        entries.append(entry)
        if on_shard is not None:
            on_shard(entry)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as writer:
        try:
            for i, shard in enumerate(plan):
                try:
                    entry = _completed_entry(cache_dir, shard, request_sha)
                except CacheError:
                    if not rebuild:
                        raise
                    shutil.rmtree(cache_dir / shard["name"])  # a damaged shard of this request: collect it again
                    entry = None
                if entry is not None:
                    bar.update(shard["episodes"])
                    if writing is not None:
                        finish(writing.result())
                        writing = None
                    finish(entry)
                    continue
                arrays = rollout_shard(agent, request, shard, on_episodes=bar.update, workspace=workspaces[i % 2], envs=envs)
                meta = {key: shard[key] for key in ("version", "version_name", "shard", "episodes", "first_episode", "env_seed", "action_seed")}
                meta.update(rows=len(arrays["obs"]), transitions=int((~arrays["last"]).sum()), request_sha256=request_sha,
                            fields=_fields_schema(arrays))
                if writing is not None:
                    finish(writing.result())
                writing = writer.submit(write_shard, cache_dir, shard["name"], arrays, meta)
            if writing is not None:
                finish(writing.result())
                writing = None
        finally:
            bar.close()
            for env in envs.values():
                env.close()
            # Leaving the with-block waits for a shard still being written: it lands whole (or not at all).
    schema = entries[0]["fields"]
    rows = sum(e["rows"] for e in entries)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "request": request,
        "hook_shapes": request["hook_shapes"],
        "checksum": CHECKSUM,
        "fields": schema,
        "num_episodes": sum(e["episodes"] for e in entries),
        "num_rows": rows,
        "num_transitions": sum(e["transitions"] for e in entries),
        "bytes": sum(f["bytes"] for e in entries for f in e["files"].values()),
        "source": _jsonable(dict(source or {}), "source"),
        "collect_seconds_last_run": round(time.perf_counter() - started, 3),
        "shards": [{k: v for k, v in e.items() if k != "fields"} for e in entries],
    }
    write_json_atomic(cache_dir / MANIFEST, manifest)
    (cache_dir / REQUEST).unlink(missing_ok=True)
    return manifest


def build_cache_from_checkpoint(agent_ckpt: str | Path, cache_dir: str | Path, *, rebuild: bool = False, progress: bool = True,
                                on_shard: Callable[[dict[str, Any]], None] | None = None, **settings: Any) -> dict[str, Any]:
    """:func:`build_cache` for the agent in a PPO checkpoint; ``settings`` go to :func:`make_request`."""
    agent, env_info = load_agent(agent_ckpt)
    request = make_request(agent, env_info, **settings)
    source = {"agent_ckpt": str(agent_ckpt), "checkpoint_sha256": file_sha256(agent_ckpt)}
    return build_cache(agent, request, cache_dir, rebuild=rebuild, progress=progress, on_shard=on_shard, source=source)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with Lightning; the core does not require it
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="ep", dynamic_ncols=True)
