"""InnerCritic's command line: ``python train.py {fit,validate,test,predict} -c CONFIG [--section.arg value ...]``.

Built on LightningCLI, so every constructor argument of the model, the datamodule and the Trainer is
a flag (``--model.lr 3e-4``, ``--data.num_envs 32``, ``--trainer.devices 2``), ``--print_config``
prints the resolved config, and the resolved config is saved as ``config.yaml`` in the run folder.

Each run writes one folder, ``<default_root_dir>/version_N/``: ``config.yaml``, ``metrics.csv`` (the
local copy of every scalar), ``checkpoints/`` and ``summary.json``; the W&B run (offline unless
WANDB_MODE says otherwise, so nothing waits on a network) sits in ``<default_root_dir>/wandb/``.

    python train.py fit -c configs/ppo/maze.yaml
    python train.py fit -c configs/ppo/maze.yaml --ckpt_path runs/ppo_maze/version_0/checkpoints/last.ckpt
    python train.py loop -c configs/loop/maze.yaml    # the whole loop: train, collect, probe, plan, steer, report
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from callbacks.summary import RunSummary


def default_loggers(root: str, project: str = "innercritic") -> list:
    """A CSV copy of every scalar (it also names the run folder) and the W&B run beside it."""
    os.makedirs(root, exist_ok=True)
    return [CSVLogger(save_dir=root, name=""), WandbLogger(save_dir=root, project=project)]


class InnerCriticCLI(LightningCLI):
    """LightningCLI with InnerCritic's run layout: default loggers under default_root_dir and a summary."""

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or "runs")
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(cb, RunSummary) for cb in trainer.callbacks):
            trainer.callbacks.append(RunSummary())
        for cb in trainer.checkpoint_callbacks:
            if cb.save_last is None:  # Lightning's default checkpoint: keep last.ckpt too, what --ckpt_path resumes from
                cb.save_last = True
            if cb._save_on_train_epoch_end is None:
                # With check_val_every_n_epoch > 1 Lightning saves only after validation, so a run that stops
                # between validations (PPO stops at its env-step budget) would leave last.ckpt at the last
                # validation, not the agent summary.json judged and later stages load. ModelCheckpoint has
                # no public setter for this; its constructor argument is what we set.
                cb._save_on_train_epoch_end = True
        return trainer


def main(args: list[str] | None = None) -> InnerCriticCLI:
    # Offline unless the user chose a mode; set before anything touches wandb.
    os.environ.setdefault("WANDB_MODE", "offline")
    return InnerCriticCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs"},
        args=args,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["loop"]:  # the whole research loop: every stage is a run of this same CLI
        from loop import main as loop_main

        loop_main(sys.argv[2:])
    else:
        main()
