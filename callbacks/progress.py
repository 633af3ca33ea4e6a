"""A training progress bar over the whole run, with its total and ETA, instead of one bar per epoch.

Lightning's ``TQDMProgressBar`` restarts every epoch; a PPO run (``max_epochs -1``, stopped at its
env-step budget) then shows no total at all, and a full-batch probe fit (one step per epoch) prints
``Epoch N: 1/1`` a thousand times. This bar counts the run in the module's own unit when it has one
(``progress() -> (done, total, unit)``: PPO's env steps of ``total_env_steps``), else in optimizer
steps of ``trainer.estimated_stepping_batches``; the epoch goes into the description.

    python train.py fit -c configs/ppo/maze.yaml     # train.py installs it when the progress bar is on
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["RunProgressBar", "run_progress"]


def run_progress(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[float, float | None, str]:
    """(done, total, unit) of the run so far; total None when nothing bounds it."""
    if hasattr(pl_module, "progress"):
        return pl_module.progress()
    total = trainer.estimated_stepping_batches
    return trainer.global_step, (None if not math.isfinite(total) else total), "steps"


class RunProgressBar(TQDMProgressBar):
    """One bar for the whole fit: done / total in the module's unit (see :func:`run_progress`), with ETA."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        done, total, unit = run_progress(trainer, pl_module)
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.unit = f" {unit}"
        self.train_progress_bar.initial = done  # a resumed run starts where it stopped; the rate counts this run
        self.train_progress_bar.n = done
        self._drawn_at = -math.inf  # when the bar was last redrawn (monotonic seconds)

    # The bar is redrawn at most this often (tqdm's own default throttle, which its update() applies and an
    # explicit refresh() does not): a full-batch probe step takes milliseconds, and three redraws of the bar
    # (with its metrics read back) per step were a tenth of the fit.
    min_interval_s = 0.1

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        done, total, _ = run_progress(trainer, pl_module)
        if total is not None and bar.total != total:
            bar.total = total
        if self._should_update(int(done), bar.total):
            bar.n = done
            self._draw(trainer, pl_module, last=bar.total is not None and done >= bar.total)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:  # the epoch's validation metrics, at the bar's next redraw at the latest
            self._draw(trainer, pl_module, last=trainer.current_epoch + 1 >= (trainer.max_epochs or 0) > 0)

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, last: bool) -> None:
        bar, now = self.train_progress_bar, time.monotonic()
        if last or now - self._drawn_at >= self.min_interval_s:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
            self._drawn_at = now
