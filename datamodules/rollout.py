"""Rollout experience for on-policy training: the vector envs, their rollouts, and evaluation episodes.

PPO's data is made by the policy being trained, so this datamodule differs from a dataset's in one
way that matters: a batch must never be produced before the previous update has finished (Lightning
fetches one batch ahead, and a worker process would roll out with a stale policy). The dataloader
therefore yields only iteration tokens, the same number on every rank so DDP never hangs, and the
module asks this datamodule for a fresh rollout inside ``training_step`` with ``collect(agent)``.

Each DDP rank owns ``num_envs`` envs seeded ``seed + rank * num_envs + i``, so ranks see different
levels; the module all-reduces gradients and only rank 0 writes files.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from innercritic.agents.noisy import PolicyVersion
from innercritic.envs.episodes import run_episodes
from innercritic.envs.factory import env_family, make_env
from innercritic.errors import InnerCriticError

# Evaluation levels come from a seed range training never draws from (training seeds are small).
EVAL_SEED_OFFSET = 1_000_000_007
# Warmup envs draw their levels from their own range, so the main phase does not replay the warmup's level seeds.
WARMUP_SEED_OFFSET = 500_000_003
POLICY = PolicyVersion("policy")  # evaluation samples the policy itself (no noise)
# Observations per forward pass when the critic values a whole rollout: large enough to run near the
# CPU's best rate, small enough that an Atari rollout's float copy stays in the tens of megabytes.
VALUE_BATCH = 1024


class _Tokens(IterableDataset):
    """``length`` iteration indices; a token, not data, so prefetching it is harmless."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __iter__(self):
        return iter(range(self.length))

    def __len__(self) -> int:
        return self.length


@dataclass
class Rollout:
    """One rollout of ``num_steps`` x ``num_envs`` transitions, time-major, on the module's device."""

    obs: torch.Tensor  # (T, N, C, H, W) uint8
    actions: torch.Tensor  # (T, N) int64
    logprobs: torch.Tensor  # (T, N)
    values: torch.Tensor  # (T, N) critic value at obs
    rewards: torch.Tensor  # (T, N); truncated steps already carry + gamma * V(final obs)
    dones: torch.Tensor  # (T, N) 1.0 where the episode ended at this step (terminal or truncated)
    next_value: torch.Tensor  # (N,) critic value of the obs after the last step
    episodes: dict[str, np.ndarray] = field(default_factory=dict)  # per finished episode: return, length, success


class EpisodeTracker:
    """Accumulates per-env return and length and reports each episode as it finishes."""

    def __init__(self, num_envs: int) -> None:
        self.ret = np.zeros(num_envs, np.float64)
        self.len = np.zeros(num_envs, np.int64)
        self.top_right = np.zeros(num_envs, bool)
        self.finished: dict[str, list[np.ndarray]] = {"return": [], "length": [], "success": [], "top_right": []}

    def update(self, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, info: dict) -> None:
        self.ret += reward
        self.len += 1
        if "at_top_right" in info:
            self.top_right |= info["at_top_right"]
        done = terminated | truncated
        if done.any():
            self.finished["return"].append(self.ret[done].copy())
            self.finished["length"].append(self.len[done].copy())
            self.finished["success"].append((terminated & (reward > 0))[done])
            self.finished["top_right"].append(self.top_right[done].copy())
            self.ret[done] = 0.0
            self.len[done] = 0
            self.top_right[done] = False

    def pop(self) -> dict[str, np.ndarray]:
        out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.finished.items()}
        for v in self.finished.values():
            v.clear()
        return out


class RolloutDataModule(L.LightningDataModule):
    """Vector envs for PPO: rollouts on demand and evaluation on named env distributions.

    Args:
        env: env spec for ``innercritic.envs.make_env`` (``maze``, a MiniGrid id, ``ALE/<Game>-v5``).
        env_kwargs: keyword arguments for the env (maze: size, cheese, obs_size, max_steps, num_levels).
        num_envs: envs per rank stepped together.
        num_steps: steps per env in one rollout (a rollout holds num_envs * num_steps transitions).
        rollouts_per_epoch: rollouts per Lightning epoch; checkpoints and validation fall on epoch ends.
        seed: base seed; env i of rank r is seeded seed + r * num_envs + i.
        eval_episodes: episodes per evaluation distribution (per rank) in each validation.
        final_eval_episodes: episodes per distribution (per rank) of the evaluation after training, whose
            figures go into ``summary.json`` (None: ``eval_episodes``); more than the periodic checks need,
            since a success rate near 0.95 has a standard error of 0.015 over 200 episodes.
        eval_dists: evaluation distributions, name -> env_kwargs overrides (maze default: the training
            distribution and cheese ``anywhere``, where goal misgeneralisation shows).
        eval_num_envs: envs stepped together during evaluation.
        warmup_env_kwargs: overrides of ``env_kwargs`` for the training envs of the first ``warmup_env_steps``
            env steps, a curriculum's easier start (maze: ``{size: [5, 9]}`` mixes in small mazes, whose
            short episodes teach navigation quickly); evaluation and checkpoints always use ``env_kwargs``.
        warmup_env_steps: env steps (all ranks together, as ``PPO.total_env_steps``) trained on the warmup envs.
    """

    def __init__(
        self,
        env: str = "maze",
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 64,
        num_steps: int = 128,
        rollouts_per_epoch: int = 10,
        seed: int = 1,
        eval_episodes: int = 200,
        final_eval_episodes: int | None = None,
        eval_dists: dict[str, dict[str, Any]] | None = None,
        eval_num_envs: int = 100,
        warmup_env_kwargs: dict[str, Any] | None = None,
        warmup_env_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        env_family(env)  # fail on an unknown spec now, before anything is built
        counts = {"num_envs": num_envs, "num_steps": num_steps, "rollouts_per_epoch": rollouts_per_epoch,
                  "eval_episodes": eval_episodes, "eval_num_envs": eval_num_envs}
        if final_eval_episodes is not None:
            counts["final_eval_episodes"] = final_eval_episodes
        for name, value in counts.items():
            if value < 1:
                raise InnerCriticError(f"data.{name} must be >= 1, got {value}")
        if (warmup_env_kwargs is None) != (warmup_env_steps == 0) or warmup_env_steps < 0:
            raise InnerCriticError(f"data.warmup_env_kwargs and data.warmup_env_steps go together (overrides and a positive step "
                             f"count, or neither), got {warmup_env_kwargs} and {warmup_env_steps}")
        self.env_spec = env
        self.env_kwargs = dict(env_kwargs or {})
        self.num_envs = num_envs
        self.num_steps = num_steps
        self.rollouts_per_epoch = rollouts_per_epoch
        self.seed = seed
        self.eval_episodes = eval_episodes
        self.final_eval_episodes = eval_episodes if final_eval_episodes is None else final_eval_episodes
        if eval_dists is None:
            eval_dists = {"train_dist": {}, "heldout": {"cheese": "anywhere"}} if env == "maze" else {"train_dist": {}}
        self.eval_dists = eval_dists
        self.eval_num_envs = eval_num_envs
        self.warmup_env_kwargs = dict(warmup_env_kwargs or {})
        self.warmup_env_steps = warmup_env_steps
        self.obs_shape, self.num_actions, self.obs_high = self._spaces(self.env_kwargs)
        if warmup_env_steps:
            shape, actions, _ = self._spaces(self._phase_kwargs("warmup"))
            if (shape, actions) != (self.obs_shape, self.num_actions):
                raise InnerCriticError(f"data.warmup_env_kwargs {self.warmup_env_kwargs} gives observations {shape} and {actions} actions, "
                                 f"data.env_kwargs {self.obs_shape} and {self.num_actions}; one agent must fit both (maze: the same obs_size)")
        self.envs = None
        self._phase: str | None = None  # "warmup" or "main": which training envs ``envs`` holds
        self._obs: np.ndarray | None = None

    @property
    def env_info(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this env without the training config."""
        return {"spec": self.env_spec, "kwargs": self.env_kwargs, "obs_shape": list(self.obs_shape), "num_actions": self.num_actions, "obs_high": self.obs_high}

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _spaces(self, env_kwargs: dict[str, Any]) -> tuple[tuple[int, ...], int, float]:
        """(obs shape, action count, obs high) from a one-env probe: cheap, and it validates ``env_kwargs`` now."""
        probe = make_env(self.env_spec, 1, seed=self.seed, **env_kwargs)
        space = probe.single_observation_space
        spaces = tuple(int(d) for d in space.shape), int(probe.single_action_space.n), float(space.high.max())
        probe.close()
        return spaces

    def _phase_kwargs(self, phase: str) -> dict[str, Any]:
        return {**self.env_kwargs, **self.warmup_env_kwargs} if phase == "warmup" else self.env_kwargs

    def _build_envs(self, phase: str) -> None:
        """(Re)build this rank's training envs for ``phase``; episodes in progress in the old ones are dropped."""
        if self.envs is not None:
            self.envs.close()
        rank_seed = self.seed + self.rank * self.num_envs + (WARMUP_SEED_OFFSET if phase == "warmup" else 0)
        self.envs = make_env(self.env_spec, self.num_envs, seed=rank_seed, **self._phase_kwargs(phase))
        self._obs, _ = self.envs.reset(seed=rank_seed)
        self.tracker = EpisodeTracker(self.num_envs)
        self._phase = phase

    def _phase_at(self, env_steps: int) -> str:
        return "warmup" if env_steps < self.warmup_env_steps else "main"

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.envs is None:
            self._build_envs(self._phase_at(0))

    def teardown(self, stage: str) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None
            self._phase = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Tokens(self.rollouts_per_epoch), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Tokens(1), batch_size=None)

    def fingerprint(self) -> int:
        """A checksum of this rank's current observations: differs between ranks that see different envs."""
        return zlib.crc32(np.ascontiguousarray(self._obs).tobytes())

    @torch.inference_mode()
    def collect(self, agent: torch.nn.Module, gamma: float, env_steps: int = 0) -> Rollout:
        """Step every env ``num_steps`` times with ``agent`` and return the rollout. ``env_steps`` (the
        training steps so far, all ranks) picks the warmup or the main envs; crossing ``warmup_env_steps``
        rebuilds them, so a run resumed past the warmup steps the main envs.

        Truncated steps bootstrap: their reward gains ``gamma * V(final obs)``, so GAE can cut the
        episode there like a terminal without teaching the critic that time limits end the world.

        With a separate critic tower, the steps run the policy tower only and the critic values every
        observation of the rollout afterwards, in batches of ``VALUE_BATCH``: the parameters do not change
        within a rollout, so these are the values a per-step forward would give (up to float rounding),
        and on CPU a few large batches cost far less than ``num_steps`` batches of ``num_envs``
        (BENCHMARKS.md, "PPO against Stable-Baselines3"). With a shared tower the features are computed
        for the logits anyway, so the value comes with them.
        """
        phase = self._phase_at(env_steps)
        if phase != self._phase:
            self._build_envs(phase)
        device = next(agent.parameters()).device
        T, N = self.num_steps, self.num_envs
        separate = getattr(agent, "critic_encoder", None) is not None
        obs_buf = torch.empty((T, N, *self.obs_shape), dtype=torch.uint8, device=device)
        actions = torch.empty((T, N), dtype=torch.int64, device=device)
        logprobs = torch.empty((T, N), device=device)
        values = torch.empty((T, N), device=device)
        # Rewards and dones come from the envs as numpy: kept on the host and moved once per rollout,
        # not twice per step (on a GPU each small copy is a synchronising transfer).
        rewards_np = np.empty((T, N), dtype=np.float32)
        dones_np = np.empty((T, N), dtype=np.float32)
        truncations: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, envs, their final obs)
        obs = torch.from_numpy(self._obs).to(device)
        for t in range(T):
            obs_buf[t] = obs
            if separate:
                logits = agent.policy_logits(obs)
            else:
                logits, values[t] = agent(obs)
            # Categorical's sampling and log-probability, without building a distribution object per step.
            logp = logits.log_softmax(-1)
            action = torch.multinomial(logp.exp(), 1, True).squeeze(1)
            actions[t], logprobs[t] = action, logp.gather(1, action[:, None]).squeeze(1)
            next_obs, reward, terminated, truncated, info = self.envs.step(action.cpu().numpy())
            self.tracker.update(reward, terminated, truncated, info)
            rewards_np[t] = reward
            if truncated.any():
                truncations.append((t, np.flatnonzero(truncated), info["final_obs"][truncated]))
            dones_np[t] = terminated | truncated
            obs = torch.from_numpy(next_obs).to(device)
        self._obs = next_obs
        rewards, dones = torch.from_numpy(rewards_np).to(device), torch.from_numpy(dones_np).to(device)
        if separate:
            values.copy_(torch.cat([agent.value(chunk) for chunk in obs_buf.flatten(0, 1).split(VALUE_BATCH)]).view(T, N))
        next_value = agent.value(obs)
        if truncations:
            final = torch.from_numpy(np.concatenate([f for _, _, f in truncations])).to(device)
            steps = torch.from_numpy(np.concatenate([np.full(len(e), t) for t, e, _ in truncations])).to(device)
            envs = torch.from_numpy(np.concatenate([e for _, e, _ in truncations])).to(device)
            rewards[steps, envs] += gamma * agent.value(final)
        return Rollout(obs_buf, actions, logprobs, values, rewards, dones, next_value, self.tracker.pop())

    @torch.inference_mode()
    def evaluate(self, agent: torch.nn.Module, episodes: int | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
        """Run ``episodes`` episodes on each evaluation distribution with the sampled policy.

        Played by ``innercritic.envs.episodes.run_episodes``: every env counts exactly its first episode
        of a round, so short (successful) episodes are not over-represented. Levels are seeded from a
        range training never uses, the same every epoch (so curves compare like with like) and offset by
        rank (so ranks evaluate different levels).
        """
        episodes = self.eval_episodes if episodes is None else episodes
        device = next(agent.parameters()).device

        def act(env: Any, obs: np.ndarray, pending: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, dict]:
            # The policy tower only (the critic's value would be thrown away: half the cost), over every env, so
            # each round draws its dice the same way however many envs it counts.
            logits = agent.policy_logits(torch.from_numpy(obs).to(device))
            return POLICY.sample(logits, generator).cpu().numpy(), {}

        results = {}
        for d, (name, overrides) in enumerate(self.eval_dists.items()):
            base = EVAL_SEED_OFFSET + 1_000_003 * d + self.rank * episodes
            ep = run_episodes(self.env_spec, {**self.env_kwargs, **overrides}, episodes, base, self.eval_num_envs, act, device=device,
                              progress=f"evaluation ({name})" if progress and self.rank == 0 else None)
            results[name] = {"return": float(ep["return"].mean()), "length": float(ep["length"].mean()), "success": float(ep["success"].mean())}
            if self.env_spec == "maze":
                results[name]["p_cheese"] = results[name]["success"]
                results[name]["p_top_right"] = float(ep["top_right"].mean())
        return results
