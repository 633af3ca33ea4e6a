"""Trajectory collection throughput: states/s with activations of three hook points, against plain rollouts.

For the maze (a small CNN 8-16-16, hidden 128, separate critic: the default network when its figures were recorded, on
9x9 mazes) and for Breakout (the Nature CNN of configs/ppo/breakout.yaml), in the same process:

- ``rollout_sps``: the agent's plain rollout, no activation capture and nothing stored: one forward
  pass (logits and value), sample, ``env.step`` on ``num_envs`` envs with autoreset;
- ``collect_sps``: ``innercritic.cache.build_cache`` end to end into a fresh folder, counting env
  steps (transitions; the extra final row per episode is not counted): the forward pass with three
  hook points cached, masking of finished slots, sorting rows into episodes, returns, writing and
  hashing the shards, the manifest;
- ``bytes_per_state``: bytes on disk per stored row (observation, activations, scalars);
- ``verify_mb_per_s``: the sha256 verification the reader does when it opens a cache.

They are measured in pairs, a collection and then a plain rollout of as many env steps, ``--repeats``
times after one warm-up of each; the figures are medians over the pairs, so that a noisy, shared
machine affects both alike. ``ratio`` is collection over rollout by wall clock; ``ratio_cpu`` the same by
process CPU time (it includes the shard-writer thread, and is not affected by other processes). The agent has random weights unless ``--maze-ckpt`` names a checkpoint:
a random policy plays long episodes (many truncated), the hardest case for collection's tail.

    python benchmarks/collect_throughput.py                 # prints a table, then one JSON line
    python benchmarks/collect_throughput.py --no-breakout   # the maze only
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from _report import machine, report
from innercritic.agents import ActorCritic, load_agent, parse_version
from innercritic.cache import TrajectoryCache, build_cache, make_request
from innercritic.envs.factory import make_env


@torch.inference_mode()
def rollout_sps(agent: ActorCritic, spec: str, kwargs: dict, num_envs: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Env steps per second of the plain rollout (forward, sample, step), by wall clock and by process CPU time."""
    env = make_env(spec, num_envs, seed=seed, **kwargs)
    obs, _ = env.reset(seed=seed)
    policy = parse_version("policy")
    generator = torch.Generator().manual_seed(seed)
    for i in range(steps + 5):
        if i == 5:  # after a few steps: the first ones fill level caches and the allocator
            wall, cpu = time.perf_counter(), time.process_time()
        logits, _ = agent(torch.from_numpy(obs))
        action = policy.sample(logits, generator).numpy()
        obs, *_ = env.step(action)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    env.close()
    return {"sps": steps * num_envs / wall, "cpu_sps": steps * num_envs / cpu}


def collect_sps(agent: ActorCritic, env_info: dict, hooks: list[str], episodes: int, num_envs: int, episodes_per_shard: int,
                seed: int = 0, where: str | None = None) -> dict[str, float]:
    """build_cache end to end into a fresh folder: transitions per second (wall and CPU), bytes, verify speed."""
    request = make_request(agent, env_info, versions=["policy"], episodes_per_version=episodes, hook_points=hooks,
                           num_envs=num_envs, episodes_per_shard=episodes_per_shard, seed=seed)
    folder = tempfile.mkdtemp(prefix="collect_bench_", dir=where)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = build_cache(agent, request, os.path.join(folder, "cache"), progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        t0 = time.perf_counter()
        TrajectoryCache(os.path.join(folder, "cache"), verify=True)
        verify = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "sps": manifest["num_transitions"] / wall,
        "cpu_sps": manifest["num_transitions"] / cpu,
        "transitions": manifest["num_transitions"],
        "bytes_per_state": manifest["bytes"] / manifest["num_rows"],
        "mb": manifest["bytes"] / 2**20,
        "verify_mb_per_s": manifest["bytes"] / 2**20 / verify,
        "seconds": wall,
    }


def measure(name: str, agent: ActorCritic, env_info: dict, hooks: list[str], episodes: int, num_envs: int,
            episodes_per_shard: int, repeats: int, where: str | None = None) -> dict[str, float]:
    """Pairs (collection, then a plain rollout of as many env steps), ``repeats`` times; medians over the pairs."""
    # Warm-up, not counted: level caches, the allocator, and (on a VM) the first touch of fresh memory pages.
    first = collect_sps(agent, env_info, hooks, min(episodes, episodes_per_shard), num_envs, episodes_per_shard, seed=99, where=where)
    rollout_sps(agent, env_info["spec"], env_info["kwargs"], num_envs, max(10, first["transitions"] // num_envs // 4), seed=99)
    pairs = []
    for r in range(repeats):
        c = collect_sps(agent, env_info, hooks, episodes, num_envs, episodes_per_shard, seed=r, where=where)
        p = rollout_sps(agent, env_info["spec"], env_info["kwargs"], num_envs, max(10, c["transitions"] // num_envs), seed=r)
        pairs.append((c, p))
        print(f"  {name} pair {r}: collect {c['sps']:,.0f} sps ({c['cpu_sps']:,.0f} per CPU s), rollout {p['sps']:,.0f} sps "
              f"({p['cpu_sps']:,.0f} per CPU s); {c['transitions']} transitions, {c['mb']:.1f} MB, {c['seconds']:.1f} s", flush=True)
    med = lambda values: float(np.median(values))  # noqa: E731
    return {
        f"collect_sps_{name}": med([c["sps"] for c, _ in pairs]),
        f"rollout_sps_{name}": med([p["sps"] for _, p in pairs]),
        f"ratio_{name}": med([c["sps"] / p["sps"] for c, p in pairs]),
        f"ratio_cpu_{name}": med([c["cpu_sps"] / p["cpu_sps"] for c, p in pairs]),
        f"bytes_per_state_{name}": med([c["bytes_per_state"] for c, _ in pairs]),
        f"verify_mb_per_s_{name}": med([c["verify_mb_per_s"] for c, _ in pairs]),
        f"transitions_{name}": med([c["transitions"] for c, _ in pairs]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maze-episodes", type=int, default=512, help="episodes collected on the maze")
    parser.add_argument("--maze-envs", type=int, default=64, help="envs stepped together on the maze")
    parser.add_argument("--maze-ckpt", default=None, help="a maze agent checkpoint (default: random weights)")
    parser.add_argument("--breakout-episodes", type=int, default=16, help="episodes collected on Breakout (shards of 8)")
    parser.add_argument("--breakout-envs", type=int, default=8, help="envs stepped together on Breakout")
    parser.add_argument("--no-breakout", action="store_true", help="skip Breakout")
    parser.add_argument("--repeats", type=int, default=3, help="(collection, rollout) pairs measured; medians are reported")
    parser.add_argument("--dir", default=None, help="where the caches are written (default: the system temp folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.maze_ckpt:
        maze_agent, maze_info = load_agent(args.maze_ckpt)
    else:
        maze_agent = ActorCritic((3, 9, 9), 4, arch="small", separate_critic=True, channels=(8, 16, 16), hidden=128).eval()
        maze_info = {"spec": "maze", "kwargs": {"size": 9, "cheese": "top_right:5"}, "gamma": 0.99}
    maze_hooks = ["encoder.block1.hook_out", "encoder.block2.hook_out", "encoder.hook_hidden"]
    figures = measure("maze", maze_agent, maze_info, maze_hooks, args.maze_episodes, args.maze_envs,
                      episodes_per_shard=128, repeats=args.repeats, where=args.dir)
    figures["ratio"] = figures["ratio_maze"]
    if not args.no_breakout:
        breakout = ActorCritic((4, 84, 84), 4, arch="nature", separate_critic=False, obs_scale=1 / 255, hidden=512).eval()
        info = {"spec": "ALE/Breakout-v5", "kwargs": {}, "gamma": 0.99}
        figures.update(measure("breakout", breakout, info, ["encoder.block1.hook_out", "encoder.block2.hook_out", "encoder.hook_hidden"],
                               args.breakout_episodes, args.breakout_envs, episodes_per_shard=8,
                               repeats=args.repeats, where=args.dir))
    figures["torch_threads"] = torch.get_num_threads()
    figures["machine"] = machine()
    report(figures)


if __name__ == "__main__":
    main()
