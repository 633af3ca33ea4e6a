"""The whole loop (``python train.py loop``) at tiny size: every stage runs, the report holds every
section with the command beside each figure, a second run reuses the agent, bad configs fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wandb_records import run_file

ROOT = Path(__file__).resolve().parents[1]

# The config's warmup, shrunk to 5x5 mazes and half the run, so the agent stage crosses into its main envs.
TINY_AGENT = ["--data.env_kwargs.size=5", "--data.warmup_env_kwargs={size: 5}", "--data.warmup_env_steps=256",
              "--data.num_envs=8", "--data.num_steps=32", "--data.rollouts_per_epoch=2",
              "--data.eval_episodes=4", "--data.final_eval_episodes=4", "--data.eval_num_envs=4", "--model.num_minibatches=2",
              "--model.total_env_steps=512",
              "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false"]
TINY_PROBE = ["--data.episodes_per_version=8", "--data.num_envs=4", "--data.progress=false", "--trainer.max_epochs=1",
              "--trainer.enable_progress_bar=false"]
TINY_STEER = ["--model.coefficients=[-1,0,1]", "--model.episodes=4", "--model.num_mazes=4", "--trainer.enable_progress_bar=false"]


def run_loop(config: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "train.py", "loop", "-c", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


def test_the_maze_loop_runs_every_stage_and_writes_the_report(tmp_path):
    config = {
        "root": str(tmp_path / "loop"),
        "agent": {"config": "configs/ppo/maze.yaml", "args": TINY_AGENT},
        "probe": {"config": "configs/probe/maze.yaml", "seeds": [0, 1], "planning_episodes": 4, "args": TINY_PROBE},
        "steer": {"cheese": {"config": "configs/steer/maze.yaml", "args": TINY_STEER},
                  "top_right": {"config": "configs/steer/maze.yaml", "args": TINY_STEER + ["--model.vector_source=top_right"]},
                  "value_probe": {"config": "configs/steer/maze.yaml", "probe": "mc", "hook": "encoder.block1.hook_out",
                                  "args": TINY_STEER + ["--model.vector_norm=1.0"]}},
    }
    done = run_loop(config, tmp_path / "loop.yaml")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    root = tmp_path / "loop"
    for stage in ("agent", "probe_seed0", "probe_seed1", "steer_cheese", "steer_top_right", "steer_value_probe"):
        assert f"[loop] {stage}: done in" in done.stdout, stage
        assert (root / "logs" / f"{stage}.log").is_file()
        run_file(root / stage / "wandb")  # exactly one offline W&B run per stage
    report = (root / "report" / "report.md").read_text()
    for section in ("## Agent", "## Value probes", "## Planning", "## Steering: cheese", "## Steering: top_right", "## Steering: value_probe",
                    "per-maze cheese vector (`cheese`): the published effect", "per-maze top-right vector (`top_right`)",
                    "| probe:mc |", "| ridge |", "| lstd |", "| critic |", "| random_net |", "± ",
                    "| probe:mc vs ridge |", "| probe:td vs lstd |"):
        assert section in report, section
    for line in report.splitlines():
        if line.startswith("!["):
            target = line.split("(", 1)[1].rstrip(")")
            assert (root / "report" / target).stat().st_size > 1000, target
    regenerate = [line for line in report.splitlines() if line.startswith("Regenerate:")]
    assert regenerate and all("python train.py " in line for line in regenerate), "every figure names its command"
    assert "| probe run | probe:mc | critic | test episodes |" in report, "the headline probe names its configuration"
    for seed in (0, 1):  # the per-seed table reads each run's summary, the test split's composition included
        summary = json.loads((root / f"probe_seed{seed}" / "version_0" / "summary.json").read_text())
        comp = summary["test_split"]["policy"]
        assert comp["episodes"] > 0 and 0 <= comp["states_in_cut"] <= comp["states"]
        (line,) = [x for x in report.splitlines() if x.startswith(f"| probe_seed{seed} |")]
        assert line.split(" | ")[3:5] == [str(comp["episodes"]), str(comp["cut_episodes"])], line

    agent_only = {"root": config["root"], "agent": config["agent"]}
    again = run_loop(agent_only, tmp_path / "again.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[loop] agent: reusing" in again.stdout and "[loop] agent: done in" not in again.stdout
    retrained = run_loop({"root": config["root"], "agent": {**config["agent"], "args": TINY_AGENT + ["--seed_everything=3"]}},
                         tmp_path / "other.yaml")
    assert retrained.returncode == 0 and "[loop] agent: done in" in retrained.stdout, "other arguments train a new agent"


def test_a_bad_loop_config_is_a_one_line_error(tmp_path):
    done = run_loop({"root": str(tmp_path / "x"), "agnet": {}}, tmp_path / "bad.yaml")
    assert done.returncode != 0
    assert "unknown section(s) ['agnet']; valid: ['agent', 'probe', 'root', 'steer']" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name, agent_args, probe_args", [
    ("minigrid_doorkey", ["--data.num_envs=4", "--data.num_steps=32", "--data.rollouts_per_epoch=2", "--data.eval_episodes=4",
                          "--data.eval_num_envs=4", "--model.num_minibatches=2", "--model.total_env_steps=256"],
     ["--data.episodes_per_version=6", "--data.num_envs=3"]),
    ("breakout", ["--data.num_envs=2", "--data.num_steps=32", "--data.rollouts_per_epoch=2", "--data.eval_episodes=2",
                  "--data.eval_num_envs=2", "--model.num_minibatches=2", "--model.total_env_steps=128"],
     ["--data.episodes_per_version=2", "--data.num_envs=2"]),
])
def test_the_minigrid_and_breakout_loops_run_end_to_end(tmp_path, name, agent_args, probe_args):
    shipped = yaml.safe_load((ROOT / "configs" / "loop" / f"{name}.yaml").read_text())
    # A tiny run may see no reward at all, which leaves the mc probe exactly zero (no direction to steer
    # along); the unsupervised probe has unit norm by construction.
    config = {
        "root": str(tmp_path / "loop"),
        "agent": {**shipped["agent"], "args": agent_args + ["--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false"]},
        "probe": {**shipped["probe"], "seeds": [0], "planning_episodes": 2 if name == "minigrid_doorkey" else 0,
                  "args": probe_args + ["--data.progress=false", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]},
        "steer": {k: {**v, "probe": "unsupervised", "args": ["--model.coefficients=[-1,0,1]", "--model.episodes=2", "--trainer.enable_progress_bar=false"]}
                  for k, v in shipped["steer"].items()},
    }
    done = run_loop(config, tmp_path / "loop.yaml")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = (tmp_path / "loop" / "report" / "report.md").read_text()
    for section in ("## Agent", "## Value probes", "| probe:mc |", "| ridge |", "## Steering: value_probe"):
        assert section in report, section
    assert ("## Planning" in report) == (name == "minigrid_doorkey")


def _row(source: str, c: float, **metrics: tuple[float, float, float]) -> dict:
    row = {"source": source, "coefficient": c}
    for name, (value, lo, hi) in metrics.items():
        row.update({name: value, f"{name}_lo": lo, f"{name}_hi": hi})
    return row


def test_the_steering_verdict_follows_the_intervals_it_quotes():
    from loop import steering_verdicts

    def steering_verdict(scan):
        verdicts = steering_verdicts(scan)
        return verdicts[0] if verdicts else None

    base = _row("cheese", 0, p_decision_cheese=(0.8, 0.7, 0.88), p_cheese=(0.6, 0.5, 0.7))
    weak = _row("cheese", -1, p_decision_cheese=(0.75, 0.65, 0.84), p_cheese=(0.6, 0.5, 0.7))
    ignores = _row("cheese", -2, p_decision_cheese=(0.2, 0.13, 0.29), p_cheese=(0.3, 0.2, 0.4))
    control = [_row("random", c, p_decision_cheese=(0.78, 0.68, 0.86)) for c in (-1, -2)]
    verdict = steering_verdict([base, weak, ignores, *control])
    assert "per-maze cheese vector (`cheese`): the published effect **reproduces**" in verdict
    assert "at coefficient -2, P(first move toward the cheese at the decision square) 0.20 [0.13, 0.29] (x0.25) against 0.80 [0.70, 0.88]" in verdict
    assert "0.78 [0.68, 0.86] for the matched random control" in verdict and "P(reach cheese) 0.30 [0.20, 0.40]" in verdict
    control_too = [_row("random", c, p_decision_cheese=(0.2, 0.1, 0.3)) for c in (-1, -2)]
    assert "does not reproduce as a vector-specific effect" in steering_verdict([base, weak, ignores, *control_too])
    assert "**does not reproduce** (the figure does not leave the unsteered interval at any coefficient up to -1)" in steering_verdict(
        [base, weak, *control])
    # The top-right vector is judged on the corner metric, in the other direction.
    tr_base = _row("top_right", 0, p_decision_top_right=(0.3, 0.2, 0.4), p_top_right=(0.5, 0.4, 0.6))
    tr_up = _row("top_right", 2, p_decision_top_right=(0.7, 0.6, 0.8), p_top_right=(0.6, 0.5, 0.7))
    tr_down = _row("top_right", -2, p_decision_top_right=(0.05, 0.01, 0.1), p_top_right=(0.5, 0.4, 0.6))
    assert "**reproduces**: at coefficient 2" in steering_verdict([tr_base, tr_up, tr_down, _row("random", 2, p_decision_top_right=(0.3, 0.2, 0.4))])
    both = steering_verdicts([tr_base, tr_up, tr_down])
    assert len(both) == 2 and "Adding the per-maze top-right vector" in both[0] and "Subtracting the per-maze top-right vector" in both[1]
    assert steering_verdicts([_row("top_right", 0, p_top_right=(0.5, 0.4, 0.6)), _row("top_right", -2, p_top_right=(0.1, 0.05, 0.2))])[0].startswith(
        "Subtracting the per-maze top-right vector (`top_right`): the published effect **reproduces**: at coefficient -2, P(reach the top-right corner)")
    assert steering_verdict([_row("probe", 0, p_cheese=(0.5, 0.4, 0.6))]) is None, "no published effect for a probe direction"


def test_closed_form_gaps_take_the_largest_difference_over_seeds_per_hook():
    from loop import closed_form_gaps

    def table(mc, ridge, td, lstd):
        rows = [("probe:mc", mc), ("ridge", ridge), ("probe:td", td), ("lstd", lstd)]
        return [{"source": s, "hook": h, "version": "policy", "r2_return": v[i]} for s, v in rows for i, h in enumerate("ab")] + [
            {"source": "probe:mc", "hook": "a", "version": "eps:0.5", "r2_return": 9.0}]  # other versions do not count

    seeds = [table((0.5, 0.1), (0.5, 0.2), (0.0, -1.0), (0.01, -1.0)), table((0.3, 0.1), (0.33, 0.1), (0.2, 0.2), (0.2, 0.2))]
    gaps = closed_form_gaps(seeds, "policy")
    assert gaps.keys() == {"probe:mc vs ridge", "probe:td vs lstd"}
    assert gaps["probe:mc vs ridge"] == pytest.approx({"a": 0.03, "b": 0.1})
    assert gaps["probe:td vs lstd"] == pytest.approx({"a": 0.01, "b": 0.0})
    assert closed_form_gaps([[{"source": "probe:mc", "hook": "a", "version": "policy", "r2_return": 0.1}]], "policy") == {}
