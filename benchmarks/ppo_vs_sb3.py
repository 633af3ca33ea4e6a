"""Our PPO (``lightning_modules.ppo.PPO``) against Stable-Baselines3's PPO on the cheese maze.

What it measures, for each trainer, over the same budget of env steps (``--steps``):

- training throughput: env steps per second of wall clock from the start of training (after the
  envs are reset) to the end of the last update, rollouts and updates together;
- time to a success threshold: wall-clock seconds (and env steps) until the first rollout whose
  finished episodes reach the cheese at least ``--threshold`` of the time, counted at the end of the
  update that follows that rollout; null if the budget ends first. Ours reads ``train/success``; SB3
  counts the same thing (episode terminated with reward 1) in a callback. The first rollouts, which
  end before any env can reach the step limit (2 here: 128 + 128 < 4 * 9 * 9 = 324 steps), are not
  scored: every env starts together, so only successes can finish in them and their rate is 1.0
  under any policy.

How the two are matched. Both train on ``CheeseMaze`` with the env, model and data settings of
``configs/ppo/maze.yaml`` (env, network, rollout shape, epochs, minibatches, learning rate annealed
linearly to 0 over the budget, entropy, discount, GAE lambda; Adam eps 1e-5, clip 0.2, value
clipping 0.2, value 0.5, grad norm 0.5, per-minibatch advantage normalisation from PPO's signature
defaults), read from that file, with PPO's signature defaults for what it leaves out. Same network
(the mouse-square features, the egocentric frame and the critic tower's own widths included when the
config asks for them): SB3's actor-critic policy (``_sb3_maze.InnerCriticPolicy``) gets the ``encoder``
of a fresh ``ActorCritic`` as features extractor, a second one for the critic
(``share_features_extractor=False``, ours ``separate_critic=True``) and ``net_arch=dict(pi=[], vf=[])``,
so its heads are the single linear layers ours has; both use orthogonal init (gain sqrt 2, policy head 0.01, value head 1). The parameter
counts are checked equal. Same env code: SB3 steps one vectorised ``CheeseMaze`` through a ``VecEnv``
adapter (``benchmarks/_sb3_maze.py``) that builds SB3's per-env info dicts (``terminal_observation``,
``TimeLimit.truncated``), a cost SB3's API imposes and so counted against it. Both bootstrap time-limit
truncations from V(final obs) and seed the envs the same way (env i <- (seed, i), the same level
sequence). Each trainer runs in its own fresh subprocess (neither inherits the other's level caches or
allocator state) with the same torch thread count. By default the two take turns, one rollout + update
each, never overlapping, and the time a trainer spends waiting for its turn is left off all its
figures: so a change in machine load (other jobs starting or stopping) hits both alike.
``--sequential`` runs one to the end, then the other. Ours runs without logger, checkpoints or
validation; SB3 with ``verbose=0`` and no tensorboard.

Where SB3 cannot be matched exactly:

- value loss: SB3 uses ``mse(returns, v_clipped)``; ours ``0.5 * max((v - R)^2, (v_clipped - R)^2)``
  (CleanRL). SB3 has no max-of-clipped-and-unclipped form. Its loss lacks the 1/2, so SB3 gets
  ``vf_coef = 0.25`` for the same gradient scale as our 0.5 (the JSON reports both).
- learning rate: SB3 evaluates its schedule after counting the rollout, ours before; the SB3 schedule
  is shifted by one rollout (``LinearFromStart``) so the per-update rates are identical.
- optimiser: ours is ``Adam(fused=True)``; SB3 keeps its default Adam (foreach), as an SB3 user would
  (``--sb3-fused-adam`` gives SB3 the fused kernel too).
- rollout storage: SB3's buffer holds float32 numpy observations and per-step Python bookkeeping; ours
  uint8 tensors.
- rollout forward passes: SB3 evaluates both towers at every step (a ``Categorical`` per step); ours runs
  the policy tower per step (softmax sampling, no distribution object) and the critic tower once per
  rollout over all its observations, in batches of 1024 (the same parameters, so the same values up to
  float rounding; ``datamodules.rollout.RolloutDataModule.collect``). SB3's rollout loop has no way to
  defer the values, so this is counted as ours.
- SB3 bootstraps each truncated env with its own forward pass; ours values the final observations of a
  whole rollout in one batch.
- initial weights differ (same init scheme, different RNG draws), so learning curves differ by seed
  noise even where the algorithms agree.

Run (from the repository root; needs the ``bench`` extra, ``pip install -e .[bench]``):

    python benchmarks/ppo_vs_sb3.py                    # 300k steps each: ~5 min on an idle 2-core machine
    python benchmarks/ppo_vs_sb3.py --steps 50000      # quick check
    python benchmarks/ppo_vs_sb3.py --threshold 0.5    # 0.8 is not reached in 300k steps with this config
    python benchmarks/ppo_vs_sb3.py --device cuda      # both networks on the GPU (the envs stay on the CPU)

Timings need an otherwise idle machine: with other jobs on the same cores, 2 torch threads are
oversubscribed and both trainers slow down several-fold, by amounts that change from minute to minute
(the default turn-taking keeps the ratio fairer than the absolute figures; ``loadavg_1m`` in the
output says how busy the machine was; ``--threads 1`` suffers less).

It prints a table, then on the last line one JSON object (``ppo_sps``, ``sb3_sps``, ``ratio`` =
ppo_sps / sb3_sps, ``ppo_time_to_threshold_s``, ``sb3_time_to_threshold_s``, ...).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import machine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ppo" / "maze.yaml"
RESULT_TAG = "@@RESULT "
TURN_TAG = "@@TURN"


class Turns:
    """Worker side of the turn-taking: before each rollout + update, say so and wait for the go."""

    def __call__(self) -> None:
        print(TURN_TAG, flush=True)
        if not sys.stdin.readline():  # the parent is gone
            raise SystemExit(1)


def load_settings(config: Path) -> dict:
    """Model and data settings of the training config, PPO's defaults filling what it leaves out."""
    import yaml

    from lightning_modules.ppo import PPO

    cfg = yaml.safe_load(config.read_text())
    model = {k: p.default for k, p in inspect.signature(PPO.__init__).parameters.items()
             if k != "self" and p.default is not inspect.Parameter.empty}
    model.update(cfg["model"].get("init_args", {}))
    data = dict(cfg["data"].get("init_args", {}))
    # SB3 has no curriculum: both trainers step the config's main envs (env_kwargs) from the start.
    data.pop("warmup_env_kwargs", None)
    data.pop("warmup_env_steps", None)
    if data.get("env", "maze") != "maze":
        raise SystemExit(f"{config} trains on {data.get('env')!r}; this benchmark needs the maze config")
    for key in ("channels", "critic_channels"):
        if model.get(key) is not None:
            model[key] = tuple(model[key])
    return {"model": model, "data": data, "seed": cfg.get("seed_everything", 1)}


def warmup_rollouts(data: dict) -> int:
    """Rollouts that end before any env can reach the step limit: with every env starting together,
    only successes can finish in them, so their success rate is 1.0 whatever the policy; unscored."""
    kwargs = data.get("env_kwargs", {})
    size = kwargs.get("size", 9)
    limit = kwargs.get("max_steps") or 4 * max(size if isinstance(size, (list, tuple)) else [size]) ** 2
    return -(-limit // data["num_steps"]) - 1


# ----------------------------------------------------------------------------------------- ours
def run_ours(settings: dict, steps: int, threshold: float, seed: int, warmup: int, wait, device: str) -> dict:
    import lightning as L
    import torch

    from datamodules.rollout import RolloutDataModule
    from lightning_modules.ppo import PPO

    class Clock(L.Callback):
        def __init__(self, dm: RolloutDataModule) -> None:
            self.t0 = self.t_end = self.rollout_s = self.blocked = 0.0
            self.steps = self.rollouts = 0
            self.hit_s = self.hit_steps = self.last_success = self.best_success = None
            self._episodes = None  # finished episodes in the rollout of the current step; None: no rollout
            collect = dm.collect

            def counted(agent, gamma, env_steps):  # tells on_train_batch_end whether train/success is this step's
                start = time.perf_counter()
                ro = collect(agent, gamma, env_steps)
                self.rollout_s += time.perf_counter() - start
                self._episodes = len(ro.episodes["success"])
                return ro

            dm.collect = counted

        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            start = time.perf_counter()
            wait()  # take turns with the other trainer; the waiting is left off every figure
            self.blocked += time.perf_counter() - start

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._episodes is None:  # the step that only notices the budget is spent
                return
            now = time.perf_counter() - self.t0 - self.blocked
            self.t_end, self.steps, self.rollouts = now, int(pl_module.env_steps), self.rollouts + 1
            if self._episodes and self.rollouts > warmup:
                rate = float(trainer.callback_metrics["train/success"])
                self.last_success = rate
                self.best_success = rate if self.best_success is None else max(self.best_success, rate)
                if rate >= threshold and self.hit_s is None:
                    self.hit_s, self.hit_steps = now, self.steps
            self._episodes = None

    L.seed_everything(seed, verbose=False)
    model = PPO(**{**settings["model"], "total_env_steps": steps})
    # eval_episodes only sizes the evaluation PPO runs after training (untimed); 1 keeps it short.
    dm = RolloutDataModule(**{**settings["data"], "seed": seed, "eval_episodes": 1})
    clock = Clock(dm)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(model, datamodule=dm)
    return {
        "steps": clock.steps, "rollouts": clock.rollouts, "wall_s": clock.t_end, "sps": clock.steps / clock.t_end,
        "time_to_threshold_s": clock.hit_s, "steps_at_threshold": clock.hit_steps,
        "final_success": clock.last_success, "best_success": clock.best_success,
        "params": sum(p.numel() for p in model.agent.parameters()), "torch_threads": torch.get_num_threads(),
        "rollout_s": clock.rollout_s,
    }


# ------------------------------------------------------------------------------------------ SB3
def run_sb3(settings: dict, steps: int, threshold: float, seed: int, warmup: int, wait, fused_adam: bool, device: str) -> dict:
    import torch
    from stable_baselines3 import PPO as SB3PPO

    from _sb3_maze import CheeseMazeVecEnv, InnerCriticPolicy, InnerCriticTower, LinearFromStart, SuccessClock

    m, d = settings["model"], settings["data"]
    env = CheeseMazeVecEnv(d["num_envs"], **d.get("env_kwargs", {}))
    rollout = d["num_envs"] * d["num_steps"]
    obs_high = float(env.observation_space.high.max())
    optimizer_kwargs = {"eps": 1e-5}  # ours: Adam(eps=1e-5) in PPO.configure_optimizers
    if fused_adam:
        optimizer_kwargs["fused"] = True
    critic_kwargs = {k: m[f"critic_{k}"] for k in ("channels", "hidden") if m.get(f"critic_{k}") is not None}
    agent = SB3PPO(
        InnerCriticPolicy, env,
        learning_rate=LinearFromStart(m["lr"], rollout, steps) if m["anneal_lr"] else m["lr"],
        n_steps=d["num_steps"], batch_size=rollout // m["num_minibatches"], n_epochs=m["update_epochs"],
        gamma=m["gamma"], gae_lambda=m["gae_lambda"], clip_range=m["clip_coef"],
        clip_range_vf=m["clip_coef"] if m["clip_vloss"] else None, normalize_advantage=m["norm_adv"],
        ent_coef=m["ent_coef"], vf_coef=m["vf_coef"] / 2,  # SB3's value loss is MSE, ours 0.5 * MSE
        max_grad_norm=m["max_grad_norm"], target_kl=m["target_kl"], seed=seed, device=device, verbose=0,
        policy_kwargs=dict(
            features_extractor_class=InnerCriticTower,
            features_extractor_kwargs=dict(arch=m["arch"], channels=m["channels"], hidden=m["hidden"], obs_scale=1.0 / obs_high,
                                           agent_channel=m["agent_channel"], egocentric=m["egocentric"]),
            share_features_extractor=not m["separate_critic"], critic_kwargs=critic_kwargs,
            net_arch=dict(pi=[], vf=[]), ortho_init=True, optimizer_kwargs=optimizer_kwargs,
        ),
    )
    clock = SuccessClock(threshold, warmup, wait)
    agent.learn(total_timesteps=steps, callback=clock)
    wall = clock.t_end
    return {
        "steps": int(agent.num_timesteps), "rollouts": clock.rollouts, "wall_s": wall, "sps": agent.num_timesteps / wall,
        "time_to_threshold_s": clock.hit_s, "steps_at_threshold": clock.hit_steps,
        "final_success": clock.last_success, "best_success": clock.best_success,
        "params": sum(p.numel() for p in agent.policy.parameters()), "torch_threads": torch.get_num_threads(),
        "rollout_s": clock.rollout_s,
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    settings = load_settings(args.config)
    seed = settings["seed"] if args.seed is None else args.seed
    warmup = warmup_rollouts(settings["data"])
    load_start = os.getloadavg()[0]
    if args.worker == "ppo":
        out = run_ours(settings, args.steps, args.threshold, seed, warmup, Turns(), args.device)
    else:
        out = run_sb3(settings, args.steps, args.threshold, seed, warmup, Turns(), args.sb3_fused_adam, args.device)
    out["loadavg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(RESULT_TAG + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ main
class Worker:
    """One trainer in a subprocess, driven one rollout + update at a time over its stdin/stdout."""

    def __init__(self, which: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", which, "--steps", str(args.steps), "--threshold", str(args.threshold),
               "--threads", str(args.threads), "--config", str(args.config), "--device", args.device]
        if args.seed is not None:
            cmd += ["--seed", str(args.seed)]
        if args.sb3_fused_adam:
            cmd.append("--sb3-fused-adam")
        self.which, self.result = which, None
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, cwd=ROOT)

    def wait_turn(self) -> bool:
        """Block until the worker asks for its next turn (True) or has reported its result (False)."""
        while line := self.proc.stdout.readline():
            if line.startswith(TURN_TAG):
                return True
            if line.startswith(RESULT_TAG):
                self.result = json.loads(line[len(RESULT_TAG):])
                self.proc.wait()
                return False
        self.proc.wait()
        self.stderr.seek(0)
        sys.stderr.write(self.stderr.read()[-8000:])
        raise SystemExit(f"the {self.which} run failed (exit {self.proc.returncode})")

    def take_turn(self) -> bool:
        """Let the worker run one rollout + update; False once it has finished."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.wait_turn()


def run_all(order: list[str], args: argparse.Namespace):
    """Yield (trainer, result). Default: both workers set up, then take turns, one rollout + update
    each, so a change in machine load hits both alike; turns never overlap and waiting is not timed.
    ``--sequential``: one trainer to the end, then the other."""
    if args.sequential:
        for which in order:
            print(f"running {which} ({args.steps:,} env steps) ...", flush=True)
            worker = Worker(which, args)
            if worker.wait_turn():
                while worker.take_turn():
                    pass
            yield which, worker.result
        return
    print(f"running {' and '.join(order)} in turns, one rollout + update each ({args.steps:,} env steps each) ...", flush=True)
    workers = [Worker(which, args) for which in order]
    pending = [w for w in workers if w.wait_turn()]  # both set up before any timed work starts
    rounds, start = 0, time.perf_counter()
    while pending:
        rounds += 1
        if rounds % 10 == 0:
            print(f"  {rounds} rounds, {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
        for w in list(pending):
            if not w.take_turn():
                pending.remove(w)
                print(f"  {w.which} done: {w.result['wall_s']:.1f} s training, {w.result['sps']:,.0f} env steps/s", flush=True)
    for w in workers:
        yield w.which, w.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300_000, help="env steps each trainer trains for (rounded up to whole rollouts)")
    parser.add_argument("--threshold", type=float, default=0.8, help="success rate of a rollout's finished episodes to time")
    parser.add_argument("--seed", type=int, default=None, help="seed of both runs (default: the config's seed_everything)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both runs (default: torch's default here)")
    parser.add_argument("--order", default="ppo,sb3", choices=["ppo,sb3", "sb3,ppo"], metavar="{ppo,sb3 | sb3,ppo}",
                        help="which trainer runs first")
    parser.add_argument("--sequential", action="store_true",
                        help="run one trainer to the end, then the other (default: take turns, one rollout + update each)")
    parser.add_argument("--sb3-fused-adam", action="store_true", help="give SB3 the fused Adam ours uses")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both trainers put the network (the envs step on the CPU either way)")
    parser.add_argument("--config", type=Path, default=CONFIG, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["ppo", "sb3"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.worker:
        worker(args)
        return

    settings = load_settings(args.config)
    warmup = warmup_rollouts(settings["data"])
    results = dict(run_all(args.order.split(","), args))
    ours, sb3 = results["ppo"], results["sb3"]
    if ours["params"] != sb3["params"]:
        raise SystemExit(f"parameter counts differ: ours {ours['params']:,}, SB3 {sb3['params']:,}; the networks are not the same")

    def fmt(v, spec=",.1f"):
        return "null" if v is None else format(v, spec)

    rows = [
        ("env steps trained", fmt(ours["steps"], ","), fmt(sb3["steps"], ",")),
        ("rollouts (updates)", fmt(ours["rollouts"], ","), fmt(sb3["rollouts"], ",")),
        ("training wall clock (s)", fmt(ours["wall_s"]), fmt(sb3["wall_s"])),
        ("env steps / s", fmt(ours["sps"], ",.0f"), fmt(sb3["sps"], ",.0f")),
        ("  of which rollouts (s)", fmt(ours["rollout_s"]), fmt(sb3["rollout_s"])),
        ("  of which updates (s)", fmt(ours["wall_s"] - ours["rollout_s"]), fmt(sb3["wall_s"] - sb3["rollout_s"])),
        (f"s to success >= {args.threshold:g}", fmt(ours["time_to_threshold_s"]), fmt(sb3["time_to_threshold_s"])),
        ("env steps at that point", fmt(ours["steps_at_threshold"], ","), fmt(sb3["steps_at_threshold"], ",")),
        ("last rollout's success", fmt(ours["final_success"], ".3f"), fmt(sb3["final_success"], ".3f")),
        (f"best (from rollout {warmup + 1})", fmt(ours["best_success"], ".3f"), fmt(sb3["best_success"], ".3f")),
        ("parameters", fmt(ours["params"], ","), fmt(sb3["params"], ",")),
        ("torch threads", str(ours["torch_threads"]), str(sb3["torch_threads"])),
        ("load avg 1m (start, end)", str(ours["loadavg_1m"]), str(sb3["loadavg_1m"])),
    ]
    print(f"\n{'':28}{'InnerCritic PPO':>18}{'SB3 PPO':>18}")
    for name, a, b in rows:
        print(f"{name:28}{a:>18}{b:>18}")
    ratio = ours["sps"] / sb3["sps"]
    print(f"{'throughput ratio ours/SB3':28}{ratio:>18.2f}\n")

    import lightning
    import stable_baselines3
    import torch

    m, d = settings["model"], settings["data"]
    summary = {
        "ppo_sps": round(ours["sps"], 1), "sb3_sps": round(sb3["sps"], 1), "ratio": round(ratio, 3),
        "ppo_time_to_threshold_s": None if ours["time_to_threshold_s"] is None else round(ours["time_to_threshold_s"], 1),
        "sb3_time_to_threshold_s": None if sb3["time_to_threshold_s"] is None else round(sb3["time_to_threshold_s"], 1),
        "ppo_steps_at_threshold": ours["steps_at_threshold"], "sb3_steps_at_threshold": sb3["steps_at_threshold"],
        "ppo_wall_s": round(ours["wall_s"], 1), "sb3_wall_s": round(sb3["wall_s"], 1),
        "ppo_rollout_s": round(ours["rollout_s"], 1), "sb3_rollout_s": round(sb3["rollout_s"], 1),
        "ppo_final_success": ours["final_success"], "sb3_final_success": sb3["final_success"],
        "budget_steps": args.steps, "ppo_steps": ours["steps"], "sb3_steps": sb3["steps"], "threshold": args.threshold,
        "unscored_warmup_rollouts": warmup,
        "ppo_params": ours["params"], "sb3_params": sb3["params"], "torch_threads": args.threads,
        "ppo_loadavg_1m": ours["loadavg_1m"], "sb3_loadavg_1m": sb3["loadavg_1m"], "order": args.order,
        "mode": "sequential" if args.sequential else "interleaved",
        "seed": settings["seed"] if args.seed is None else args.seed,
        "num_envs": d["num_envs"], "num_steps": d["num_steps"], "minibatch": d["num_envs"] * d["num_steps"] // m["num_minibatches"],
        "vf_coef": m["vf_coef"], "sb3_vf_coef": m["vf_coef"] / 2, "sb3_fused_adam": args.sb3_fused_adam, "device": args.device,
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "stable_baselines3": stable_baselines3.__version__},
        "machine": machine(),
    }
    if args.device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
