"""Bad input at the command line: one ``error: ...`` line, exit status 2, and nothing on disk touched.

Every case runs the real ``train.py`` (or the loop) in a subprocess, as a user would, against a folder
that already holds a run, a cache and a checkpoint; after each failure that folder must be exactly as
it was (no new ``version_N``, no W&B run, no file changed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_steering import tiny_agent, write_agent_ckpt

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
ENV.pop("INNERCRITIC_TRACEBACK", None)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A folder as a user has it: an agent checkpoint, a truncated copy, a run folder, a cache, a bad vector."""
    base = tmp_path_factory.mktemp("world")
    agent = write_agent_ckpt(tiny_agent(), base / "agent.ckpt")
    truncated = base / "truncated.ckpt"
    truncated.write_bytes(agent.read_bytes()[: agent.stat().st_size // 3])
    runs = base / "runs"
    (runs / "version_0").mkdir(parents=True)
    (runs / "version_0" / "summary.json").write_text('{"kept": true}')
    (base / "cache").mkdir()
    (base / "cache" / "manifest.json").write_text("{}")
    payload = b'{"kind": "innercritic.steering_vector", "version": 1, "hook": "encoder.block1.hook_out", "source": "x", "metadata": {}}'
    torch.save({"vector": torch.ones(3), "meta_json": torch.tensor(list(payload), dtype=torch.uint8)}, base / "wrong_shape.pt")
    (base / "runs_flat.json").write_text('["fit", "-c", "configs/probe/maze.yaml"]')  # one command, not a list of them
    (base / "runs_loop.json").write_text('[["loop", "-c", "configs/loop/maze.yaml"]]')
    return {"base": base, "agent": agent, "truncated": truncated, "runs": runs}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def cases(w: dict[str, Path]) -> list[tuple[list[str], str]]:
    runs, agent, truncated = f"--trainer.default_root_dir={w['runs']}", str(w["agent"]), str(w["truncated"])
    probe = ["fit", "-c", "configs/probe/maze.yaml", f"--data.cache_dir={w['base'] / 'cache'}", runs]
    steer = ["test", "-c", "configs/steer/maze.yaml", f"--model.agent_ckpt={agent}", runs]
    return [
        (["fit", "-c", "configs/ppo/maze.yaml", "--data.env", "MiniGrid-Nope-v0", runs], "unknown env id 'MiniGrid-Nope-v0'"),
        (["fit", "-c", "configs/ppo/maze.yaml", "--data.env_kwargs.size", "8", runs], "size=8 is invalid"),
        (["fit", "-c", "configs/ppo/maze.yaml", "--data.env_kwargs.cheese", "top_lft:5", runs], "cheese='top_lft:5'"),
        (["fit", "-c", "configs/ppo/maze.yaml", "--model.lr", "-0.001", runs], "model.lr must be positive, got -0.001"),
        (probe + [f"--data.agent_ckpt={agent}", "--data.hooks=[encoder.nope]"], "'encoder.nope'"),
        (steer + ["--model.coefficients=[]"], "coefficients is empty"),
        (steer + ["--model.vector_source=file", f"--model.vector_path={w['base'] / 'wrong_shape.pt'}"], "vector shape (3,) does not fit"),
        (probe + [f"--data.agent_ckpt={truncated}"], f"checkpoint {truncated!r} cannot be read"),
        (["fit", "-c", "configs/ppo/maze.yaml", f"--ckpt_path={truncated}", runs], f"checkpoint {truncated!r} cannot be read"),
        (probe[:1] + ["--ckpt_path", agent] + probe[1:] + [f"--data.agent_ckpt={agent}"],
         f"checkpoint {agent!r} is innercritic.ppo_agent, but ValueProbe needs innercritic-value-probe"),
        (["test", "-c", "configs/ppo/maze.yaml", runs], "`train.py test` needs a module with test_step, and PPO has none"),
        (steer + ["--model.vector_source=cheese", "--model.vector_norm=2"], "vector_source 'cheese' builds one per level"),
        (["runs", str(w["base"] / "nope.json")], "cannot be read as JSON"),
        (["runs", str(w["base"] / "runs_flat.json")], "must hold a non-empty JSON list of argument lists"),
        (["runs", str(w["base"] / "runs_loop.json")], "command 1 is `loop`; list fit/validate/test/predict commands only"),
        (["runs", str(w["base"] / "runs_flat.json"), "extra"], "train.py runs takes one runs file"),
    ]


def test_every_bad_input_is_one_error_line_with_exit_2_and_touches_nothing(world):
    before = snapshot(world["base"])
    failures = []
    for args, expected in cases(world):
        done = run(args)
        lines = done.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        problems = [what for what, bad in (
            ("exit status", done.returncode != 2), ("last line", not last.startswith("error: ") or expected not in last),
            ("traceback", "Traceback" in done.stderr), ("union dump", "Union subtypes" in done.stderr),
            ("disk", snapshot(world["base"]) != before)) if bad]
        if problems:
            failures.append((args, problems, done.returncode, done.stderr[-1500:]))
    assert not failures, failures


def test_a_failing_loop_stage_reports_the_stages_error(world, tmp_path):
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump({"root": str(tmp_path / "loop"), "agent": {"config": "configs/ppo/maze.yaml", "args": ["--model.lr=-1"]}}))
    done = subprocess.run([sys.executable, "train.py", "loop", "-c", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-2000:]
    assert last.startswith("error: loop stage 'agent' failed (exit 2): model.lr must be positive, got -1.0 -- full log:"), last
    assert not list((tmp_path / "loop" / "agent").glob("version_*")), "the failed stage left a run folder"


def test_the_traceback_is_there_when_asked_for(world):
    done = subprocess.run([sys.executable, "train.py", "fit", "-c", "configs/ppo/maze.yaml", "--model.lr", "-1",
                           f"--trainer.default_root_dir={world['runs']}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**ENV, "INNERCRITIC_TRACEBACK": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "model.lr must be positive" in done.stderr


def test_a_cache_mismatch_names_the_rebuild_flag_of_the_command_that_was_run(world, tmp_path):
    cache = tmp_path / "cache"
    collect = [sys.executable, "-m", "datamodules.trajectories", f"--agent_ckpt={world['agent']}", f"--cache_dir={cache}",
               "--episodes_per_version=2", "--num_envs=2", "--progress=false", "--versions=[policy]"]
    built = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert built.returncode == 0, built.stderr[-2000:]
    before = snapshot(cache)
    again = subprocess.run(collect + ["--gamma=0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 2 and last.startswith("error: ") and "gamma" in last and "Traceback" not in again.stderr
    assert last.endswith("(to replace it: --rebuild true)"), last
    probe = run(["fit", "-c", "configs/probe/maze.yaml", f"--data.agent_ckpt={world['agent']}", f"--data.cache_dir={cache}",
                 "--data.episodes_per_version=2", "--data.num_envs=2", "--data.versions=[policy]", "--data.gamma=0.5",
                 "--data.progress=false", f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    assert probe.returncode == 2 and probe.stderr.strip().splitlines()[-1].endswith("(to replace it: --data.rebuild true)")
    assert snapshot(cache) == before and not (tmp_path / "runs").exists()
