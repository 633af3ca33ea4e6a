"""How close the SGD-trained probes land on their closed forms, and what that costs: minibatch against full batch.

Why it exists: issue 5 asks for the ``td`` probe within 0.02 R^2 of LSTD (and ``mc`` within 0.02 of
ridge) at every layer of the default maze agent. Semi-gradient TD moves along features that barely
change within an episode at a rate scaled by 1 - gamma, and with minibatches the gradient noise
fills Adam's second moment there, so those directions stall. This script runs the probe config
(``configs/probe/maze.yaml``, the mc and td configurations only) twice per seed on the same cache,
as ``train.py fit`` subprocesses, one after the other:

- ``minibatch``: 12 epochs of 512-transition minibatches (the previous default);
- ``full_batch``: ``--data.batch_size 0`` and the probe config's own step count (the current default: 1500
  steps since commit 34fbf96, 1000 before, 200 until commit 64d25a8), in the whitened coordinates of the train
  split's Gram (``--model.precondition``, the default since issue 19);
- ``full_batch_plain``: the same without the preconditioner (Adam on the raw weights).

For each it prints the largest gap to the closed form over the hook points (R^2 against returns on
the policy's test episodes) and the wall time of the whole run (cache opening, ceilings, fit,
evaluation), and the ratio of the two times.

Run (needs a trained agent and its cache, e.g. after ``python train.py loop -c configs/loop/maze.yaml``)::

    python benchmarks/td_probe.py --agent_ckpt runs/loop_maze/agent/version_0/checkpoints/last.ckpt \\
        --cache_dir runs/loop_maze/cache --seeds 0 1 2

(``--settings full_batch`` runs only the full-batch fits; ``--episodes_per_version 120 --cache_dir D`` a smaller
cache of its own in D, since every SGD step reads every hook point's activations.) The probes run with
``--model.solver sgd``: the probe config solves them in closed form, and this is the check that SGD lands there.

It prints a table, then one JSON object on its last line (``<setting>/seed<k>/td_gap``, ``.../mc_gap``,
``.../wall_s`` and ``time_ratio``, full batch over minibatch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import machine, report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from innercritic.probing.findings import closed_form_gaps  # noqa: E402  (the loop report's convergence check)

SETTINGS = {
    "minibatch": ["--data.batch_size=512", "--trainer.max_epochs=12", "--trainer.check_val_every_n_epoch=1"],
    "full_batch": ["--data.batch_size=0"],  # the config's steps and validation interval (preconditioned: the default)
    "full_batch_plain": ["--data.batch_size=0", "--model.precondition=false"],  # Adam on the raw weights, as before
}


def gaps(summary: dict) -> dict[str, float]:
    """Largest |probe - closed form| R^2 gap over the hook points, for mc (ridge) and td (LSTD)."""
    found = closed_form_gaps([summary["table"]], "policy")
    return {f"{name}_gap": max(found[f"probe:{name} vs {closed}"].values()) for name, closed in (("mc", "ridge"), ("td", "lstd"))}


def run(agent_ckpt: str, cache_dir: str, seed: int, extra: list[str], root: Path) -> tuple[dict[str, float], float]:
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "-c", str(ROOT / "configs/probe/maze.yaml"),
           f"--data.agent_ckpt={agent_ckpt}", f"--data.cache_dir={cache_dir}", f"--seed_everything={seed}",
           f"--data.split_seed={seed}", f"--model.eval_seed={seed}", f"--trainer.default_root_dir={root}",
           "--model.configs={mc: {mc: 1.0}, td: {td: 1.0}}", "--model.solver=sgd", "--model.sgd_hooks=null", "--trainer.enable_progress_bar=false",
           "--data.progress=false", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"probe run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    (summary,) = root.rglob("summary.json")
    return gaps(json.loads(summary.read_text())), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agent_ckpt", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--episodes_per_version", type=int, default=None, help="the cache's size; default: the probe config's")
    args = parser.parse_args()
    size = [] if args.episodes_per_version is None else [f"--data.episodes_per_version={args.episodes_per_version}"]
    figures: dict[str, object] = {"machine": machine(), "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    walls = {name: 0.0 for name in args.settings}
    for seed in args.seeds:
        for name in args.settings:
            with tempfile.TemporaryDirectory() as tmp:
                found, wall = run(args.agent_ckpt, args.cache_dir, seed, SETTINGS[name] + size, Path(tmp))
            walls[name] += wall
            for key, value in found.items():
                figures[f"{name}/seed{seed}/{key}"] = value
            figures[f"{name}/seed{seed}/wall_s"] = wall
    if {"full_batch", "minibatch"} <= set(walls):
        figures["time_ratio"] = walls["full_batch"] / walls["minibatch"]
    report(figures)


if __name__ == "__main__":
    main()
