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

Blocks (``blocks=K``): K runs that differ only by their action sources play in lockstep, each on its
own env of ``num_envs`` envs seeded exactly as a run of its own would seed it, with its own generator
seeded ``seed``. Block k's episodes are then the very episodes its own run would play, while ``act``
sees every block at each step and can batch their forward passes (a steering scan plays all its
coefficients this way). A block whose envs have all finished stops stepping, as its own run would.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from innercritic.envs.factory import make_env
from innercritic.errors import InnerCriticError

__all__ = ["Act", "BlockAct", "run_episodes"]

# act(env, obs, pending, generator) -> (actions for all n envs, per-step extras {name: (n,) array}):
# extras are summed over each counted episode's steps (booleans count) into "sum/<name>".
Act = Callable[[Any, np.ndarray, np.ndarray, torch.Generator], tuple[np.ndarray, Mapping[str, np.ndarray]]]
# With blocks: act(envs, obs, pending, generators), one entry per block, -> one (actions, extras) per
# block. A block with no pending env has finished: its entry is ignored, and act must not draw from
# its generator (its own run would have stopped, and the next round continues that generator).
BlockAct = Callable[[Sequence[Any], Sequence[np.ndarray], Sequence[np.ndarray], Sequence[torch.Generator]],
                    Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]]]


def run_episodes(
    env_spec: str,
    env_kwargs: Mapping[str, Any] | None,
    episodes: int,
    seed: int,
    num_envs: int,
    act: Act | BlockAct,
    device: torch.device | str = "cpu",
    on_reset: Callable[[Any, int], None] | None = None,
    round_records: Callable[[], Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]] | None = None,
    progress: str | None = None,
    blocks: int | None = None,
) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Per-episode arrays, in episode order: ``return``, ``length``, ``success`` (terminated with a
    positive reward), ``top_right`` (the maze's mouse stood on the top-right corner), ``level_seed``
    (maze; -1 elsewhere), ``sum/<name>`` for every extra ``act`` reports, and whatever
    ``round_records()`` returns at the end of each round (per-env arrays, e.g. decision-square moves).

    ``on_reset(env, m)`` is called after each round's reset, ``m`` being the envs counted in it (a
    steered policy builds each level's vector there). The generator handed to ``act`` lives on ``device``.
    ``progress`` names a bar (on stderr) counting the finished episodes of ``episodes``, for long runs.

    ``blocks=K`` plays K runs in lockstep (module docstring): ``act`` is a :data:`BlockAct`,
    ``on_reset(envs, m)`` gets the K envs (all on the same levels), ``round_records()`` returns one
    mapping per block, and the result is one dict per block, each equal to what a run of its own gives.
    ``num_envs`` stays the envs of one block; the bar counts the episodes of all blocks.
    """
    for name, value in (("episodes", episodes), ("num_envs", num_envs)) + ((("blocks", blocks),) if blocks is not None else ()):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InnerCriticError(f"{name} must be an integer >= 1, got {value!r}")
    single = blocks is None
    k_blocks = 1 if single else int(blocks)
    if single:
        # One block with the unblocked callbacks' signatures: the same loop serves both.
        act, on_reset, round_records = _as_block(act, on_reset, round_records)
    n = min(int(num_envs), int(episodes))
    envs: list[Any] = []
    bar = None
    try:
        for _ in range(k_blocks):
            envs.append(make_env(env_spec, n, seed=seed, **dict(env_kwargs or {})))
        generators = [torch.Generator(device=device).manual_seed(int(seed)) for _ in range(k_blocks)]
        rounds: list[list[dict[str, np.ndarray]]] = [[] for _ in range(k_blocks)]
        if progress:
            from tqdm import tqdm  # a lazy import: a run without a bar never loads it

            bar = tqdm(total=int(episodes) * k_blocks, desc=progress, unit=" episodes", file=sys.stderr, dynamic_ncols=True, leave=False)
        for r in range(-(-episodes // n)):
            obs = [env.reset(seed=seed + r * n)[0] for env in envs]
            m = min(n, episodes - r * n)
            if on_reset is not None:
                on_reset(envs, m)
            pending = [np.arange(n) < m for _ in range(k_blocks)]
            ret = [np.zeros(n) for _ in range(k_blocks)]
            length = [np.zeros(n, np.int64) for _ in range(k_blocks)]
            top_right = [np.zeros(n, bool) for _ in range(k_blocks)]
            sums: list[dict[str, np.ndarray]] = [{} for _ in range(k_blocks)]
            out: list[dict[str, np.ndarray]] = [{"return": np.zeros(n), "length": np.zeros(n, np.int64), "success": np.zeros(n, bool),
                                                 "top_right": np.zeros(n, bool), "level_seed": np.full(n, -1, np.int64)}
                                                for _ in range(k_blocks)]
            live = list(range(k_blocks))
            while live:
                steps = act(envs, obs, pending, generators)
                for k in live:
                    actions, extras = steps[k]
                    for name, value in extras.items():
                        value = np.asarray(value)
                        total = sums[k].setdefault(name, np.zeros(n, np.float64 if value.dtype.kind == "f" else np.int64))
                        total += np.where(pending[k], value, 0)
                    obs[k], reward, terminated, truncated, info = envs[k].step(actions)
                    ret[k] += np.where(pending[k], reward, 0.0)
                    length[k] += pending[k]
                    if "at_top_right" in info:
                        top_right[k] |= np.asarray(info["at_top_right"]) & pending[k]
                    finished = (terminated | truncated) & pending[k]
                    if finished.any():
                        o = out[k]
                        o["return"][finished] = ret[k][finished]
                        o["length"][finished] = length[k][finished]
                        o["success"][finished] = (terminated & (reward > 0))[finished]
                        o["top_right"][finished] = top_right[k][finished]
                        if "level_seed" in info:
                            o["level_seed"][finished] = np.asarray(info["level_seed"])[finished]
                        pending[k] &= ~finished
                        if bar is not None:
                            bar.update(int(finished.sum()))
                live = [k for k in live if pending[k].any()]
            records = round_records() if round_records is not None else [{}] * k_blocks
            for k in range(k_blocks):
                out[k].update({f"sum/{name}": total for name, total in sums[k].items()})
                out[k].update({key: np.asarray(v) for key, v in records[k].items()})
                rounds[k].append({key: v[:m] for key, v in out[k].items()})
    finally:
        for env in envs:
            env.close()
        if bar is not None:
            bar.close()
    results = [{key: np.concatenate([rd[key] for rd in block]) for key in block[0]} for block in rounds]
    return results[0] if single else results


def _as_block(act: Act, on_reset: Callable[[Any, int], None] | None,
              round_records: Callable[[], Mapping[str, np.ndarray]] | None) -> tuple[BlockAct, Any, Any]:
    """The callbacks of an unblocked run, as those of a run of one block."""

    def block_act(envs: Sequence[Any], obs: Sequence[np.ndarray], pending: Sequence[np.ndarray],
                  generators: Sequence[torch.Generator]) -> list[tuple[np.ndarray, Mapping[str, np.ndarray]]]:
        return [act(envs[0], obs[0], pending[0], generators[0])]

    def block_reset(envs: Sequence[Any], m: int) -> None:
        on_reset(envs[0], m)

    def block_records() -> list[Mapping[str, np.ndarray]]:
        return [round_records()]

    return block_act, None if on_reset is None else block_reset, None if round_records is None else block_records
