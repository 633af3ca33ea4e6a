"""The three callers of the episode runner on fixed seeds: PPO evaluation, a steering scan, planning.

``tests/data/episode_runner_before.json`` holds what these gave before the runners were merged into
``innercritic.envs.episodes.run_episodes`` (commit 51ce186 plus the per-level steering vectors);
``tests/test_episodes.py`` checks that they still give exactly that. Regenerate (only when a change of
numbers is intended, and say so in the commit) with ``python tests/episode_runner_cases.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "episode_runner_before.json"
ENV = {"size": 5, "cheese": "anywhere"}


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items() if k != "per_episode"}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


def figures() -> dict:
    sys.path.insert(0, str(ROOT))
    from datamodules.rollout import RolloutDataModule
    from innercritic.agents import ActorCritic
    from innercritic.probing.planning import compare_planners, critic_value_fn
    from innercritic.steering import LevelVectors, averaged_vector, play_episodes

    torch.set_num_threads(1)
    torch.manual_seed(3)
    agent = ActorCritic((3, 5, 5), 4, arch="small", separate_critic=True, channels=(4, 8), hidden=8).eval()
    dm = RolloutDataModule(env="maze", env_kwargs=ENV, eval_episodes=10, eval_dists={"d": {}, "tr": {"cheese": "top_right:2"}}, eval_num_envs=4)
    evaluation = dm.evaluate(agent)
    scans = {}
    hook = "encoder.block1.hook_out"
    for name, steer in (("plain", None), ("per_level", LevelVectors(hook, "cheese")), ("averaged", averaged_vector(agent, hook, "cheese", ENV, 4, 0))):
        from innercritic.steering.scan import Steer

        result = play_episodes(agent, "maze", ENV, episodes=7, seed=5, num_envs=3,
                               interventions=None if steer is None else Steer(steer, -2.0))
        scans[name] = {k: v for k, v in result.items()}
    planning = compare_planners(agent, "maze", ENV, {"critic": critic_value_fn(agent)}, 0.99, episodes=6, seed=11, num_envs=4)
    return _plain({"evaluate": evaluation, "scan": scans, "planning": planning})


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(figures(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
