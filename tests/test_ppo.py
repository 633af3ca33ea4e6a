"""PPO training end to end: configs, outputs on disk, resume, DDP, init_from and bad configurations.

Runs go through ``train.py`` in a subprocess, as a user runs them, at a tiny size; what is checked is
what they leave behind (checkpoints, metrics, summary.json, the offline W&B run).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.rollout import RolloutDataModule
from innercritic.agents import load_agent
from innercritic.agents.networks import ActorCritic
from lightning_modules.ppo import PPO, compute_gae, ppo_loss

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data.num_envs", "8", "--data.num_steps", "32", "--data.rollouts_per_epoch", "2",
    "--data.eval_episodes", "4", "--data.final_eval_episodes", "4", "--data.eval_num_envs", "4", "--model.num_minibatches", "2",
    "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
]
# 5x5 mazes: episodes (at most 100 steps) finish inside a tiny run, so episode statistics exist. The
# config's warmup becomes 1024 steps with the cheese anywhere, so a 2048-step run crosses into the main envs.
MAZE = ["-c", "configs/ppo/maze.yaml", "--data.env_kwargs", "{size: 5, cheese: top_right:3}",
        "--data.warmup_env_kwargs", "{cheese: top_right:5}", "--data.warmup_env_steps", "1024"]


def run_train(*args: str, root: Path, timeout: float = 300, check: bool = True, wandb_silent: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if wandb_silent:
        env["WANDB_SILENT"] = "true"
    env.pop("WANDB_MODE", None)  # the default (offline) is what is under test
    cmd = [sys.executable, "train.py", "fit", *args, "--trainer.default_root_dir", str(root)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def maze_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("maze")
    # more final-evaluation episodes than the periodic validations (4): summary.json reports the final one;
    # one validation (after 1536 steps), so the run ends between validations as the default's does
    done = run_train(*MAZE, "--model.total_env_steps", "2048", *TINY, "--data.final_eval_episodes", "6",
                     "--trainer.check_val_every_n_epoch", "3", "--trainer.enable_progress_bar", "true", root=root, wandb_silent=False)
    (root / "stderr.txt").write_text(done.stderr)
    (root / "stdout.txt").write_text(done.stdout)
    return root


def test_the_progress_bar_counts_env_steps_of_the_whole_run(maze_run):
    updates = (maze_run / "stdout.txt").read_text().replace("\r", "\n").splitlines()
    bars = [line for line in updates if " env steps/s" in line or " env steps" in line]
    assert bars, "no progress line in env steps"
    assert any("2048/2048" in line for line in bars), "the bar's total is the run's total_env_steps"
    assert any("256/2048" in line for line in bars), "one bar over the whole run, not one per epoch"
    final = (maze_run / "stderr.txt").read_text().replace("\r", "\n")
    assert "evaluation (train_dist)" in final and "6/6" in final, "the final evaluation shows its episodes"


def test_a_fit_prints_no_third_party_noise(maze_run):
    stderr = (maze_run / "stderr.txt").read_text()
    for noise in ("litlogger", "litmodels", "anonymous setting has no effect", "LeafSpec", "`IterableDataset` has `__len__`"):
        assert noise not in stderr, noise
    assert "wandb: " in stderr, "W&B's own run lines stay (the test would pass vacuously on a silenced run)"


def test_gae_matches_hand_computation():
    # One env, three steps, episode ends after step 1 (done[1] = 1): step 1 must not bootstrap.
    rewards = torch.tensor([[0.0], [1.0], [0.5]])
    values = torch.tensor([[0.2], [0.4], [0.3]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    next_value = torch.tensor([0.6])
    g, lam = 0.9, 0.8
    d2 = 0.5 + g * 0.6 - 0.3
    d1 = 1.0 - 0.4
    d0 = 0.0 + g * 0.4 - 0.2
    expected = torch.tensor([[d0 + g * lam * d1], [d1], [d2]])
    adv, ret = compute_gae(rewards, values, dones, next_value, g, lam)
    assert torch.allclose(adv, expected)
    assert torch.allclose(ret, expected + values)


@pytest.mark.parametrize("separate_critic", [True, False])
def test_rollout_matches_a_step_by_step_replay_with_truncations_bootstrapped(separate_critic):
    # With a separate critic the rollout values every observation in batches after the steps; a replay of
    # the same envs with the recorded actions, one full forward per step, must see the same values,
    # log-probabilities and rewards, truncated steps carrying + gamma * V(final obs).
    kwargs = dict(env="maze", env_kwargs={"size": 5, "max_steps": 6}, num_envs=4, num_steps=20, seed=3)
    dm, replay = RolloutDataModule(**kwargs), RolloutDataModule(**kwargs)
    dm.setup("fit")
    replay.setup("fit")
    torch.manual_seed(0)
    agent = ActorCritic(dm.obs_shape, dm.num_actions, arch="small", separate_critic=separate_critic, channels=(4,), hidden=8)
    gamma = 0.9
    ro = dm.collect(agent, gamma)
    obs = replay._obs
    truncated_steps = 0
    with torch.inference_mode():
        for t in range(20):
            assert torch.equal(ro.obs[t], torch.from_numpy(obs))
            logits, value = agent(torch.from_numpy(obs))
            torch.testing.assert_close(ro.values[t], value, atol=1e-5, rtol=0)
            torch.testing.assert_close(ro.logprobs[t], logits.log_softmax(-1).gather(1, ro.actions[t][:, None]).squeeze(1))
            obs, reward, terminated, truncated, info = replay.envs.step(ro.actions[t].numpy())
            expected = torch.as_tensor(reward, dtype=torch.float32)
            if truncated.any():
                expected[torch.from_numpy(truncated)] += gamma * agent(torch.from_numpy(info["final_obs"][truncated]))[1]
                truncated_steps += 1
            torch.testing.assert_close(ro.rewards[t], expected, atol=1e-5, rtol=0)
            assert torch.equal(ro.dones[t], torch.from_numpy(terminated | truncated).float())
        torch.testing.assert_close(ro.next_value, agent(torch.from_numpy(obs))[1], atol=1e-5, rtol=0)
    assert truncated_steps >= 2, "the 6-step limit must truncate episodes within 20 steps"


def test_warmup_envs_give_way_to_the_main_envs_at_warmup_env_steps():
    # A curriculum's warmup mixes 5x5 mazes into 7x7 ones; from warmup_env_steps on, the rollout is exactly
    # the one a run without warmup collects first (same envs, same seeds), and evaluation never sees a 5x5 maze.
    main = {"size": 7, "cheese": "top_right:3"}
    kwargs = dict(env="maze", env_kwargs=main, num_envs=8, num_steps=16, seed=3, eval_episodes=8, eval_num_envs=8)
    dm = RolloutDataModule(**kwargs, warmup_env_kwargs={"size": [5, 7]}, warmup_env_steps=256)
    plain = RolloutDataModule(**kwargs)
    dm.setup("fit")
    plain.setup("fit")
    torch.manual_seed(0)
    agent = ActorCritic(dm.obs_shape, dm.num_actions, arch="small", separate_critic=True, channels=(4,), hidden=8)
    sizes = set()
    for _ in range(4):  # 4 rollouts of 8 envs x 16 steps, to see several levels per env
        dm.collect(agent, 0.9, env_steps=128)
        sizes |= {dm.envs.maze_size(i) for i in range(8)}
    assert sizes == {5, 7}
    torch.manual_seed(1)
    ro = dm.collect(agent, 0.9, env_steps=256)
    assert {dm.envs.maze_size(i) for i in range(8)} == {7}
    torch.manual_seed(1)
    expected = plain.collect(agent, 0.9)
    assert torch.equal(ro.obs, expected.obs) and torch.equal(ro.actions, expected.actions)
    assert torch.equal(ro.rewards, expected.rewards)
    assert dm.evaluate(agent) == plain.evaluate(agent)


@pytest.mark.parametrize("overrides,steps,message", [
    ({"size": [5, 7]}, 0, "data.warmup_env_kwargs and data.warmup_env_steps go together"),
    (None, 100, "data.warmup_env_kwargs and data.warmup_env_steps go together"),
    ({"size": 9}, 100, "gives observations (3, 9, 9)"),
])
def test_bad_warmup_is_refused(overrides, steps, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RolloutDataModule(env="maze", env_kwargs={"size": 7}, warmup_env_kwargs=overrides, warmup_env_steps=steps)


def test_maze_run_leaves_checkpoint_metrics_summary_and_wandb(maze_run):
    run = maze_run / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("success_train_dist", "success_heldout", "p_cheese_heldout", "p_top_right_heldout", "mean_return", "env_steps", "wall_s"):
        assert summary[key] is not None, key
    assert summary["env_steps"] >= 2048
    assert summary["config"]["data"]["env"] == "maze"
    assert summary["eval_episodes"] == 6
    for figures in summary["eval"].values():
        assert abs(figures["success"] * 6 - round(figures["success"] * 6)) < 1e-9, "not a rate over 6 episodes"
    rows = read_metrics(run)
    for key in ("train/episode_return", "train/episode_length", "train/success", "train/env_steps_per_s", "train/pg_loss",
                "train/value_loss", "train/entropy", "train/approx_kl", "train/clipfrac", "train/explained_variance",
                "val/heldout/p_cheese", "val/heldout/p_top_right", "val/train_dist/success"):
        assert column(rows, key), f"{key} never logged"
    steps = column(rows, "train/env_steps")
    assert steps == sorted(steps) and steps[0] == 256  # one rollout of 8 envs x 32 steps per log line
    wandb_runs = list((maze_run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))


def test_last_checkpoint_holds_the_agent_the_summary_judged(maze_run):
    # The run stops at its env-step budget, one epoch after its last validation: last.ckpt must be the
    # final agent (what summary.json evaluated and the loop's later stages load), not the validated one.
    run = maze_run / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["innercritic"]["env_steps"] == summary["env_steps"] == 2048
    validated = column(read_metrics(run), "val/train_dist/success")
    assert len(validated) == 1, "the fixture should validate once, before the end"


def test_checkpoint_rebuilds_agent_and_env_without_the_config(maze_run):
    agent, env = load_agent(maze_run / "version_0" / "checkpoints" / "last.ckpt")
    assert env["spec"] == "maze" and env["kwargs"] == {"size": 5, "cheese": "top_right:3"} and env["gamma"] == 0.95  # the config's
    logits, value = agent(torch.zeros((2, *env["obs_shape"]), dtype=torch.uint8))
    assert logits.shape == (2, env["num_actions"]) and value.shape == (2,)


@pytest.mark.parametrize("config,extra", [
    ("configs/ppo/minigrid_doorkey.yaml", ["--model.total_env_steps", "512"]),
    ("configs/ppo/breakout.yaml", ["--model.total_env_steps", "512", "--data.env_kwargs", "{max_num_frames_per_episode: 400}"]),
])
def test_every_other_config_survives_a_tiny_run(tmp_path, config, extra):
    run_train("-c", config, *extra, *TINY, root=tmp_path)
    summary = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert summary["env_steps"] >= 512 and summary["mean_return"] is not None
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_print_config_parses_every_config():
    for config in sorted((ROOT / "configs" / "ppo").glob("*.yaml")):
        result = subprocess.run([sys.executable, "train.py", "fit", "-c", str(config), "--print_config"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "class_path: lightning_modules.ppo.PPO" in result.stdout


def test_killed_run_resumes_and_counters_continue(tmp_path):
    # LightningCLI restores the model's hyperparameters from the checkpoint on --ckpt_path, so the
    # resumed run keeps its original budget of 8192 env steps and finishes it, and its learning-rate and
    # entropy schedules pick up where the killed run left them.
    total = "8192"
    env = {**os.environ, "WANDB_SILENT": "true"}
    cmd = [sys.executable, "train.py", "fit", *MAZE, "--model.total_env_steps", total, "--model.ent_coef_final", "0.01", *TINY,
           "--trainer.default_root_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not last.exists() and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last.exists(), "the run wrote no checkpoint before being killed"
    assert not (tmp_path / "version_0" / "summary.json").exists(), "the run finished before it could be killed"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    saved_steps, saved_global = saved["innercritic"]["env_steps"], saved["global_step"]
    assert 0 < saved_steps < int(total)

    run_train(*MAZE, "--model.total_env_steps", "999", *TINY, "--ckpt_path", str(last), root=tmp_path)
    resumed = tmp_path / "version_0"  # the same run folder: one history
    assert sorted(p.name for p in tmp_path.glob("version_*")) == ["version_0"]
    everything = column(read_metrics(resumed), "train/env_steps")
    assert everything == sorted(set(everything)), "rows the killed run logged past its checkpoint are logged once, by the resumed run"
    rows = [r for r in read_metrics(resumed) if r.get("train/env_steps") and float(r["train/env_steps"]) > saved_steps]
    steps = column(rows, "train/env_steps")
    assert everything[0] == 256 and steps[0] == saved_steps + 256, "env-step counter restarted instead of continuing"
    # each rollout's schedules are set from the env steps before it (steps - 256): lr 2.5e-3 -> 0, entropy 0.03 -> 0.01
    frac = [1 - (s - 256) / int(total) for s in steps]
    assert column(rows, "train/lr") == pytest.approx([2.5e-3 * f for f in frac])
    assert column(rows, "train/ent_coef") == pytest.approx([0.01 + 0.02 * f for f in frac])
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["env_steps"] == int(total)
    final = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] > saved_global and final["epoch"] > saved["epoch"]


def test_ddp_two_cpu_ranks_see_different_envs_and_only_rank0_writes(tmp_path):
    run_train(*MAZE, "--model.total_env_steps", "2048", *TINY, "--trainer.accelerator", "cpu",
              "--trainer.devices", "2", "--trainer.strategy", "ddp", root=tmp_path, timeout=400)
    summary = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert summary["config"]["trainer"]["world_size"] == 2
    assert summary["eval_episodes"] == 8  # 4 per rank
    prints = summary["rank_fingerprints"]
    assert len(prints) == 2 and prints[0] != prints[1], "both ranks stepped the same envs"
    # one rollout = 8 envs x 32 steps on each of 2 ranks
    assert column(read_metrics(tmp_path / "version_0"), "train/env_steps")[0] == 512
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "wandb"]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("args,message", [
    (["--data.env", "cartpole"], "unknown env spec 'cartpole'"),
    (["--data.num_envs", "6", "--data.num_steps", "5", "--model.num_minibatches", "4"], "does not split into"),
    (["--model.lr", "0"], "model.lr must be positive"),
    (["--model.lr=-1e-3"], "model.lr must be positive"),
    (["--data.final_eval_episodes", "0"], "data.final_eval_episodes must be >= 1"),
    (["--model.ent_coef_final=-0.01"], "model.ent_coef and model.ent_coef_final must be >= 0"),
    (["--model.separate_critic", "false", "--model.critic_hidden", "8"], "critic_channels and critic_hidden size a separate critic tower"),
])
def test_bad_configuration_fails_before_training(tmp_path, args, message):
    result = run_train(*MAZE, "--model.total_env_steps", "2048", *TINY, *args, root=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_checkpoint_from_another_env_is_refused(tmp_path, maze_run):
    ckpt = maze_run / "version_0" / "checkpoints" / "last.ckpt"
    for flag in ("--model.init_from", "--ckpt_path"):
        result = run_train("-c", "configs/ppo/minigrid_doorkey.yaml", "--model.total_env_steps", "512", *TINY, flag, str(ckpt),
                           root=tmp_path / flag.strip("-"), check=False)
        assert result.returncode != 0
        assert "was trained on env 'maze'" in result.stderr and "'MiniGrid-DoorKey-5x5-v0'" in result.stderr
        assert not list((tmp_path / flag.strip("-")).glob("**/*.ckpt"))


def test_init_from_starts_from_the_checkpoint_weights(maze_run):
    ckpt = maze_run / "version_0" / "checkpoints" / "last.ckpt"
    source, _ = load_agent(ckpt)
    # the network's constructor arguments, less those the env decides (shape, actions, scale)
    network = {k: v for k, v in source.config.items() if k not in ("obs_shape", "num_actions", "obs_scale")}
    module = PPO(**network, init_from=str(ckpt))
    dm = RolloutDataModule(env="maze", env_kwargs={"size": 5, "cheese": "top_right:3"}, num_envs=4, num_steps=8)
    other = PPO(**{**network, "critic_hidden": 16}, init_from=str(ckpt))
    with pytest.raises(ValueError, match=f"holds another network \\(critic_hidden {network['critic_hidden']} there, 16 here\\)"):
        L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(other, datamodule=dm)
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=dm)
    for (name, a), (_, b) in zip(module.agent.state_dict().items(), source.state_dict().items()):
        assert torch.equal(a, b), name
    fresh = PPO(**network)
    L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(fresh, datamodule=dm)
    assert not torch.equal(fresh.agent.policy_head.weight, source.policy_head.weight)


class FixedOutputs(torch.nn.Module):
    """An 'agent' whose logits and values are parameters: the PPO loss on it can be worked out by hand."""

    def __init__(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.values = torch.nn.Parameter(logits), torch.nn.Parameter(values)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits, self.values


def test_ppo_loss_clips_the_surrogate_and_the_value_as_written_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    values = torch.tensor([1.0, 0.0])
    agent = FixedOutputs(logits, values)
    actions = torch.tensor([0, 1])
    logp = torch.log_softmax(logits, -1)[torch.arange(2), actions]
    adv, returns, old_values = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.1])
    kw = dict(clip_coef=0.2, clip_vloss=True, norm_adv=False, ent_coef=0.1, vf_coef=0.5)
    obs = torch.zeros(2, 1)

    # unchanged policy: ratio 1, nothing clipped, KL 0
    loss, parts = ppo_loss(agent, obs, actions, logp.detach(), old_values, adv, returns, **kw)
    assert parts["approx_kl"] == pytest.approx(0.0, abs=1e-7) and parts["clipfrac"] == 0
    assert parts["pg_loss"] == pytest.approx(-adv.mean().item())
    # value clipping: max of (v - R)^2 and (old + clamp(v - old, +-0.2) - R)^2 per row, halved
    # (row 0: the clipped error 1.3^2 is the larger, so clipping binds)
    v_loss = 0.5 * (max((1.0 - 2.0) ** 2, (0.7 - 2.0) ** 2) + max((0.0 - 3.0) ** 2, (0.0 - 3.0) ** 2)) / 2
    assert parts["value_loss"] == pytest.approx(v_loss)
    probs = torch.softmax(logits, -1)
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    assert parts["entropy"] == pytest.approx(entropy)
    assert loss.item() == pytest.approx(-adv.mean().item() - 0.1 * entropy + 0.5 * v_loss)

    # the policy doubled both actions' probabilities: ratio 2, so the surrogate takes min(2A, 1.2A)
    # for A > 0 (1.2A, clipped) and min(2A, 1.2A) = 2A for A < 0 (pessimistic, unclipped)
    _, parts = ppo_loss(agent, obs, actions, (logp - torch.log(torch.tensor(2.0))).detach(), old_values, adv, returns, **kw)
    assert parts["pg_loss"] == pytest.approx(-(1.2 * 1.0 + 2.0 * -2.0) / 2)
    assert parts["clipfrac"] == 1.0
    # normalised advantages have mean 0: at ratio 1 the surrogate is 0
    _, parts = ppo_loss(agent, obs, actions, logp.detach(), old_values, adv, returns, **{**kw, "norm_adv": True})
    assert parts["pg_loss"] == pytest.approx(0.0, abs=1e-6)


def test_a_resumed_csv_log_keeps_the_checkpoints_epochs_and_drops_later_rows(tmp_path):
    # As Lightning logs a run: a training row carries the global step its step started at, so the row of the
    # step after a checkpoint at epoch 0 (global step 2) has step 2 too, beside epoch 0's validation row.
    from train import ResumableCSVLogger

    run = tmp_path / "version_0"
    run.mkdir()
    rows = [(0, 0, "256"), (1, 0, "512"), (2, 0, ""), (2, 1, "768"), (3, 1, "1024")]
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/env_steps", "val/success"])
        writer.writeheader()
        writer.writerows({"epoch": e, "step": s, "train/env_steps": v, "val/success": "" if v else "0.5"} for s, e, v in rows)
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="", version=0, keep_until_epoch=0)
    logger.log_metrics({"train/env_steps": 768.0, "epoch": 1}, step=2)
    logger.save()
    kept = read_metrics(run)
    assert [(r["step"], r["train/env_steps"], r["val/success"]) for r in kept] == [
        ("0", "256", ""), ("1", "512", ""), ("2", "", "0.5"), ("2", "768.0", "")], "epoch 0 kept whole, epoch 1 logged once"
