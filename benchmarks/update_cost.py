"""What one PPO minibatch update of the default maze network costs, against what this CPU can do.

Why it exists: ``ppo_vs_sb3.py`` finds both trainers spending most of their time in the network
update, which is the same network and the same arithmetic in both. If the update costs the same,
our advantage is bounded by Amdahl's law: even a free rollout gives at most ``1 / update_share_of_sb3``:
1.32 at the 75.6% measured with 4 epochs per rollout, short of issue 3's 1.5; 1.62 at the 62% measured
with the 2 epochs of the current default (BENCHMARKS.md).
This script measures whether the update itself has room left: the milliseconds of one minibatch
(forward of both towers, the PPO loss, backward, gradient-norm clipping, fused Adam), the
floating-point work it does (counted by ``torch.utils.flop_counter``), the rate that gives, and the
same for a large float32 matmul on the same threads (a practical peak). Two rewrites of the same
layers are timed beside it: both towers fused into one conv stack (grouped convolutions and a
batched linear layer, the same parameter count) and channels-last memory.

Run (an otherwise idle machine; settings read from configs/ppo/maze.yaml):

    python benchmarks/update_cost.py

It prints a table, then one JSON object on its last line (``update_ms``, ``gflops``,
``matmul_gflops``, ``fraction_of_matmul``, ``fused_ms``, ``channels_last_ms`` per thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from _report import machine
from ppo_vs_sb3 import load_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def settings(config: Path) -> tuple[dict, int]:
    """The network arguments and the minibatch size of a training config, PPO's defaults filling the rest."""
    loaded = load_settings(config)
    model, data = loaded["model"], loaded["data"]
    net = {k: model[k] for k in ("arch", "separate_critic", "channels", "hidden", "agent_channel", "egocentric",
                                 "critic_channels", "critic_hidden")}
    return net, data["num_envs"] * data["num_steps"] // model["num_minibatches"]


def ppo_step(net, opt, obs, actions, old_logprobs, adv, ret):
    """One minibatch of lightning_modules.ppo.PPO.training_step: its loss, backward, clipping, Adam."""
    import torch

    from lightning_modules.ppo import ppo_loss

    loss, _ = ppo_loss(net, obs, actions, old_logprobs, ret, adv, ret, clip_coef=0.2, clip_vloss=True,
                       norm_adv=True, ent_coef=0.01, vf_coef=0.5)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
    opt.step()


def fused_towers(reference):
    """The two towers of ``reference`` as one stack: conv0 with both towers' filters, later convs grouped
    (groups=2), the two linear layers as one batched matmul. The same layer shapes and parameter count
    (fresh weights: only the time is compared), half the kernel launches."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from innercritic.agents.networks import _recentre

    a, c = reference.encoder, reference.critic_encoder
    convs = [getattr(a, f"block{i}").conv for i in range(len(reference.channels))]  # the critic's have the same shapes

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(conv.in_channels * (1 if i == 0 else 2), 2 * conv.out_channels, 3, padding=1, groups=1 if i == 0 else 2)
                for i, conv in enumerate(convs))
            fa, fc = a.fc, c.fc
            self.fc_w = nn.Parameter(torch.stack((fa.weight.T, fc.weight.T)).detach().clone())
            self.fc_b = nn.Parameter(torch.stack((fa.bias, fc.bias))[:, None].detach().clone())
            self.policy_head, self.value_head = reference.policy_head, reference.value_head
            self.agent_channel, self.c, self.egocentric = reference.agent_channel, reference.channels[-1], reference.egocentric

        def forward(self, obs):
            x = obs.float()
            h = x
            for conv in self.convs:
                h = F.relu(conv(h))
            b = h.shape[0]
            flat = (_recentre(h, x[:, self.agent_channel]) if self.egocentric else h).reshape(b, 2, -1)
            if self.agent_channel is not None:
                at = torch.einsum("bchw,bhw->bc", h, x[:, self.agent_channel]).reshape(b, 2, self.c)
                flat = torch.cat((flat, at), 2)
            z = F.relu(torch.baddbmm(self.fc_b, flat.transpose(0, 1), self.fc_w))
            return self.policy_head(z[0]), self.value_head(z[1]).squeeze(-1)

    return Fused()


def time_update(net, batch, repeats: int, channels_last: bool = False) -> float:
    import torch

    obs, *rest = batch
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        obs = obs.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, eps=1e-5, fused=True)
    for _ in range(3):
        ppo_step(net, opt, obs, *rest)
    start = time.perf_counter()
    for _ in range(repeats):
        ppo_step(net, opt, obs, *rest)
    return (time.perf_counter() - start) / repeats * 1e3


def matmul_gflops(repeats: int = 10, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from innercritic.agents.networks import ActorCritic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ppo" / "maze.yaml")
    parser.add_argument("--repeats", type=int, default=20, help="timed minibatch updates per figure")
    args = parser.parse_args()

    net_args, minibatch = settings(args.config)
    torch.manual_seed(0)
    obs_shape, actions = (3, 9, 9), 4
    make = lambda: ActorCritic(obs_shape, actions, **net_args)  # noqa: E731
    obs = (torch.rand(minibatch, *obs_shape) < 0.3).to(torch.uint8)
    obs[:, 1] = 0
    obs[torch.arange(minibatch), 1, torch.randint(0, 9, (minibatch,)), torch.randint(0, 9, (minibatch,))] = 1
    # the stored log-probabilities of a uniform policy: only the time is measured, not what is learnt
    old_logprobs = torch.full((minibatch,), -math.log(actions))
    batch = (obs, torch.randint(0, actions, (minibatch,)), old_logprobs, torch.randn(minibatch), torch.rand(minibatch))

    net = make()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, eps=1e-5, fused=True)
    with FlopCounterMode(display=False) as counter:
        ppo_step(net, opt, *batch)
    flops = counter.get_total_flops()

    out: dict = {"minibatch": minibatch, "params": sum(p.numel() for p in net.parameters()),
                 "gflop_per_update": round(flops / 1e9, 3), "network": net_args}
    # the fused rewrite stacks two towers of the same widths into grouped layers
    fusable = net.separate_critic and net.critic_channels == net.channels and net.critic_hidden == net.hidden
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = time_update(make(), batch, args.repeats)
        peak = matmul_gflops()
        fused = time_update(fused_towers(make()), batch, args.repeats) if fusable else None
        cl = time_update(make(), batch, args.repeats, channels_last=True)
        rate = flops / ms / 1e6
        out[f"t{threads}"] = {"update_ms": round(ms, 1), "gflops": round(rate, 1), "matmul_gflops": round(peak, 1),
                              "fraction_of_matmul": round(rate / peak, 3),
                              "fused_ms": None if fused is None else round(fused, 1), "channels_last_ms": round(cl, 1)}
        rows.append((threads, ms, rate, peak, fused, cl))

    print(f"default maze network {net_args}, minibatch {minibatch}, {out['params']:,} parameters, "
          f"{out['gflop_per_update']} GFLOP per minibatch update (forward + backward)")
    print(f"{'threads':>7} {'update ms':>10} {'GFLOP/s':>8} {'matmul GFLOP/s':>15} {'fraction':>9} {'fused ms':>9} {'ch-last ms':>11}")
    for threads, ms, rate, peak, fused, cl in rows:
        print(f"{threads:>7} {ms:>10.1f} {rate:>8.1f} {peak:>15.1f} {rate / peak:>9.2f} "
              f"{'-' if fused is None else f'{fused:.1f}':>9} {cl:>11.1f}")
    out["machine"] = machine()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
