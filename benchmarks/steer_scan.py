"""Wall time of a steering scan: 9 coefficients x 100 held-out maze episodes, played in lockstep and one run each.

The agent is a small CNN 8-16-16, hidden 128, separate critic (the default network when its figures were recorded) on
9x9 mazes with the cheese anywhere; the vector is the cheese vector (Mini et al. 2023), built in each
maze played (``--averaged``: averaged over 100 other mazes) at ``encoder.block1.hook_out``, scanned over [-3, -2, -1, -0.5, 0, 0.5, 1, 2, 3]
(every steered step also runs the unsteered forward pass, for the KL and the value change). With
random weights (the default) the policy is near-uniform and most episodes run to the 324-step limit:
the slowest case; ``--ckpt`` times a trained agent instead.

Both paths run in the same process, so their ratio is the figure to compare across machines:

- ``batched_s``: ``innercritic.steering.run_scans``, every (vector, coefficient) one block of a single
  lockstep run, the trunk batched and cached across blocks (``innercritic.steering.lockstep``);
- ``per_coefficient_s``: the same scan with ``batched=False``, one run per (vector, coefficient) with
  whole-network calls: the path of scans before the lockstep runs.

The two must give the same rows, bit for bit (``rows_identical``; the script exits 1 otherwise).

    python benchmarks/steer_scan.py                  # prints a table, then one JSON line
    python benchmarks/steer_scan.py --control        # with the matched random control (coefficient 0 shared)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from _report import machine, report
from innercritic.agents import ActorCritic, load_agent
from innercritic.steering import LevelVectors, averaged_vector, random_like, run_scans

COEFFICIENTS = [-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0]
HOOK = "encoder.block1.hook_out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100, help="episodes per coefficient")
    parser.add_argument("--ckpt", default=None, help="agent checkpoint (default: the maze config's network, random weights)")
    parser.add_argument("--control", action="store_true", help="also scan the matched-norm random control")
    parser.add_argument("--averaged", action="store_true", help="the cheese vector averaged over 100 mazes instead of one per maze")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a second busy process cannot stall OpenMP workers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ckpt:
        agent, env_info = load_agent(args.ckpt)
        env_kwargs = {**dict(env_info.get("kwargs") or {}), "cheese": "anywhere", "num_levels": 0}
    else:
        torch.manual_seed(0)
        agent = ActorCritic((3, 9, 9), 4, arch="small", separate_critic=True, channels=(8, 16, 16), hidden=128).eval()
        env_kwargs = {"size": 9, "cheese": "anywhere"}

    start = time.perf_counter()
    vector = averaged_vector(agent, HOOK, "cheese", env_kwargs, num_mazes=100, seed=0) if args.averaged else LevelVectors(HOOK, "cheese")
    vectors = [vector] + ([random_like(vector, 0) if args.averaged else vector.control(0)] if args.control else [])
    vector_s = time.perf_counter() - start
    timings, rows = {}, {}
    # The lockstep run first, so that any first-call cost lands on it, not on the baseline.
    for name, batched in (("batched", True), ("per_coefficient", False)):
        start = time.perf_counter()
        rows[name] = run_scans(agent, "maze", env_kwargs, vectors, COEFFICIENTS, episodes=args.episodes, seed=0, batched=batched)
        timings[name] = time.perf_counter() - start
    identical = json.dumps(rows["batched"]) == json.dumps(rows["per_coefficient"])
    # Env steps actually played: coefficient 0 once, every other coefficient once per vector.
    steps = sum(row["length"] * row["episodes"] for v, vrows in enumerate(rows["batched"]) for row in vrows if v == 0 or row["coefficient"] != 0)
    figures = {
        "coefficients": len(COEFFICIENTS),
        "episodes_per_coefficient": args.episodes,
        "runs": len(vectors) * (len(COEFFICIENTS) - 1) + 1,
        "vector_s": vector_s,
        "batched_s": timings["batched"],
        "per_coefficient_s": timings["per_coefficient"],
        "speedup": timings["per_coefficient"] / timings["batched"],
        "rows_identical": identical,
        "env_steps": int(round(steps)),
        "batched_steps_per_s": steps / timings["batched"],
        "mean_episode_length": steps / ((len(vectors) * (len(COEFFICIENTS) - 1) + 1) * args.episodes),
        "under_2_min": vector_s + timings["batched"] < 120.0,
    }
    figures["vector"] = "cheese_averaged" if args.averaged else "cheese (per maze)"
    figures["agent"] = args.ckpt or "random small CNN 8-16-16/128, separate critic"
    figures["torch_threads"] = torch.get_num_threads()
    figures["machine"] = machine()
    report(figures, digits=3)
    if not identical:
        sys.exit("the lockstep scan's rows differ from the per-coefficient scan's")


if __name__ == "__main__":
    main()
