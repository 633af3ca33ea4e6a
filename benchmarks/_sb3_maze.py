"""Stable-Baselines3 glue for ``benchmarks/ppo_vs_sb3.py``: the cheese maze as an SB3 ``VecEnv``, the
InnerCritic tower as an SB3 features extractor (and a policy whose critic tower can have its own
widths), and a callback that clocks the success threshold.

Needs ``stable-baselines3`` (the ``bench`` extra: ``pip install -e .[bench]``); nothing in the package
imports this module.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv

from innercritic.agents.networks import ActorCritic
from innercritic.envs.maze import CheeseMaze


class CheeseMazeVecEnv(VecEnv):
    """One vectorised :class:`CheeseMaze` behind SB3's ``VecEnv`` API (no per-env Python envs).

    ``step_wait`` returns ``(obs, rewards, dones, infos)`` with ``dones = terminated | truncated`` and
    one info dict per env, as SB3 requires: done envs carry ``terminal_observation`` (the maze's
    ``final_obs`` row; the returned obs is already the next episode's, SAME_STEP autoreset as SB3
    expects) and ``TimeLimit.truncated`` (so SB3 bootstraps the time-limit step from V(final obs), as
    our rollout does). Building those dicts every step is part of what SB3 costs.

    ``reset`` seeds the maze with SB3's ``seed(s)`` value for env 0 (SB3 hands env i the seed s + i),
    which the maze expands to env i <- (s, i), exactly how ``RolloutDataModule`` seeds its envs, so both
    trainers draw the same level sequence per env.
    """

    def __init__(self, num_envs: int, **maze_kwargs: Any) -> None:
        self.maze = CheeseMaze(num_envs, **maze_kwargs)
        self._actions: np.ndarray | None = None
        super().__init__(num_envs, self.maze.single_observation_space, self.maze.single_action_space)

    def reset(self) -> np.ndarray:
        seed = self._seeds[0]
        obs, _ = self.maze.reset(seed=seed)  # None keeps the streams going
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, rewards, terminated, truncated, info = self.maze.step(self._actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            final = info["final_obs"]
            for i in np.flatnonzero(dones).tolist():
                infos[i]["terminal_observation"] = final[i]
                infos[i]["TimeLimit.truncated"] = bool(truncated[i])  # the maze never sets both
        return obs, rewards, dones, infos

    def close(self) -> None:
        self.maze.close()

    def _indices(self, indices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        value = getattr(self.maze, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.maze, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        raise NotImplementedError("CheeseMazeVecEnv is one batched env; call methods on .maze")

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]


class InnerCriticTower(BaseFeaturesExtractor):
    """The ``encoder`` of a fresh :class:`ActorCritic`: obs -> (B, hidden) ReLU'd features.

    SB3 builds one for the actor and one for the critic (``share_features_extractor=False``), which
    mirrors our ``separate_critic=True`` (``encoder`` and ``critic_encoder``). SB3 re-initialises it
    orthogonally with gain sqrt(2) and zero biases (``ortho_init``), the same init ours uses.
    """

    def __init__(self, observation_space: spaces.Box, arch: str = "small", channels: Sequence[int] | None = None,
                 hidden: int | None = None, obs_scale: float = 1.0, agent_channel: int | None = None,
                 egocentric: bool = False) -> None:
        net = ActorCritic(tuple(observation_space.shape), 1, arch=arch, separate_critic=False, obs_scale=obs_scale,
                          channels=channels, hidden=hidden, agent_channel=agent_channel, egocentric=egocentric)
        super().__init__(observation_space, net.hidden)
        self.encoder = net.encoder
        self.obs_scale = obs_scale

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # SB3 already made the uint8 obs float (0/1 maze obs are not an "image space", so no /255).
        return self.encoder(obs if self.obs_scale == 1.0 else obs * self.obs_scale)


class InnerCriticPolicy(ActorCriticPolicy):
    """SB3's actor-critic policy with a critic tower of its own widths, as ours has with
    ``critic_channels`` / ``critic_hidden``.

    With ``share_features_extractor=False`` SB3 makes two features extractors from the same kwargs, the
    actor's first and the critic's second; here the second gets ``critic_kwargs`` on top, and the value
    head reads the critic's feature width (``net_arch=dict(pi=[], vf=[])`` makes the MLP extractor an
    identity, so its critic latent is the critic tower's features).
    """

    def __init__(self, *args: Any, critic_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._critic_kwargs = dict(critic_kwargs or {})
        self._extractors_made = 0
        super().__init__(*args, **kwargs)

    def make_features_extractor(self) -> BaseFeaturesExtractor:
        self._extractors_made += 1
        critic = self._extractors_made == 2 and not self.share_features_extractor
        kwargs = {**self.features_extractor_kwargs, **(self._critic_kwargs if critic else {})}
        return self.features_extractor_class(self.observation_space, **kwargs)

    def _build_mlp_extractor(self) -> None:
        super()._build_mlp_extractor()
        self.mlp_extractor.latent_dim_vf = self.vf_features_extractor.features_dim


class LinearFromStart:
    """SB3 learning-rate schedule equal to our annealing: lr * (1 - steps_before_this_update / total).

    SB3 evaluates the schedule after the rollout is counted (progress = 1 - steps_incl_rollout / total);
    ours before it, so SB3's progress is shifted back by one rollout here.
    """

    def __init__(self, lr: float, rollout: int, total: int) -> None:
        self.lr, self.shift = lr, rollout / total

    def __call__(self, progress_remaining: float) -> float:
        return self.lr * min(1.0, progress_remaining + self.shift)


class SuccessClock(BaseCallback):
    """Training wall clock and the first time a rollout's finished episodes reach a success rate.

    Success = the episode ended by reaching the cheese (terminated with reward 1), as our
    ``train/success``; counted from each step's ``dones`` and ``rewards`` (before SB3 adds the
    truncation bootstrap). The first ``warmup_rollouts`` rollouts are not scored (see
    ``ppo_vs_sb3.py``: before the step limit only successes can finish). The clock starts at
    ``on_training_start`` (after SB3's env reset) and a hit is timed when the update that follows the
    rollout has finished (next ``on_rollout_start`` or the end), as ours is timed at the end of the
    training step that holds rollout and update. ``wait``, if given, is called before every rollout
    (to take turns with another trainer); the time spent in it is left off every figure.
    """

    def __init__(self, threshold: float, warmup_rollouts: int = 0, wait: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.threshold = threshold
        self.warmup_rollouts = warmup_rollouts
        self.wait = wait
        self.t0 = self.t_end = self.rollout_s = self.blocked = 0.0
        self._rollout_t0 = 0.0
        self.n_done = self.n_success = 0
        self.rollouts = 0
        self.last_success: float | None = None
        self.best_success: float | None = None
        self.hit_s: float | None = None
        self.hit_steps: int | None = None
        self._pending_steps: int | None = None

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.blocked

    def _on_training_start(self) -> None:
        self.t0 = time.perf_counter()

    def _settle(self) -> None:
        if self._pending_steps is not None:
            self.hit_s, self.hit_steps = self._elapsed(), self._pending_steps
            self._pending_steps = None

    def _on_rollout_start(self) -> None:
        self._settle()
        if self.wait is not None:
            start = time.perf_counter()
            self.wait()
            self.blocked += time.perf_counter() - start
        self._rollout_t0 = time.perf_counter()

    def _on_step(self) -> bool:
        dones = self.locals["dones"]
        if dones.any():
            self.n_done += int(dones.sum())
            self.n_success += int((dones & (self.locals["rewards"] > 0)).sum())
        return True

    def _on_rollout_end(self) -> None:
        self.rollout_s += time.perf_counter() - self._rollout_t0
        self.rollouts += 1
        if self.n_done and self.rollouts > self.warmup_rollouts:
            rate = self.n_success / self.n_done
            self.last_success = rate
            self.best_success = rate if self.best_success is None else max(self.best_success, rate)
            if rate >= self.threshold and self.hit_s is None and self._pending_steps is None:
                self._pending_steps = int(self.model.num_timesteps)
        self.n_done = self.n_success = 0

    def _on_training_end(self) -> None:
        self._settle()
        self.t_end = self._elapsed()
