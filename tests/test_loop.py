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


def tiny_maze_loop(root: Path) -> dict:
    return {
        "root": str(root),
        "agent": {"config": "configs/ppo/maze.yaml", "args": TINY_AGENT},
        "probe": {"config": "configs/probe/maze.yaml", "seeds": [0, 1], "planning_episodes": 4, "args": TINY_PROBE},
        "steer": {"cheese": {"config": "configs/steer/maze.yaml", "args": TINY_STEER},
                  "top_right": {"config": "configs/steer/maze.yaml", "args": TINY_STEER + ["--model.vector_source=top_right"]},
                  "value_probe": {"config": "configs/steer/maze.yaml", "probe": "mc", "hook": "encoder.block1.hook_out",
                                  "args": TINY_STEER + ["--model.vector_norm=1.0"]}},
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny maze loop, run once from an empty folder: the reference the resumed run must equal."""
    base = tmp_path_factory.mktemp("uninterrupted")
    done = run_loop(tiny_maze_loop(base / "loop"), base / "loop.yaml")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # Kept aside: a later test reruns parts of this loop, which rewrites its report.
    (base / "reference_report.md").write_text((base / "loop" / "report" / "report.md").read_text())
    return base / "loop", done


def test_the_maze_loop_runs_every_stage_and_writes_the_report(uninterrupted, tmp_path):
    root, done = uninterrupted
    config = tiny_maze_loop(root)
    stages = ("agent", "probe", "steer")
    for k, stage in enumerate(stages, 1):
        assert f"[loop] stage {k}/{len(stages)} {stage}: done in" in done.stdout, stage
        assert (root / "logs" / f"{stage}.log").is_file()
        assert json.loads((root / stage / "stage.json").read_text())["status"] == "done"
    for run in ("agent", "probe_seed0", "probe_seed1", "steer_cheese", "steer_top_right", "steer_value_probe"):
        run_file(root / run / "wandb")  # exactly one offline W&B run per run folder, the seeds' included
    # Both seeds ran in the one process of the probe stage, each as the command that reruns it alone.
    probe_log = (root / "logs" / "probe.log").read_text()
    assert "[runs] 1/2: python train.py fit" in probe_log and "[runs] 2/2: python train.py fit" in probe_log
    assert json.loads((root / "probe" / "runs.json").read_text())[1][:3] == ["fit", "-c", "configs/probe/maze.yaml"]
    # The three scans ran in the one process of the steer stage, each writing its own run folder.
    steer_log = (root / "logs" / "steer.log").read_text()
    assert all(f"[runs] {k}/3: python train.py test" in steer_log for k in (1, 2, 3))
    for name in ("cheese", "top_right", "value_probe"):
        assert (root / f"steer_{name}" / "version_0" / "summary.json").is_file(), name
    report = (root / "report" / "report.md").read_text()
    for section in ("## Agent", "## Value probes", "## Planning", "## Steering: cheese", "## Steering: top_right", "## Steering: value_probe",
                    "per-maze cheese vector (`cheese`): the published effect", "per-maze top-right vector (`top_right`)",
                    "| probe:mc |", "| ridge |", "| lstd |", "| critic |", "| random_net |", "| ridge_critic |", "± ",
                    "### Positive control: the critic tower", "### Findings", "**Positive control holds**", "| exact |"):
        assert section in report, section
    assert "| probe:mc vs ridge |" not in report, "closed-form probes: no SGD convergence table to show"
    for line in report.splitlines():
        if line.startswith("!["):
            target = line.split("(", 1)[1].rstrip(")")
            assert (root / "report" / target).stat().st_size > 1000, target
    regenerate = [line for line in report.splitlines() if line.startswith("Regenerate:")]
    assert regenerate and all("python train.py " in line for line in regenerate), "every figure names its command"
    assert "| probe run | probe:td R² exact (episodes equal) | critic R² exact (episodes equal) |" in report, "the headline names its probe"
    loop_summary = json.loads((root / "report" / "summary.json").read_text())
    for seed in (0, 1):  # the per-seed table reads each run's summary, the test split's composition included
        summary = json.loads((root / f"probe_seed{seed}" / "version_0" / "summary.json").read_text())
        comp = summary["test_split"]["policy"]
        assert comp["episodes"] > 0 and 0 <= comp["states_in_cut"] <= comp["states"]
        (line,) = [x for x in report.splitlines() if x.startswith(f"| probe_seed{seed} |")]
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[8:10] == [str(comp["episodes"]), str(comp["cut_episodes"])], line
        headline = next(r for r in summary["table"] if r["source"] == "probe:td" and r["hook"] == "encoder.hook_hidden"
                        and r["version"] == "policy")
        assert loop_summary["probe"]["r2_exact"][seed] == headline["r2_exact_ep"], "the headline weighs test episodes equally"
        assert loop_summary["probe"]["r2_exact_ci"][seed] == [headline["r2_exact_ep_lo"], headline["r2_exact_ep_hi"]]
        assert loop_summary["probe"]["r2_exact_states"][seed] == headline["r2_exact"]
    assert set(loop_summary["stage_seconds"]) == set(stages) and all(v > 0 for v in loop_summary["stage_seconds"].values())
    assert loop_summary["probe"]["hook"] == "encoder.hook_hidden" and len(loop_summary["critic"]["r2_exact"]) == 2
    assert set(loop_summary["planning"]) == {"probe", "ridge", "critic", "exact", "policy", "random"}
    assert all(0 <= p["success"] <= 1 for p in loop_summary["planning"].values())
    assert min(loop_summary["control"]["r2_vs_critic"]) > 0.99, "linear by construction, even in a tiny agent"
    assert set(loop_summary["unsupervised"]["floors"]) == {"random_dir", "top_pc"}

    agent_only = {"root": config["root"], "agent": config["agent"]}
    again = run_loop(agent_only, tmp_path / "again.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[loop] stage 1/1 agent: skipped, finished earlier" in again.stdout and "agent: done in" not in again.stdout
    retrained = run_loop({"root": config["root"], "agent": {**config["agent"], "args": TINY_AGENT + ["--seed_everything=3"]}},
                         tmp_path / "other.yaml")
    assert retrained.returncode == 0 and "agent: done in" in retrained.stdout, "other arguments train a new agent"
    assert "[loop] stage 1/1 agent: rerun, its arguments changed since the earlier run" in retrained.stdout


def _figures(report: Path, root: Path) -> list[str]:
    """The report's lines without its wall times (the whole loop's and the agent's), paths made relative to the loop
    folder, run folders unnumbered (a redone stage writes its runs beside the interrupted ones, as version_1)."""
    import re

    return [re.sub(r"version_\d+", "version_N", line.replace(str(root), "<root>")) for line in report.read_text().splitlines()
            if not line.startswith("Regenerate everything") and not line.startswith("| wall_s |")]


def _wait_for(proc: subprocess.Popen, lines: list[str], marker: str, timeout: float = 600) -> None:
    import time

    start = time.time()
    for line in proc.stdout:
        lines.append(line)
        if marker(line) if callable(marker) else marker in line:
            return
        assert time.time() - start < timeout, f"no {marker!r} in {timeout} s"
    raise AssertionError(f"the loop ended before {marker!r}:\n{''.join(lines)[-3000:]}")


def _survivors(root: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


def test_a_loop_stopped_during_a_probe_stage_resumes_to_the_same_report(uninterrupted, tmp_path):
    import signal

    reference, _ = uninterrupted
    root = tmp_path / "loop"
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(tiny_maze_loop(root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "train.py", "loop", "-c", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    _wait_for(proc, lines, "stage 2/3 probe: python train.py runs")
    # Stopped while the stage is busy with its second seed: that run's folder exists once its loggers are up.
    for _ in range(1200):
        if list((root / "probe_seed1").glob("version_*/wandb_run_id")):
            break
        __import__("time").sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    assert "loop stopped by SIGTERM" in stderr.strip().splitlines()[-1]
    assert not _survivors(root), "a stage process outlived the loop"
    assert json.loads((root / "probe" / "stage.json").read_text())["status"] == "running"
    assert not (root / "report").exists()

    again = run_loop(yaml.safe_load(path.read_text()), path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "[loop] stage 1/3 agent: skipped, finished earlier" in again.stdout
    assert "[loop] stage 2/3 probe: redoing the interrupted run" in again.stdout
    for k, stage in ((2, "probe"), (3, "steer")):
        assert f"[loop] stage {k}/3 {stage}: done in" in again.stdout, stage
    assert _figures(root / "report" / "report.md", root) == _figures(reference.parent / "reference_report.md", reference)


def test_a_training_stage_stopped_midway_resumes_from_its_checkpoint_in_the_same_run(tmp_path):
    import signal

    import torch

    root = tmp_path / "loop"
    args = [a for a in TINY_AGENT if not a.startswith("--model.total_env_steps")] + ["--model.total_env_steps=16384"]
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump({"root": str(root), "agent": {"config": "configs/ppo/maze.yaml", "args": args}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "train.py", "loop", "-c", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    ckpt = root / "agent" / "version_0" / "checkpoints" / "last.ckpt"
    for _ in range(1200):
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["innercritic"]["env_steps"] >= 2048:
            break
        __import__("time").sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    assert not _survivors(root)
    stopped_at = torch.load(ckpt, weights_only=True)["innercritic"]["env_steps"]
    assert 2048 <= stopped_at < 16384
    run_id = (root / "agent" / "version_0" / "wandb_run_id").read_text().strip()

    again = run_loop(yaml.safe_load(path.read_text()), path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[loop] stage 1/1 agent: resuming the interrupted run from" in again.stdout
    assert sorted(p.name for p in (root / "agent").glob("version_*")) == ["version_0"], "one run folder: the same run"
    summary = json.loads((root / "agent" / "version_0" / "summary.json").read_text())
    assert summary["env_steps"] >= 16384
    with open(root / "agent" / "version_0" / "metrics.csv") as f:
        steps = [float(r["train/env_steps"]) for r in __import__("csv").DictReader(f) if r.get("train/env_steps")]
    assert steps[0] == 256 and max(steps) >= 16384 and any(s > stopped_at for s in steps), "one history, continued"
    assert (root / "agent" / "version_0" / "wandb_run_id").read_text().strip() == run_id
    runs = list((root / "agent" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), "both parts are the same W&B run"


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
    from innercritic.probing.findings import closed_form_gaps

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
