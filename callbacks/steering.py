"""Figures of a steering scan: metric-against-coefficient plots with intervals, and maze action maps.

After ``SteeringScan``'s test loop (activation addition, Turner et al. 2023; the cheese vector of
Mini et al. 2023), rank 0 draws

- ``steer_scan.png``: one panel per metric, every vector source (the vector and its random control)
  as a line over the coefficients with its 95% interval as a band;
- ``action_map_<k>.png``: for ``action_maps`` held-out mazes, the per-square action arrows of the
  unsteered and the steered agent and their difference (``innercritic.steering.action_map``);

saves them in the run folder, and logs them to W&B when a WandbLogger is attached: the images, a
``steer/scan_table`` table of every row, and a ``steer/plot/<metric>`` line chart per metric against
the coefficient (each source with its lower and upper 95% bounds as lines).

    python train.py test -c configs/steer/maze.yaml --model.agent_ckpt A.ckpt
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from callbacks.summary import run_dir
from innercritic.errors import InnerCriticError

# Panel order: what the protocol asks first. Rows lacking a metric (no maze) skip its panel.
PLOT_METRICS = ("p_decision_cheese", "p_decision_top_right", "p_target", "p_cheese", "p_top_right", "pi_decision_cheese", "pi_decision_top_right",
                "success", "return", "length", "kl", "value_change")
LABELS = {
    "p_target": "P(reach the retargeting square)",
    "p_cheese": "P(reach cheese)",
    "p_top_right": "P(reach top-right corner)",
    "p_decision_cheese": "P(first move to cheese | at decision sq.)",
    "p_decision_top_right": "P(first move to corner | at decision sq.)",
    "pi_decision_cheese": "pi(move to cheese) at decision sq.",
    "pi_decision_top_right": "pi(move to corner) at decision sq.",
    "success": "success",
    "return": "return",
    "length": "episode length",
    "kl": "KL(steered || unsteered)",
    "value_change": "critic value change",
}


class SteeringPlots(L.Callback):
    """Draws, saves and logs a steering scan's figures when the test loop ends (rank 0 only).

    Args:
        metrics: row metrics to plot, in panel order (None: every metric the rows have; p_cheese replaces success in the maze).
        action_maps: held-out mazes to draw action maps for (0: none; the maze only).
        action_map_coefficient: coefficient of the steered action maps (None: the scanned coefficient of largest magnitude).
        dpi: resolution of the saved PNGs.
    """

    def __init__(
        self,
        metrics: list[str] | None = None,
        action_maps: int = 2,
        action_map_coefficient: float | None = None,
        dpi: int = 110,
    ) -> None:
        super().__init__()
        if action_maps < 0:
            raise InnerCriticError(f"action_maps must be >= 0, got {action_maps}")
        unknown = [m for m in (metrics or []) if m not in PLOT_METRICS]
        if unknown:
            raise InnerCriticError(f"unknown metric(s) {unknown}; valid: {', '.join(PLOT_METRICS)}")
        self.metrics = metrics
        self.action_maps = int(action_maps)
        self.action_map_coefficient = action_map_coefficient
        self.dpi = int(dpi)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = getattr(pl_module, "scan_rows", None)
        if not rows:
            return
        out = run_dir(trainer)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        scan_png = out / "steer_scan.png"
        scan_figure(rows, self.metrics).savefig(scan_png, dpi=self.dpi)
        maps = self._action_maps(pl_module, out)
        if hasattr(pl_module, "figures"):
            pl_module.figures = [scan_png.name] + [p.name for p in maps]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("steer/scan_plot", [str(scan_png)])
                if maps:
                    logger.log_image("steer/action_maps", [str(p) for p in maps], caption=[p.stem for p in maps])
                columns, data = table(rows)
                logger.log_table("steer/scan_table", columns=columns, data=data)
                logger.experiment.log(line_plots(rows, self.metrics))

    def _action_maps(self, pl_module: L.LightningModule, out: Path) -> list[Path]:
        from innercritic.envs.factory import env_family
        from innercritic.steering import action_map_figure

        if self.action_maps == 0 or not getattr(pl_module, "vectors", None) or env_family(pl_module.env_spec) != "maze":
            return []
        coefficient = self.action_map_coefficient
        if coefficient is None:
            # The largest magnitude shows the vector's effect most plainly; a positive one wins a tie.
            coefficient = max(pl_module.coefficients, key=lambda c: (abs(c), c))
        hp = pl_module.hparams
        paths = []
        for k in range(self.action_maps):
            # Maze k is searched from its own seed block, so the pictures show different mazes.
            fig, _ = action_map_figure(pl_module.agent, pl_module.vectors[0], coefficient, pl_module.env_kwargs,
                                       seed=hp.seed + 7919 * (k + 1), positions=hp.positions)
            path = out / f"action_map_{k}.png"
            fig.savefig(path, dpi=self.dpi)
            paths.append(path)
        return paths


def scan_figure(rows: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> Any:
    """One panel per metric: a line per vector source over the coefficients, with its interval band."""
    from matplotlib.figure import Figure

    chosen = _chosen(rows, metrics)
    cols = min(4, max(1, len(chosen)))
    nrows = max(1, math.ceil(len(chosen) / cols))
    fig = Figure(figsize=(3.6 * cols, 2.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["source"], row["hook"]), []).append(row)
    for ax, metric in zip(axes, chosen):
        for (source, hook), group in groups.items():
            group = sorted(group, key=lambda r: r["coefficient"])
            x = [r["coefficient"] for r in group]
            y = [_num(r.get(metric)) for r in group]
            lo = [_num(r.get(f"{metric}_lo")) for r in group]
            hi = [_num(r.get(f"{metric}_hi")) for r in group]
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=source)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axvline(0.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
        ax.set_xlabel("coefficient", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    if chosen:
        axes[0].legend(fontsize=7)
    hooks = sorted({h for _, h in groups})
    episodes = rows[0].get("episodes")
    fig.suptitle(f"steering scan at {', '.join(hooks)} ({episodes} episodes per point, 95% intervals)", fontsize=10)
    return fig


def line_plots(rows: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """W&B line charts ``steer/plot/<metric>`` against the coefficient: each source's value and its bounds."""
    import wandb

    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["source"], []).append(row)
    charts = {}
    for metric in _chosen(rows, metrics):
        xs, ys, keys = [], [], []
        for source, group in groups.items():
            group = sorted(group, key=lambda r: r["coefficient"])
            for suffix, label in (("", source), ("_lo", f"{source} lower 95%"), ("_hi", f"{source} upper 95%")):
                xs.append([r["coefficient"] for r in group])
                # W&B charts drop None points; nan would break the JSON of the chart's table.
                ys.append([None if math.isnan(_num(r.get(metric + suffix))) else _num(r.get(metric + suffix)) for r in group])
                keys.append(label)
        charts[f"steer/plot/{metric}"] = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=LABELS.get(metric, metric), xname="coefficient")
    return charts


def _chosen(rows: Sequence[dict[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    present = [m for m in PLOT_METRICS if any(isinstance(r.get(m), (int, float)) for r in rows)]
    if metrics is None:
        return [m for m in present if not (m == "success" and "p_cheese" in present)]
    return [m for m in metrics if m in present]


def table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Rows as (columns, data) for a W&B table; nan becomes None and lists become strings."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    data = [[_cell(row.get(c)) for c in columns] for row in rows]
    return columns, data


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple, dict)):
        return str(value)
    return value
