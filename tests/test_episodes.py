"""The one episode runner (``innercritic.envs.episodes.run_episodes``) and its three callers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from episode_runner_cases import GOLDEN, figures
from innercritic.envs.episodes import run_episodes
from innercritic.envs.factory import make_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _close(got, want, path="") -> list[str]:
    """Where ``got`` differs from ``want``: counts, flags and episode outcomes exactly; float figures to 1e-5
    relative, because float32 kernels round differently on different CPUs (the golden file was written on an
    AMD EPYC; on an Intel Xeon the vector norms differ in the 7th digit, with every episode the same)."""
    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{path}: keys {sorted(set(got) ^ set(want))}"]
        return [d for k in want for d in _close(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _close(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and not isinstance(got, bool):
        return [] if got == pytest.approx(want, rel=1e-5, abs=1e-12) else [f"{path}: {got} != {want}"]
    return [] if got == want and type(got) is type(want) else [f"{path}: {got!r} != {want!r}"]


def test_the_three_callers_give_the_numbers_they_gave_before_the_merge():
    # PPO evaluation, a steering scan (plain, per-level and averaged vectors) and planning, on fixed seeds.
    assert _close(figures(), json.loads(GOLDEN.read_text())) == []


def test_rounds_seed_levels_and_count_each_envs_first_episode():
    seen = []

    def on_reset(env, m):
        seen.append((env.level_seeds.copy(), m))

    def always_up(env, obs, pending, generator):
        return np.zeros(len(obs), np.int64), {"pending": pending.copy(), "draw": torch.rand(len(obs), generator=generator).numpy()}

    ep = run_episodes("maze", {"size": 5, "max_steps": 7}, episodes=5, seed=40, num_envs=2, act=always_up, on_reset=on_reset)
    assert [m for _, m in seen] == [2, 2, 1]  # the last round counts one env; both still step
    for r, (levels, _) in enumerate(seen):
        env = make_env("maze", 2, seed=40, size=5, max_steps=7)
        env.reset(seed=40 + r * 2)
        assert np.array_equal(levels, env.level_seeds), "round r resets with seed + r * n"
    assert ep["length"].tolist() == [7] * 5 and not ep["success"].any()  # "up" from the bottom-left never finds the cheese in 7 steps
    assert ep["sum/pending"].tolist() == [7] * 5  # extras are summed over each counted episode's own steps
    assert np.array_equal(ep["level_seed"], np.concatenate([levels[:m] for levels, m in seen]))
    again = run_episodes("maze", {"size": 5, "max_steps": 7}, episodes=5, seed=40, num_envs=2, act=always_up)
    assert np.array_equal(again["sum/draw"], ep["sum/draw"]), "the generator is seeded from the run's seed"
    with pytest.raises(ValueError, match="episodes must be an integer >= 1"):
        run_episodes("maze", {}, 0, 0, 1, always_up)


def test_blocks_play_in_lockstep_exactly_the_runs_they_would_play_alone():
    # Three action sources of different habits (so their blocks finish at different steps, and the
    # ones done first must leave their generators untouched for the next round) against runs alone.
    def source(bias):
        def act(env, obs, pending, generator):
            draw = torch.rand(int(pending.sum()), generator=generator).numpy()
            actions = np.zeros(len(obs), np.int64)
            actions[pending] = np.minimum((draw * 4 + bias).astype(np.int64), 3)
            return actions, {"action": actions}
        return act

    acts = [source(b) for b in (0.0, 1.5, 3.0)]
    kwargs = {"size": 5, "max_steps": 12}
    seen = []

    def block_act(envs, obs, pending, generators):
        return [acts[k](envs[k], obs[k], pending[k], generators[k]) if pending[k].any() else (np.zeros(len(obs[k]), np.int64), {})
                for k in range(3)]

    together = run_episodes("maze", kwargs, episodes=7, seed=9, num_envs=3, act=block_act, blocks=3,
                            on_reset=lambda envs, m: seen.append([env.level_seeds.copy() for env in envs]),
                            round_records=lambda: [{"k": np.full(3, k)} for k in range(3)])
    assert len(seen) == 3 and all(np.array_equal(levels[0], other) for levels in seen for other in levels[1:])  # the same levels
    for k, act in enumerate(acts):
        alone = run_episodes("maze", kwargs, episodes=7, seed=9, num_envs=3, act=act)
        assert set(together[k]) == set(alone) | {"k"} and (together[k]["k"] == k).all()
        for key, value in alone.items():
            assert np.array_equal(together[k][key], value), (k, key)
    assert len({tuple(t["length"]) for t in together}) > 1, "the blocks should differ, or the test proves little"
    with pytest.raises(ValueError, match="blocks must be an integer >= 1"):
        run_episodes("maze", {}, 1, 0, 1, block_act, blocks=0)
