"""Env steps per second: the vectorised cheese maze against MiniGrid in gymnasium's SyncVectorEnv.

Both step random actions with autoreset, in the same process and run, so the ratio is meaningful on a
noisy machine. The maze is measured at batch 1, 64 and 1024 (size 9, and 25 at batch 1024); MiniGrid
on SimpleCrossingS9N1 (a 9x9 grid with walls, the closest MiniGrid has to a 9x9 maze) at batch 64.

    python benchmarks/env_throughput.py            # prints a table, then one JSON line
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _report import machine, report
from innercritic.envs.factory import make_env


def steps_per_second(spec: str, num_envs: int, seconds: float, **kwargs) -> float:
    env = make_env(spec, num_envs, seed=0, **kwargs)
    env.reset(seed=0)
    n = env.single_action_space.n
    rng = np.random.default_rng(0)
    actions = rng.integers(0, n, (256, num_envs))  # pre-drawn, so the RNG is not what we time
    for i in range(20):  # warm-up (level caches, allocator)
        env.step(actions[i % 256])
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(32):
            env.step(actions[i % 256])
        steps += 32 * num_envs
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    figures = {
        "maze_sps_b1": steps_per_second("maze", 1, args.seconds, size=9),
        "maze_sps_b64": steps_per_second("maze", 64, args.seconds, size=9),
        "maze_sps_b1024": steps_per_second("maze", 1024, args.seconds, size=9),
        "maze25_sps_b1024": steps_per_second("maze", 1024, args.seconds, size=25),
        "minigrid_sps": steps_per_second("MiniGrid-SimpleCrossingS9N1-v0", 64, args.seconds),
    }
    figures["ratio_b1024_vs_minigrid"] = figures["maze_sps_b1024"] / figures["minigrid_sps"]
    figures["machine"] = machine()
    report(figures, digits=1)


if __name__ == "__main__":
    main()
