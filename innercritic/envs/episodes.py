"""The one episode runner: play each env's first episode, ``episodes`` times, with any action source.

PPO evaluation (``RolloutDataModule.evaluate``), steering scans (``innercritic.steering.scan``) and
planning (``innercritic.probing.planning``) all play episodes through :func:`run_episodes`, so the
seeding rule, the first-episode counting and the per-episode records live here once. It sits with the
environments because it needs nothing but an env and a callable that picks actions: a policy, a
steered policy, a planner, a uniform random policy.

The seeding rule: round ``r`` resets env ``i`` of ``n`` with seed ``seed + r * n`` (each env's own
stream from there), and the action source gets one ``torch.Generator`` seeded ``seed`` for the whole
run, so two runs with the same ``seed`` play the same levels with the same dice, and differ only by
what their action sources do. Every env counts its first episode of a round; in the last round, envs
past the requested count still step (so the others see the same levels and draws as in a full round)
but are not counted.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

import numpy as np
import torch

from innercritic.envs.factory import make_env
from innercritic.errors import InnerCriticError

__all__ = ["Act", "run_episodes"]

# act(env, obs, pending, generator) -> (actions for all n envs, per-step extras {name: (n,) array}):
# extras are summed over each counted episode's steps (booleans count) into "sum/<name>".
Act = Callable[[Any, np.ndarray, np.ndarray, torch.Generator], tuple[np.ndarray, Mapping[str, np.ndarray]]]


def run_episodes(
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    episodes: int,
    seed: int,
    num_envs: int,
    act: Act,
    device: torch.device | str = "cpu",
    on_reset: Callable[[Any, int], None] | None = None,
    round_records: Callable[[], Mapping[str, np.ndarray]] | None = None,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Per-episode arrays, in episode order: ``return``, ``length``, ``success`` (terminated with a
    positive reward), ``top_right`` (the maze's mouse stood on the top-right corner), ``level_seed``
    (maze; -1 elsewhere), ``sum/<name>`` for every extra ``act`` reports, and whatever
    ``round_records()`` returns at the end of each round (per-env arrays, e.g. decision-square moves).

    ``on_reset(env, m)`` is called after each round's reset, ``m`` being the envs counted in it (a
    steered policy builds each level's vector there). The generator handed to ``act`` lives on ``device``.
    ``progress`` names a bar (on stderr) counting the finished episodes of ``episodes``, for long runs.
    """
    for name, value in (("episodes", episodes), ("num_envs", num_envs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InnerCriticError(f"{name} must be an integer >= 1, got {value!r}")
    n = min(int(num_envs), int(episodes))
    env = make_env(env_spec, n, seed=seed, **dict(env_kwargs or {}))
    generator = torch.Generator(device=device).manual_seed(int(seed))
    rounds: list[dict[str, np.ndarray]] = []
    bar = None
    if progress:
        from tqdm import tqdm  # a lazy import: a run without a bar never loads it

        bar = tqdm(total=int(episodes), desc=progress, unit=" episodes", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for r in range(-(-episodes // n)):
            obs, _ = env.reset(seed=seed + r * n)
            m = min(n, episodes - r * n)
            if on_reset is not None:
                on_reset(env, m)
            pending = np.arange(n) < m
            ret, length, top_right = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool)
            sums: dict[str, np.ndarray] = {}
            out: dict[str, np.ndarray] = {"return": np.zeros(n), "length": np.zeros(n, np.int64), "success": np.zeros(n, bool),
                                          "top_right": np.zeros(n, bool), "level_seed": np.full(n, -1, np.int64)}
            while pending.any():
                actions, extras = act(env, obs, pending, generator)
                for name, value in extras.items():
                    value = np.asarray(value)
                    total = sums.setdefault(name, np.zeros(n, np.float64 if value.dtype.kind == "f" else np.int64))
                    total += np.where(pending, value, 0)
                obs, reward, terminated, truncated, info = env.step(actions)
                ret += np.where(pending, reward, 0.0)
                length += pending
                if "at_top_right" in info:
                    top_right |= np.asarray(info["at_top_right"]) & pending
                finished = (terminated | truncated) & pending
                if finished.any():
                    out["return"][finished] = ret[finished]
                    out["length"][finished] = length[finished]
                    out["success"][finished] = (terminated & (reward > 0))[finished]
                    out["top_right"][finished] = top_right[finished]
                    if "level_seed" in info:
                        out["level_seed"][finished] = np.asarray(info["level_seed"])[finished]
                    pending &= ~finished
                    if bar is not None:
                        bar.update(int(finished.sum()))
            out.update({f"sum/{name}": total for name, total in sums.items()})
            if round_records is not None:
                out.update({k: np.asarray(v) for k, v in round_records().items()})
            rounds.append({k: v[:m] for k, v in out.items()})
    finally:
        env.close()
        if bar is not None:
            bar.close()
    return {k: np.concatenate([rd[k] for rd in rounds]) for k in rounds[0]}
