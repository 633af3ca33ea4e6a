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
    python train.py runs RUNS.json                    # several commands (a JSON list of argument lists) in one process

Bad input (an unknown env id, a hook point that does not exist, a checkpoint that cannot be read or
is of the wrong kind, a value out of range) ends the command with one ``error: ...`` line on stderr
and exit status 2, and the run folder and W&B run the failed command had started are removed; set
``INNERCRITIC_TRACEBACK=1`` to see the traceback as well.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from callbacks.progress import RunProgressBar
from callbacks.summary import RunSummary
from innercritic.errors import InnerCriticError, exit_on_user_error

SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # Lightning's names, not files
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
                # A link (W&B's latest-run) is unlinked, never followed: rmtree refuses links, and its target is new too.
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            if (root / "wandb").is_dir() and not any((root / "wandb").iterdir()):
                (root / "wandb").rmdir()

    @staticmethod
    def _entries(root: Path) -> list[Path]:
        return list(root.glob("version_*")) + list((root / "wandb").glob("*"))


class _KeepingWriter(ExperimentWriter):
    """CSVLogger's writer, continuing an existing ``metrics.csv`` instead of deleting it (a resumed run).

    Rows of epochs after ``keep_until_epoch`` (logged after the checkpoint the run resumes from, by the
    run that was stopped) are dropped, since the resumed run logs them again. The epoch, not the step,
    decides: a training step logs under the global step it started at, so the row of the step that
    followed the checkpoint carries the checkpoint's own step, while the validation rows of the
    checkpoint's epoch carry it too and must stay.
    """

    def __init__(self, log_dir: str, keep_until_epoch: int | None) -> None:
        self.keep_until_epoch = keep_until_epoch
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            self.metrics_keys = sorted(reader.fieldnames or [])
            rows = list(reader)
        if self.keep_until_epoch is not None:
            kept = [r for r in rows if not r.get("epoch") or float(r["epoch"]) <= self.keep_until_epoch]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger whose given ``version`` continues that folder's metrics.csv: one history per run."""

    def __init__(self, *args: Any, keep_until_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_until_epoch = keep_until_epoch

    @property
    @rank_zero_experiment  # as CSVLogger's own: the other DDP ranks get a dummy and write nothing
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.keep_until_epoch)
        return self._experiment


def resumed_version(root: str | Path, ckpt_path: str | None, epoch: int) -> tuple[int, int] | None:
    """(N, ``epoch``) when ``ckpt_path`` lies in ``root/version_N/checkpoints/`` (a run resumed in place;
    ``epoch`` is the checkpoint's), else None."""
    if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
        return None
    ckpt = Path(ckpt_path).resolve()
    run = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and run.parent == Path(root).resolve() and re.fullmatch(r"version_\d+", run.name):
        return int(run.name.split("_")[1]), int(epoch)
    return None


def default_loggers(root: str, project: str = "innercritic", resume: tuple[int, int] | None = None) -> list:
    """A CSV copy of every scalar (it also names the run folder) and the W&B run beside it.

    ``resume`` (version N, epoch) continues that run folder: its metrics.csv goes on after the
    checkpoint's epoch, and the W&B run keeps the id stored in the folder's ``wandb_run_id``, so the
    curves are one history.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    os.makedirs(root, exist_ok=True)
    version, epoch = resume if resume is not None else (None, None)
    csv_logger = ResumableCSVLogger(save_dir=root, name="", version=version, keep_until_epoch=epoch)
    run_id = None
    if rank_zero_only.rank == 0:  # the other DDP ranks log nothing, and must not claim a version folder of their own
        run_dir = Path(csv_logger.log_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]  # a W&B run id: lowercase letters and digits
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    wandb_logger = WandbLogger(save_dir=root, project=project, id=run_id)  # Lightning passes resume="allow"
    # Lightning always passes wandb.init an `anonymous` key (None unless asked for), and wandb warns on every
    # run that the setting has no effect; dropping the unset key is the whole fix.
    if wandb_logger._wandb_init.get("anonymous") is None:
        wandb_logger._wandb_init.pop("anonymous", None)
    return [csv_logger, wandb_logger]


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
        self.ckpt_epoch = 0  # of --ckpt_path, read once while checking it
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any):
        parser = super().init_parser(**kwargs)
        # `loop` is dispatched before LightningCLI parses anything; name it where a user looks for commands.
        parser.epilog = ("also: train.py loop -c CONFIG [--root DIR] [--section.key VALUE ...]   the whole research loop "
                         "(train, collect, probe, plan, steer, report), resumable; `train.py loop --help` for its options")
        return parser

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or "runs"
        self.new_runs.watch(root)
        if config.get("logger") in (None, True):
            resume = resumed_version(root, self._get(self.config_init, "ckpt_path"), self.ckpt_epoch)
            kwargs["logger"] = default_loggers(root, resume=resume)
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            kwargs["callbacks"] = callbacks + [RunProgressBar()]  # totals and ETA over the whole run
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
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS:
            model = self.config[subcommand].get("model")
            class_path = model.get("class_path") if hasattr(model, "get") else None
            ckpt = check_checkpoint_kind(ckpt_path, _import(class_path) if class_path else None)
            self.ckpt_epoch = int(ckpt.get("epoch", 0)) if isinstance(ckpt, dict) else 0
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


def check_checkpoint_kind(path: str | Path, model_class: type | None) -> Any:
    """The checkpoint at ``path``; a one-line error, naming the file, when it cannot be read or was
    written by another kind of module."""
    from innercritic.agents.checkpoint import describe_checkpoint, read_checkpoint

    ckpt = read_checkpoint(path)
    got = describe_checkpoint(ckpt)
    needs = getattr(model_class, "CHECKPOINT_KIND", None)
    if needs is not None and got != needs:
        raise InnerCriticError(f"checkpoint {str(path)!r} is {got}, but {model_class.__name__} needs {needs}: "
                               "pass a checkpoint that a `train.py fit` of the same kind of module wrote")
    return ckpt


def reuse_freed_memory() -> None:
    """Have glibc keep freed memory for the process's next allocations instead of handing it back at once.

    By default every block over 32 MB is its own mapping, returned to the system when freed, so each new split,
    moment matrix or prediction of a probe run (hundreds of megabytes each) is faulted in again page by page:
    measured on the default probe run, 28 s of system time in a 102 s run; with large blocks served from the heap
    and kept, 11 s in 87 s at the same peak memory (BENCHMARKS.md, "Probe stage: freed memory"). A no-op
    where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GB from the heap
    mallopt(m_trim_threshold, (1 << 31) - 1)  # keep up to 2 GB of freed heap for reuse


def main(args: list[str] | None = None) -> InnerCriticCLI:
    """Run the CLI; a user error propagates (as an exception) after the folders it started are removed."""
    # Offline unless the user chose a mode; set before anything touches wandb.
    os.environ.setdefault("WANDB_MODE", "offline")
    reuse_freed_memory()
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


def run_many(path: str | Path) -> None:
    """``python train.py runs RUNS.json``: each command of RUNS.json (a JSON list of argument lists, each what
    would follow ``python train.py``) run in order in this one process, each with its own run folder and
    W&B run, exactly as it would run alone.

    Why one process: the seeds of a probe sweep read the same trajectory cache, and a process of their
    own each would import everything, open and verify the cache and solve its exact values again
    (``datamodules.trajectories`` keeps an opened cache for the runs after the first). A user error in
    one command stops the rest (its own folders are removed, as for a lone command).
    """
    import gc
    import json

    path = Path(path)
    try:
        commands = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InnerCriticError(f"runs file {str(path)!r} cannot be read as JSON: {err}") from None
    if not isinstance(commands, list) or not commands or not all(isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in commands):
        raise InnerCriticError(f"runs file {str(path)!r} must hold a non-empty JSON list of argument lists, "
                               'e.g. [["fit", "-c", "configs/probe/maze.yaml", "--seed_everything=1"]]')
    for k, args in enumerate(commands, 1):
        if args[0] in ("loop", "runs"):
            raise InnerCriticError(f"runs file {str(path)!r}: command {k} is `{args[0]}`; list fit/validate/test/predict commands only")
    for k, args in enumerate(commands, 1):
        print(f"[runs] {k}/{len(commands)}: python train.py {' '.join(args)}", flush=True)
        argv, sys.argv = sys.argv, sys.argv[:1]  # the command is its own command line (LightningCLI warns at two)
        try:
            cli = main(args)
        finally:
            sys.argv = argv
        # LightningCLI registers instantiators that hold the CLI object in a registry that outlives it, so
        # its trainer, model and datamodule (a probe run's full-batch splits: gigabytes) would stay alive
        # through the next command: drop them (measured: 19.7 GB peak for three seeds before, BENCHMARKS.md).
        for attr in ("trainer", "model", "datamodule", "config_init"):
            if hasattr(cli, attr):
                setattr(cli, attr, None)
        del cli
        import wandb

        wandb.finish()  # each command's W&B run ends with it (a later wandb.init would otherwise continue it)
        gc.collect()  # the last run's full-batch splits (gigabytes) go before the next run gathers its own


if __name__ == "__main__":
    if sys.argv[1:2] == ["runs"]:
        if len(sys.argv) != 3:
            print("error: train.py runs takes one runs file: python train.py runs RUNS.json (a JSON list of argument lists, "
                  "each what follows `python train.py`)", file=sys.stderr)
            sys.exit(2)
        exit_on_user_error(lambda: run_many(sys.argv[2]))
    elif sys.argv[1:2] == ["loop"]:  # the whole research loop: every stage is a run of this same CLI
        from loop import main as loop_main

        loop_main(sys.argv[2:])
    else:
        exit_on_user_error(main)
