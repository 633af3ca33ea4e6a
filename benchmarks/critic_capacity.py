"""Which critic tower can represent a maze policy's value at all: regression on exact values, no RL.

Why it exists: issue 19 asks for a critic that is a real ceiling (R^2 >= 0.7 against the exact value
of the policy on the training distribution), and the default agent's critic scores about 0 over
all squares (``benchmarks/critic_exact.py``). Before changing PPO, this separates capacity from
learning: each candidate critic tower (the same ``ActorCritic`` critic tower PPO would train,
egocentric features and all) is fitted by plain supervised regression to the exact value of one
fixed policy (the given agent's) at every free square of ``--train_mazes`` training-distribution
mazes, then scored on ``--test_mazes`` fresh ones, uniformly over squares and weighted by the
policy's visits (see ``critic_exact.py``). A tower that cannot reach 0.7 here cannot as PPO's critic.

A maze value is a path length (gamma ** steps to the cheese under the policy): a computation over the
whole maze, so the conv stack's receptive field (2 * layers + 1 squares for 3x3 convs) matters.

Run::

    python benchmarks/critic_capacity.py --agent_ckpt A.ckpt --towers "8,8,4:32" "24,24,8:64" "16x8:64"

A tower is ``C1,C2,...:HIDDEN`` or ``CxL:HIDDEN`` (L layers of C channels). It prints a table, then one
JSON object on its last line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _report import machine, report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from innercritic.agents.checkpoint import load_agent  # noqa: E402
from innercritic.agents.networks import ActorCritic  # noqa: E402
from innercritic.envs.factory import make_env  # noqa: E402
from innercritic.probing.maze_exact import maze_square_values, square_figures  # noqa: E402


def parse_tower(text: str) -> tuple[list[int], int]:
    convs, hidden = text.split(":")
    if "x" in convs:
        c, n = convs.split("x")
        return [int(c)] * int(n), int(hidden)
    return [int(c) for c in convs.split(",")], int(hidden)


def dataset(agent: ActorCritic, kwargs: dict, mazes: int, seed: int, gamma: float):
    env = make_env("maze", num_envs=mazes, seed=seed, **kwargs)
    first, _ = env.reset(seed=seed)
    values = maze_square_values(agent, np.asarray(first), gamma)
    frames = torch.from_numpy(np.concatenate([m["frames"] for m in values]))
    return frames, torch.from_numpy(np.concatenate([m["exact"] for m in values])).float(), values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent_ckpt", required=True)
    parser.add_argument("--towers", nargs="+", default=["8,8,4:32", "24,24,8:64", "16x6:64", "16x10:64"])
    parser.add_argument("--train_mazes", type=int, default=3000)
    parser.add_argument("--test_mazes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    agent, env_info = load_agent(args.agent_ckpt)
    kwargs, gamma = dict(env_info["kwargs"]), float(env_info["gamma"])
    x_tr, y_tr, _ = dataset(agent, kwargs, args.train_mazes, 1, gamma)
    _, _, test = dataset(agent, kwargs, args.test_mazes, 2, gamma)
    figures: dict = {"train_squares": len(y_tr), "test_mazes": args.test_mazes, "steps": args.steps}
    cfg = agent.config
    for text in args.towers:
        channels, hidden = parse_tower(text)
        torch.manual_seed(0)
        net = ActorCritic(**{**cfg, "separate_critic": True, "critic_channels": channels, "critic_hidden": hidden})
        params = list(net.critic_encoder.parameters()) + list(net.value_head.parameters())
        opt = torch.optim.Adam(params, lr=args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(len(y_tr), (args.batch,), generator=gen)
            loss = torch.nn.functional.mse_loss(net.value(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        wall = time.perf_counter() - start
        net.eval()
        with torch.no_grad():  # the fitted tower in the critic's place, on the same squares
            scored = [{**m, "critic": net.value(torch.from_numpy(m["frames"])).double().numpy()} for m in test]
        for weighting in ("uniform", "occupancy"):
            mid, lo, hi = square_figures(scored, weighting, boot=200)["r2"]
            figures[f"{text}/{weighting}/r2"] = mid
            figures[f"{text}/{weighting}/r2_ci"] = f"[{lo:.3f}, {hi:.3f}]"
        figures[f"{text}/params"] = sum(p.numel() for p in params)
        figures[f"{text}/train_s"] = wall
        print(text, {k: v for k, v in figures.items() if k.startswith(text)}, flush=True)
    figures["machine"] = machine()
    report(figures)


if __name__ == "__main__":
    main()
