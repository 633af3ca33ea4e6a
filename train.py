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

Bad input (an unknown env id, a hook point that does not exist, a checkpoint that cannot be read or
is of the wrong kind, a value out of range) ends the command with one ``error: ...`` line on stderr
and exit status 2, and the run folder and W&B run the failed command had started are removed; set
``INNERCRITIC_TRACEBACK=1`` to see the traceback as well.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from callbacks.summary import RunSummary
from innercritic.errors import InnerCriticError, exit_on_user_error

# What each stage needs the module to define; a module without it cannot run that command.
STAGE_STEPS = {"fit": "training_step", "validate": "validation_step", "test": "test_step", "predict": "predict_step"}


class NewRuns:
    """The run folders (``version_N``) and W&B runs a command creates, so that a failed one leaves none."""

    def __init__(self) -> None:
        self.roots: dict[Path, set[Path] | None] = {}

    def watch(self, root: str | Path) -> None:
        root = Path(root)
        if root not in self.roots:
            self.roots[root] = set(self._entries(root)) if root.exists() else None

    def remove(self) -> None:
        """Close the W&B run, then delete what appeared under each watched root since :meth:`watch`."""
        import contextlib
        import io

        import wandb

        # Quietly: its closing lines would point the user at the folder about to be removed.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if wandb.run is not None:
                wandb.finish(exit_code=1)
            wandb.teardown(exit_code=1)  # its service would otherwise write its logs into the run folder at exit
        for root, before in self.roots.items():
            if before is None:  # the command made the folder itself: all of it is new
                shutil.rmtree(root, ignore_errors=True)
                continue
            for entry in set(self._entries(root)) - before:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            if (root / "wandb").is_dir() and not any((root / "wandb").iterdir()):
                (root / "wandb").rmdir()

    @staticmethod
    def _entries(root: Path) -> list[Path]:
        return list(root.glob("version_*")) + list((root / "wandb").glob("*"))


def default_loggers(root: str, project: str = "innercritic") -> list:
    """A CSV copy of every scalar (it also names the run folder) and the W&B run beside it."""
    os.makedirs(root, exist_ok=True)
    wandb_logger = WandbLogger(save_dir=root, project=project)
    # Lightning always passes wandb.init an `anonymous` key (None unless asked for), and wandb warns on every
    # run that the setting has no effect; dropping the unset key is the whole fix.
    if wandb_logger._wandb_init.get("anonymous") is None:
        wandb_logger._wandb_init.pop("anonymous", None)
    return [CSVLogger(save_dir=root, name=""), wandb_logger]


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party_noise() -> None:
    """Silence the lines every run would print that say nothing about the user's run; real warnings stay.

    - Lightning's advertising tips (litlogger, litmodels), logged at INFO on every fit;
    - torch's deprecation of ``LeafSpec``, which Lightning's own pytree helper still uses;
    - Lightning's warning that an IterableDataset with ``__len__`` may miscount under multi-worker
      loading: the datamodules' iterable datasets are step counters loaded in the main process
      (``num_workers`` 0), and the length is what gives the progress bar its total.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)


class InnerCriticCLI(LightningCLI):
    """LightningCLI with InnerCritic's run layout: default loggers under default_root_dir and a summary.

    ``new_runs`` records the folders this command creates, for :func:`main` to remove on a user error.
    """

    def __init__(self, *args: Any, new_runs: NewRuns | None = None, **kwargs: Any) -> None:
        self.new_runs = new_runs or NewRuns()
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        self.new_runs.watch(config.get("default_root_dir") or "runs")
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

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path here, before anything is built, to restore the model's settings: a file
        # that cannot be read or holds another kind of module fails first, as one line naming the file.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            model = self.config[subcommand].get("model")
            class_path = model.get("class_path") if hasattr(model, "get") else None
            check_checkpoint_kind(ckpt_path, _import(class_path) if class_path else None)
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        model = self.model
        step = STAGE_STEPS.get(subcommand)
        if step and getattr(type(model), step) is getattr(L.LightningModule, step):
            able = [cmd for cmd, name in STAGE_STEPS.items() if getattr(type(model), name) is not getattr(L.LightningModule, name)]
            raise InnerCriticError(f"`train.py {subcommand}` needs a module with {step}, and {type(model).__name__} has none; "
                                   f"{type(model).__name__} runs: {', '.join(able)}")
        super()._run_subcommand(subcommand)


def _import(class_path: str) -> type | None:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse names a bad class_path itself


def check_checkpoint_kind(path: str | Path, model_class: type | None) -> None:
    """A one-line error, naming the file, when ``path`` cannot be read or was written by another kind of module."""
    from innercritic.agents.checkpoint import describe_checkpoint, read_checkpoint

    got = describe_checkpoint(read_checkpoint(path))
    needs = getattr(model_class, "CHECKPOINT_KIND", None)
    if needs is not None and got != needs:
        raise InnerCriticError(f"checkpoint {str(path)!r} is {got}, but {model_class.__name__} needs {needs}: "
                               "pass a checkpoint that a `train.py fit` of the same kind of module wrote")


def main(args: list[str] | None = None) -> InnerCriticCLI:
    """Run the CLI; a user error propagates (as an exception) after the folders it started are removed."""
    # Offline unless the user chose a mode; set before anything touches wandb.
    os.environ.setdefault("WANDB_MODE", "offline")
    quiet_third_party_noise()
    new_runs = NewRuns()
    try:
        return InnerCriticCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": "runs"},
            args=args,
            new_runs=new_runs,
        )
    except Exception as err:
        from innercritic.errors import user_error

        if user_error(err) is not None:
            new_runs.remove()
        raise


if __name__ == "__main__":
    if sys.argv[1:2] == ["loop"]:  # the whole research loop: every stage is a run of this same CLI
        from loop import main as loop_main

        loop_main(sys.argv[2:])
    else:
        exit_on_user_error(main)
