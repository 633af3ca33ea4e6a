"""Writes ``summary.json`` into the run's log directory when a fit or a test run ends.

Every run leaves its final figures beside the config that made them, so a result can be quoted
without opening W&B. The module supplies the figures through a ``summary()`` method; the config is
the resolved hyperparameters of the module and the datamodule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from innercritic.cache.format import jsonable


def run_dir(trainer: L.Trainer) -> Path:
    """The folder this run writes into (the first logger's log_dir, else default_root_dir)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class RunSummary(L.Callback):
    """Collects ``pl_module.summary()`` and the config into ``<log_dir>/summary.json`` on rank 0."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        figures = pl_module.summary() if hasattr(pl_module, "summary") else {}
        # trainer.log_dir broadcasts from rank 0, a collective: every rank must ask, not rank 0 alone.
        self._write(trainer, pl_module, figures, run_dir(trainer))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs that only test (a steering scan: `train.py test`) have no fit end; write the same file.
        if not hasattr(pl_module, "summary"):
            return
        self._write(trainer, pl_module, pl_module.summary(), run_dir(trainer))

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, figures: dict[str, Any], out: Path) -> None:
        config = {"model": {"class": type(pl_module).__name__, **dict(pl_module.hparams)}}
        dm = trainer.datamodule
        if dm is not None:
            config["data"] = {"class": type(dm).__name__, **dict(dm.hparams)}
        config["trainer"] = {"world_size": trainer.world_size, "max_epochs": trainer.max_epochs, "precision": str(trainer.precision)}
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(jsonable({**figures, "config": config}), indent=2))
        os.replace(tmp, out / "summary.json")
        for logger in trainer.loggers:  # W&B keeps them as run summary too
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "summary"):
                experiment.summary.update({k: v for k, v in jsonable(figures).items() if isinstance(v, (int, float))})
