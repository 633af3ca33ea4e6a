"""How good is a maze agent's critic: its value against the exact value of its own policy, square by square.

Why it exists: issue 19 asks for a critic that is a real ceiling for the value probes (R^2 >= 0.7
against the exact value on the training distribution). This script plays no episode: for each of
``--mazes`` held-out levels of the agent's training distribution (fresh level seeds), it puts the
mouse on every free square, reads the policy's action probabilities and the critic there, solves the
policy's Bellman equations (:func:`innercritic.envs.maze_values.policy_value`, the discount the agent
trained with) and compares. Two weightings of the squares:

- ``uniform``: every free square but the cheese counts once (what the issue's figure used);
- ``occupancy``: each square weighted by how often the policy visits it from the start (the expected
  visits before reaching the cheese, from the same transition matrix): the states a trajectory cache
  holds, which is where a probe is trained and scored.

For each: R^2, Pearson, Spearman and the mean within-maze Spearman (does the critic rank the squares
of one maze right), each with a 95% bootstrap interval over mazes; also the best affine recalibration's
R^2 (Pearson squared), which separates a miscalibrated critic from one that orders states wrongly; and what
one-step lookahead on the critic would meet: the share of squares that are local maxima of the critic
(greedy planning stops there) against those of the exact value (none, in a perfect maze).

Run::

    python benchmarks/critic_exact.py --agent_ckpt runs/loop_maze/agent/version_0/checkpoints/last.ckpt

It prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from _report import machine, report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from innercritic.agents.checkpoint import load_agent  # noqa: E402
from innercritic.envs.factory import make_env  # noqa: E402
from innercritic.envs.maze_values import transition_table  # noqa: E402
from innercritic.probing.maze_exact import maze_square_values, square_figures  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent_ckpt", required=True)
    parser.add_argument("--mazes", type=int, default=200, help="held-out levels of the training distribution")
    parser.add_argument("--seed", type=int, default=20261203, help="seed of the levels' env streams")
    parser.add_argument("--cheese", default=None, help="override the training distribution's cheese mode, e.g. anywhere")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the mazes")
    args = parser.parse_args()
    torch.set_num_threads(1)

    agent, env_info = load_agent(args.agent_ckpt)
    kwargs = dict(env_info["kwargs"])
    if args.cheese is not None:
        kwargs["cheese"] = args.cheese
    env = make_env(env_info["spec"], num_envs=args.mazes, seed=args.seed, **kwargs)
    first_obs, _ = env.reset(seed=args.seed)
    mazes = maze_square_values(agent, np.asarray(first_obs), float(env_info["gamma"]))
    figures: dict = {"mazes": args.mazes, "squares": int(sum(len(m["exact"]) for m in mazes)),
                     "cheese": kwargs.get("cheese"), "gamma": float(env_info["gamma"])}
    for weighting in ("uniform", "occupancy"):
        for name, (mid, lo, hi) in square_figures(mazes, weighting, boot=args.boot, seed=0).items():
            figures[f"{weighting}/{name}"] = mid
            figures[f"{weighting}/{name}_ci"] = f"[{lo:.3f}, {hi:.3f}]"
    figures.update(local_maxima(np.asarray(first_obs), mazes))
    figures["machine"] = machine()
    report(figures)


def local_maxima(first_obs: np.ndarray, mazes: list) -> dict:
    """What one-step lookahead would see: the share of free squares (cheese excluded) none of whose neighbours
    the critic (or the exact value) rates higher, where a greedy planner stops or oscillates, and how often
    the critic's best neighbour is the exact value's."""
    stuck = {"critic": 0, "exact": 0}
    agree = total = 0
    for obs, m in zip(first_obs, mazes):
        walls = obs[0] > 0
        table = transition_table(walls)
        index = {tuple(sq): k for k, sq in enumerate(np.argwhere(~walls).tolist())}
        cheese = index[tuple(np.argwhere(obs[2])[0])]
        values = {name: np.full(len(table), np.inf) for name in stuck}  # entering the cheese beats everything
        for name in stuck:
            values[name][[index[tuple(sq)] for sq in m["squares"].tolist()]] = m[name]
        for k in range(len(table)):
            if k == cheese:
                continue
            moves = [j for j in table[k] if j != k]
            for name in stuck:
                stuck[name] += all(values[name][j] <= values[name][k] for j in moves)
            agree += max(moves, key=lambda j: values["critic"][j]) == max(moves, key=lambda j: values["exact"][j])
            total += 1
    return {"local_maxima/critic": stuck["critic"] / total, "local_maxima/exact": stuck["exact"] / total,
            "greedy_neighbour_agreement": agree / total}


if __name__ == "__main__":
    main()
