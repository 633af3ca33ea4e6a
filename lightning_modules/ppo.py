"""PPO actor-critic training as a LightningModule.

Method: Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with the details that
make it work in practice, as catalogued by Huang et al. 2022 ("The 37 Implementation Details of
PPO") and written out in CleanRL's ``ppo.py``: GAE, a clipped surrogate, an optionally clipped value
loss, an entropy bonus, per-minibatch advantage normalisation, several epochs of shuffled minibatches
per rollout, gradient-norm clipping and linear learning-rate annealing.

Run:  python train.py fit -c configs/ppo/maze.yaml

Rollouts come from ``datamodules.rollout.RolloutDataModule.collect`` inside ``training_step`` (the
dataloader only hands out iteration tokens), so every rollout uses the weights of the update before
it. Optimisation is manual because one rollout makes many optimiser steps; under DDP Lightning
prepares the reducer before each ``manual_backward`` so gradients are all-reduced as usual.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from innercritic.agents.checkpoint import AGENT_KIND, check_env_compatible, load_agent
from innercritic.agents.networks import ActorCritic
from innercritic.errors import InnerCriticError


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor,
                gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates (Schulman et al. 2016) for time-major (T, N) tensors.

    ``dones[t]`` marks an episode that ended *after* action t (SAME_STEP autoreset: obs t+1 already
    belongs to the next episode), so step t does not bootstrap from values[t+1] when it is set.
    Returns (advantages, returns = advantages + values).
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        next_v = next_value if t == T - 1 else values[t + 1]
        live = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_v * live - values[t]
        last = delta + gamma * gae_lambda * live * last
        advantages[t] = last
    return advantages, advantages + values


def ppo_loss(agent: torch.nn.Module, obs: torch.Tensor, actions: torch.Tensor, old_logprobs: torch.Tensor,
             old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, *, clip_coef: float,
             clip_vloss: bool, norm_adv: bool, ent_coef: float, vf_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's loss on one minibatch: clipped surrogate - ent_coef * entropy + vf_coef * value loss.

    Returns the loss and its detached parts (``pg_loss``, ``value_loss``, ``entropy``, ``approx_kl``,
    ``clipfrac``). The value loss is CleanRL's 0.5 * max of the clipped and unclipped squared errors.
    """
    logits, value = agent(obs)
    logp_all = F.log_softmax(logits, -1)
    logprob = logp_all.gather(1, actions[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    log_ratio = logprob - old_logprobs
    ratio = log_ratio.exp()
    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8) if norm_adv else advantages
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    if clip_vloss:
        v_clipped = old_values + (value - old_values).clamp(-clip_coef, clip_coef)
        v_loss = 0.5 * torch.max((value - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((value - returns) ** 2).mean()
    with torch.no_grad():
        parts = {"pg_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy.detach(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean(),  # Schulman's low-variance KL estimator
                 "clipfrac": ((ratio - 1).abs() > clip_coef).float().mean()}
    return pg_loss - ent_coef * entropy + vf_coef * v_loss, parts


class PPO(L.LightningModule):
    """PPO on the envs of a ``RolloutDataModule``; the agent is an ``innercritic`` ``ActorCritic``.

    Args:
        arch: network family: ``small`` (small grids), ``impala`` (procgen-style), ``nature`` (Atari).
        separate_critic: give the critic its own tower, so the policy network contains no critic.
        channels: conv channels per layer/stage (None: the architecture's default).
        hidden: width of the last fully connected layer (None: the architecture's default).
        agent_channel: ``small`` only: also feed the features at the square this obs channel marks (maze mouse: 1).
        egocentric: with ``agent_channel``: the dense layer reads the last conv features recentred on that square.
        critic_channels: with ``separate_critic``: the critic tower's conv channels (None: ``channels``).
        critic_hidden: with ``separate_critic``: the critic tower's feature width (None: ``hidden``).
        total_env_steps: env steps (all ranks together) to train for; also the learning-rate schedule's length.
        lr: Adam learning rate at the start.
        anneal_lr: decay the learning rate linearly to 0 over ``total_env_steps``.
        gamma: discount factor.
        gae_lambda: GAE's lambda.
        update_epochs: passes over each rollout.
        num_minibatches: minibatches per pass (must divide num_envs * num_steps).
        norm_adv: normalise advantages within each minibatch.
        clip_coef: the surrogate's clipping range.
        clip_vloss: clip the value update to the same range around the old values.
        ent_coef: entropy bonus weight (at the start, with ``ent_coef_final``).
        ent_coef_final: anneal the entropy weight linearly from ``ent_coef`` to this over ``total_env_steps``
            (None: constant), for a broad early search and a sharper late policy (on the maze it did not
            help: BENCHMARKS.md, "Cheese maze").
        vf_coef: value loss weight.
        max_grad_norm: gradient-norm clipping threshold.
        target_kl: stop a rollout's epochs early once the approximate KL exceeds this (None: never).
        init_from: agent checkpoint whose weights start this run (a new run; ``--ckpt_path`` resumes one).
    """

    CHECKPOINT_KIND = AGENT_KIND  # what --ckpt_path must hold

    def __init__(
        self,
        arch: str = "small",
        separate_critic: bool = True,
        channels: tuple[int, ...] | None = None,
        hidden: int | None = None,
        agent_channel: int | None = None,
        egocentric: bool = False,
        critic_channels: tuple[int, ...] | None = None,
        critic_hidden: int | None = None,
        total_env_steps: int = 1_000_000,
        lr: float = 5e-4,
        anneal_lr: bool = True,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        update_epochs: int = 3,
        num_minibatches: int = 8,
        norm_adv: bool = True,
        clip_coef: float = 0.2,
        clip_vloss: bool = True,
        ent_coef: float = 0.01,
        ent_coef_final: float | None = None,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        target_kl: float | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise InnerCriticError(f"model.lr must be positive, got {lr}")
        if not 0 < gamma <= 1 or not 0 <= gae_lambda <= 1:
            raise InnerCriticError(f"model.gamma must be in (0, 1] and model.gae_lambda in [0, 1], got {gamma} and {gae_lambda}")
        if ent_coef < 0 or (ent_coef_final is not None and ent_coef_final < 0):
            raise InnerCriticError(f"model.ent_coef and model.ent_coef_final must be >= 0, got {ent_coef} and {ent_coef_final}")
        for name, value in (("total_env_steps", total_env_steps), ("update_epochs", update_epochs), ("num_minibatches", num_minibatches)):
            if value < 1:
                raise InnerCriticError(f"model.{name} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.agent: ActorCritic | None = None
        self.env_info: dict[str, Any] | None = None
        # A buffer, so a resumed run continues the count (and the learning-rate schedule) from the checkpoint.
        self.register_buffer("env_steps", torch.zeros((), dtype=torch.int64))
        self.final_eval: dict[str, dict[str, float]] = {}
        self.final_eval_episodes = 0  # per distribution, all ranks together
        self._fit_start = 0.0

    # ------------------------------------------------------------------ construction and checkpoints
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        batch = dm.num_envs * dm.num_steps
        if batch % self.hparams.num_minibatches:
            raise InnerCriticError(
                f"a rollout of data.num_envs * data.num_steps = {batch} transitions does not split into "
                f"model.num_minibatches = {self.hparams.num_minibatches} equal minibatches; pick a divisor of {batch}")
        if self.env_info is not None:
            check_env_compatible(self.env_info, dm.env_info, "the agent being resumed")
        if self.agent is None:
            self.env_info = dm.env_info
            self.agent = ActorCritic(
                obs_shape=tuple(dm.obs_shape), num_actions=dm.num_actions, arch=self.hparams.arch,
                separate_critic=self.hparams.separate_critic, obs_scale=1.0 / dm.obs_high,
                channels=self.hparams.channels, hidden=self.hparams.hidden, agent_channel=self.hparams.agent_channel,
                egocentric=self.hparams.egocentric, critic_channels=self.hparams.critic_channels,
                critic_hidden=self.hparams.critic_hidden)
            if self.hparams.init_from:
                source, source_env = load_agent(self.hparams.init_from)
                check_env_compatible(source_env, dm.env_info, f"init_from checkpoint {self.hparams.init_from}")
                if source.config != self.agent.config:
                    # named from the configs themselves, so a network argument added later is named too
                    differ = "; ".join(f"{k} {source.config.get(k)} there, {v} here" for k, v in self.agent.config.items()
                                       if source.config.get(k) != v)
                    raise InnerCriticError(f"init_from checkpoint {self.hparams.init_from} holds another network ({differ}); "
                                     f"set those model arguments to the checkpoint's")
                self.agent.load_state_dict(source.state_dict())

    def progress(self) -> tuple[int, int, str]:
        """The run's progress for ``callbacks.progress.RunProgressBar``: env steps of ``total_env_steps``."""
        return int(self.env_steps), int(self.hparams.total_env_steps), "env steps"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything later stages need to rebuild the agent and its env without the training config.
        checkpoint["innercritic"] = {"kind": AGENT_KIND, "agent_config": self.agent.config, "env": self.env_info,
                                     "env_steps": int(self.env_steps), "gamma": self.hparams.gamma}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("innercritic")
        if meta is None or meta.get("kind") != AGENT_KIND:
            raise InnerCriticError("checkpoint is not an InnerCritic PPO agent checkpoint (no 'innercritic' agent metadata)")
        if self.agent is None:  # load_from_checkpoint outside fit: build from the stored config
            self.agent = ActorCritic(**meta["agent_config"])
            self.env_info = meta["env"]
        else:
            check_env_compatible(meta["env"], self.env_info, "the checkpoint passed as ckpt_path")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused Adam: one kernel for all parameters, which matters when the update dominates (2 CPU cores).
        return torch.optim.Adam(self.agent.parameters(), lr=self.hparams.lr, eps=1e-5, fused=True)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.agent(obs)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self) -> None:
        # A checksum of each rank's first observations, gathered so the summary shows ranks saw different envs.
        fingerprint = torch.tensor([self.trainer.datamodule.fingerprint()], dtype=torch.int64, device=self.device)
        self.rank_fingerprints = [int(x) for x in self.all_gather(fingerprint).flatten()]

    def training_step(self, token: int, batch_idx: int) -> None:
        hp = self.hparams
        if int(self.env_steps) >= hp.total_env_steps:
            self.trainer.should_stop = True
            return
        dm = self.trainer.datamodule
        opt = self.optimizers()
        frac = 1.0 - int(self.env_steps) / hp.total_env_steps
        if hp.anneal_lr:
            for group in opt.param_groups:
                group["lr"] = frac * hp.lr
        ent_coef = hp.ent_coef if hp.ent_coef_final is None else hp.ent_coef_final + frac * (hp.ent_coef - hp.ent_coef_final)

        start = time.perf_counter()
        ro = dm.collect(self.agent, hp.gamma, int(self.env_steps))
        rollout_s = time.perf_counter() - start
        advantages, returns = compute_gae(ro.rewards, ro.values, ro.dones, ro.next_value, hp.gamma, hp.gae_lambda)

        # Flatten (T, N) -> (T*N); rollout tensors were made under inference_mode, so clone into autograd land.
        obs = ro.obs.flatten(0, 1).clone()
        actions, old_logprobs, old_values = ro.actions.flatten().clone(), ro.logprobs.flatten().clone(), ro.values.flatten().clone()
        advantages, returns = advantages.flatten().clone(), returns.flatten().clone()
        batch = obs.shape[0]
        mb_size = batch // hp.num_minibatches

        clipfracs, approx_kl = [], torch.zeros(())
        for epoch in range(hp.update_epochs):
            for idx in torch.randperm(batch, device=obs.device).split(mb_size):
                loss, parts = ppo_loss(self.agent, obs[idx], actions[idx], old_logprobs[idx], old_values[idx],
                                       advantages[idx], returns[idx], clip_coef=hp.clip_coef, clip_vloss=hp.clip_vloss,
                                       norm_adv=hp.norm_adv, ent_coef=ent_coef, vf_coef=hp.vf_coef)
                approx_kl = parts["approx_kl"]
                clipfracs.append(parts["clipfrac"])
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
            if hp.target_kl is not None and approx_kl > hp.target_kl:
                break

        steps = batch * self.trainer.world_size
        self.env_steps += steps
        elapsed = time.perf_counter() - start
        var_ret = returns.var()
        explained_var = float("nan") if var_ret == 0 else float(1 - (returns - old_values).var() / var_ret)
        metrics = {
            "train/pg_loss": parts["pg_loss"], "train/value_loss": parts["value_loss"], "train/entropy": parts["entropy"],
            "train/approx_kl": approx_kl, "train/clipfrac": torch.stack(clipfracs).mean(),
            "train/explained_variance": explained_var, "train/lr": opt.param_groups[0]["lr"], "train/ent_coef": ent_coef,
            "train/env_steps": float(self.env_steps), "train/env_steps_per_s": steps / elapsed,
            "train/rollout_fraction": rollout_s / elapsed,
        }
        episodes = ro.episodes
        if len(episodes["return"]):
            metrics.update({"train/episode_return": float(episodes["return"].mean()),
                            "train/episode_length": float(episodes["length"].mean()),
                            "train/success": float(episodes["success"].mean())})
        # rank 0's figures only (no sync): ranks can finish different numbers of episodes, and a
        # collective on a key one rank lacks would hang DDP.
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("env_steps", float(self.env_steps), prog_bar=True, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, token: int, batch_idx: int) -> None:
        results = self.trainer.datamodule.evaluate(self.agent)
        for dist, figures in results.items():
            for what, value in figures.items():
                self.log(f"val/{dist}/{what}", value, sync_dist=True, prog_bar=(what == "success"), batch_size=1)

    def on_train_end(self) -> None:
        # A final evaluation on every rank (the collective keeps ranks in step), averaged over ranks.
        if int(self.env_steps) == 0:  # nothing was trained (e.g. max_epochs=0 to load init_from): nothing to judge
            return
        dm = self.trainer.datamodule
        results = dm.evaluate(self.agent, episodes=dm.final_eval_episodes, progress=self.trainer.progress_bar_callback is not None)
        self.final_eval_episodes = dm.final_eval_episodes * self.trainer.world_size
        for dist, figures in results.items():
            for what, value in figures.items():
                t = torch.tensor(value, dtype=torch.float64, device=self.device)
                figures[what] = float(self.trainer.strategy.reduce(t, reduce_op="mean"))
        self.final_eval = results

    def summary(self) -> dict[str, Any]:
        """The run's final figures, for ``summary.json``."""
        out: dict[str, Any] = {"env_steps": int(self.env_steps), "wall_s": time.perf_counter() - self._fit_start}
        train = self.final_eval.get("train_dist", {})
        out["mean_return"] = train.get("return")
        out["success_train_dist"] = train.get("success")
        held = self.final_eval.get("heldout")
        if held is not None:
            out["success_heldout"] = held["success"]
            out["mean_return_heldout"] = held["return"]
            if "p_cheese" in held:
                out["p_cheese_heldout"] = held["p_cheese"]
                out["p_top_right_heldout"] = held["p_top_right"]
        out["eval"] = self.final_eval
        out["eval_episodes"] = self.final_eval_episodes
        out["rank_fingerprints"] = getattr(self, "rank_fingerprints", [])
        return out
