"""What one full-batch probe step costs, with V(s_{t+1}) read from the batch against computed from ``x_next``.

Why it exists: a full-batch step of the probe config (every loss configuration at every served hook point,
``lightning_modules.value_probe.ValueProbe``) is memory-bound: its cost is the passes over the activations.
The TD configurations need every head's value at s_{t+1}. A full batch holds the successor of every
transition but an episode's last, so the probe reads those values from the ones it has just computed at
s_t and runs the heads over ``x_next`` only for the rest (``ValueProbe._next_values``). This script times
the step (loss, backward, Adam) both ways on the same batch and model, alternating so that machine load
falls on both alike, and checks that the two give the same loss.

Run (needs a trained agent and its cache, e.g. after ``python train.py loop -c configs/loop/maze.yaml``)::

    python benchmarks/probe_step.py --agent_ckpt runs/loop_maze/agent/version_0/checkpoints/last.ckpt \\
        --cache_dir runs/loop_maze/cache

It prints a table, then one JSON object on its last line (``read_ms``, ``direct_ms``: median milliseconds
per step; ``ratio`` = direct / read; ``transitions``, ``features``: the batch's size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _report import machine, report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import lightning as L
    import torch
    import yaml

    from datamodules.trajectories import TrajectoryDataModule
    from lightning_modules.value_probe import ValueProbe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agent_ckpt", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "probe" / "maze.yaml")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = yaml.safe_load(args.config.read_text())
    data = config["data"]["init_args"]
    dm = TrajectoryDataModule(agent_ckpt=args.agent_ckpt, cache_dir=args.cache_dir, versions=data["versions"],
                              episodes_per_version=data["episodes_per_version"], batch_size=0, progress=False)
    dm.prepare_data()  # a cache that does not match the config is an error here, not a silent rebuild
    dm.setup("fit")

    class Direct(ValueProbe):
        """The same probe computing every next-state value from ``x_next`` (the second pass the read skips)."""

        def _next_values(self, configs, hook, v, x_next, at, found):
            return self.values(configs, hook, x_next)

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.datamodule = dm
    batch = next(iter(dm.train_dataloader()))
    steps, losses = {}, {}
    for name, cls in (("read", ValueProbe), ("direct", Direct)):
        torch.manual_seed(0)
        model = cls(configs=config["model"]["init_args"]["configs"])
        model.trainer = trainer
        model.setup("fit")
        model.log_dict = lambda *a, **k: None  # no loop to log into
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        def step(model=model, opt=opt) -> float:
            loss = model._loss(batch, "train")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        losses[name] = step()  # the first step, from identical starting heads
        steps[name] = step
    times: dict[str, list[float]] = {"read": [], "direct": []}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    read, direct = statistics.median(times["read"]), statistics.median(times["direct"])
    report({"machine": machine(), "threads": args.threads, "transitions": len(batch["reward"]),
            "features": sum(x.shape[1] for x in batch["x"].values()),
            "first_loss_read": losses["read"], "first_loss_direct": losses["direct"],
            "read_ms": read, "direct_ms": direct, "ratio": direct / read}, digits=4)


if __name__ == "__main__":
    main()
