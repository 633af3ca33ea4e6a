"""Helpers shared by several test files (imported as ``from helpers import ...``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_agent_checkpoint(path: Path, env_kwargs: dict | None = None, channels: tuple[int, ...] = (4, 8), hidden: int = 16,
                           gamma: float = 0.95, seed: int = 0) -> str:
    """A real (untrained) maze agent checkpoint: ``PPO.on_save_checkpoint`` writes its ``innercritic``
    metadata into the dict Lightning would save (the PPO module's state_dict), without running a Trainer."""
    from datamodules.rollout import RolloutDataModule
    from innercritic.agents import ActorCritic
    from lightning_modules.ppo import PPO

    torch.manual_seed(seed)
    module = PPO(arch="small", separate_critic=True, channels=channels, hidden=hidden, gamma=gamma)
    rollout = RolloutDataModule(env="maze", env_kwargs=env_kwargs or {"size": 5, "max_steps": 12}, num_envs=2, num_steps=4)
    module.env_info = rollout.env_info
    module.agent = ActorCritic(obs_shape=rollout.obs_shape, num_actions=rollout.num_actions, arch="small", separate_critic=True,
                               obs_scale=1.0 / rollout.obs_high, channels=channels, hidden=hidden)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return str(path)
