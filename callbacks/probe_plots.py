"""Probe-vs-return figures for a value-probe run, saved as PNG beside the run and logged to W&B.

After a probe ``fit`` (or ``test``) the module's evaluation (``pl_module.results``) holds the table
and the data behind three figures:

- ``probe_vs_return.png``: predicted value against the Monte-Carlo return on the test states (and
  against the exact value of the policy in the maze), with the identity line;
- ``value_traces.png``: the probe's value along a few held-out episodes, with the return, the
  critic and (maze) the exact value overlaid;
- ``per_layer.png``: R^2 against returns per hook point for every probe configuration, next to the
  ridge and LSTD ceilings on the same layer, with the critic and the hook-free floors as lines;
- ``planning.png`` (when the run planned): success of each one-step-lookahead planner, the policy and
  a random policy, with 95% intervals.

It also writes each probe as plain tensors, ``probes/<config>@<hook>.pt`` (``weight`` (V, D) and
``bias`` (V,) on standardised activations, ``mean``, ``std``, ``hook``, ``config``): the file
``vector_source: probe`` of a steering scan reads.

The figures are written on rank 0 only; the headline scalars go to every logger (the CSV copy too)
under ``eval/<source>/<metric>``, the whole table to W&B as a table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from callbacks.summary import run_dir

__all__ = ["ProbePlots", "draw_probe_figures", "export_probes"]



def _finite(x: Any) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else math.nan


def draw_probe_figures(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Draw the three probe figures into ``out_dir``; returns {name: png path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig_data, table = results["figures"], results["table"]
    policy = results["version_names"][0]
    paths: dict[str, Path] = {}

    targets = [("return", fig_data["ret"])] + ([("exact value", fig_data["exact"])] if fig_data.get("exact") else [])
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 4.2), squeeze=False)
    for ax, (label, target) in zip(axes[0], targets):
        ax.scatter(target, fig_data["pred"], s=4, alpha=0.4)
        lo = min(min(target), min(fig_data["pred"]))
        hi = max(max(target), max(fig_data["pred"]))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"probe ({fig_data['config']})")
        ax.set_title(f"{fig_data['hook']}: probe vs {label}", fontsize=9)
    fig.tight_layout()
    paths["probe_vs_return"] = out_dir / "probe_vs_return.png"
    fig.savefig(paths["probe_vs_return"], dpi=110)
    plt.close(fig)

    traces = fig_data["traces"]
    fig, axes = plt.subplots(1, max(1, len(traces)), figsize=(4 * max(1, len(traces)), 3.4), squeeze=False)
    for ax, tr in zip(axes[0], traces):
        ax.plot(tr["step"], tr["return"], "k-", lw=1.5, label="return")
        ax.plot(tr["step"], tr["probe"], "C0-", label="probe")
        ax.plot(tr["step"], tr["critic"], "C1:", label="critic")
        if tr.get("exact"):
            ax.plot(tr["step"], tr["exact"], "C2--", label="exact")
        ax.set_title(f"test episode {tr['episode']}", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths["value_traces"] = out_dir / "value_traces.png"
    fig.savefig(paths["value_traces"], dpi=110)
    plt.close(fig)

    rows = [r for r in table if r["version"] == policy]
    # The maze's headline figure where there is one: R^2 against the exact value, each test episode weighted the same.
    metric = "r2_exact_ep" if any("r2_exact_ep" in r for r in rows) else "r2_return"
    hooks = list(dict.fromkeys(r["hook"] for r in rows if r["hook"] is not None))
    sources = list(dict.fromkeys(r["source"] for r in rows if r["hook"] is not None and r["source"] not in ("random_dir",)))
    # A closed-form probe is its ceiling (probe:td is LSTD): draw one bar, not two equal ones.
    solved = {f"probe:{name}" for name in results.get("closed_form", ())}
    twins = {"ridge": "probe:mc", "lstd": "probe:td", "ridge_critic": "probe:critic"}
    sources = [s for s in sources if not (twins.get(s) in solved and twins[s] in sources)]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 1.2 * len(hooks) * max(1, len(sources)) / 3)), 4.5))
    width = 0.8 / max(1, len(sources))
    for j, source in enumerate(sources):
        vals = [_finite(next((r.get(metric) for r in rows if r["source"] == source and r["hook"] == h), math.nan)) for h in hooks]
        ax.bar([i + j * width for i in range(len(hooks))], vals, width, label=source)
    for k, source in enumerate(("critic", "mean", "time", "raw_obs")):
        row = next((r for r in rows if r["source"] == source and r["hook"] is None), None)
        if row is not None and math.isfinite(_finite(row.get(metric))):
            ax.axhline(row[metric], color=f"C{k + 5}", ls="--", lw=1, label=source)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(hooks))])
    ax.set_xticklabels([("critic: " if h.startswith("critic_encoder.") else "") + h.split(".", 1)[-1] for h in hooks], rotation=20, fontsize=8)
    ax.set_ylabel(("R^2 vs exact value, episodes equal" if metric == "r2_exact_ep" else "R^2 vs return") + f" ({policy})")
    ax.set_ylim(max(-0.5, ax.get_ylim()[0]), 1.0)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("value probes per layer, with ceilings and floors", fontsize=9)
    fig.tight_layout()
    paths["per_layer"] = out_dir / "per_layer.png"
    fig.savefig(paths["per_layer"], dpi=110)
    plt.close(fig)

    planning = results.get("planning")
    if planning:
        fig, ax = plt.subplots(figsize=(1.3 * len(planning) + 2, 3.6))
        names = [r["source"] for r in planning]
        success = [r["success"] for r in planning]
        err = [[r["success"] - r["success_lo"] for r in planning], [r["success_hi"] - r["success"] for r in planning]]
        ax.bar(range(len(names)), success, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("success")
        ax.set_title("one-step lookahead with each value source", fontsize=9)
        fig.tight_layout()
        paths["planning"] = out_dir / "planning.png"
        fig.savefig(paths["planning"], dpi=110)
        plt.close(fig)
    return paths


def export_probes(pl_module: L.LightningModule, out_dir: Path) -> list[Path]:
    """Every probe as plain tensors (see the module docstring), for steering along a probe's direction."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for config in pl_module.loss_configs:
        for hook in pl_module.hooks_of(config):
            w, b = pl_module.linear_map(config, hook)
            tag = hook.replace(".", ":")
            payload = {"weight": w.cpu(), "bias": b.cpu(), "mean": getattr(pl_module, f"mean@{tag}").cpu(),
                       "std": getattr(pl_module, f"std@{tag}").cpu(), "hook": hook, "config": config}
            path = out_dir / f"{config}@{hook}.pt"
            torch.save(payload, path)
            paths.append(path)
    return paths


def headline_scalars(table: Sequence[Mapping[str, Any]], version: str, hook: str) -> dict[str, float]:
    """``eval/<source>/<metric>`` for the policy's head at one hook point (and the hook-free sources)."""
    out = {}
    for row in table:
        if row["version"] != version or row["hook"] not in (hook, None):
            continue
        for metric in ("r2_return", "r2_exact", "pearson_return", "spearman_return", "td_error", "mse_over_var"):
            value = row.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"eval/{row['source']}/{metric}"] = float(value)
    return out


class ProbePlots(L.Callback):
    """Logs a value-probe run's figures (PNG + W&B images), table (W&B table) and headline scalars; writes the probes."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, pl_module, run_dir(trainer), trainer.global_step)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, pl_module, run_dir(trainer), trainer.global_step)

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path, step: int) -> None:
        results = getattr(pl_module, "results", None)
        if not results or not results.get("table"):
            return
        paths = draw_probe_figures(results, out / "figures")
        export_probes(pl_module, out / "probes")
        scalars = headline_scalars(results["table"], results["version_names"][0], results["figures"]["hook"])
        table = results["table"]
        columns = sorted({k for row in table for k in row}, key=lambda k: (k not in ("source", "hook", "version"), k))
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if hasattr(logger, "log_image"):
                for name, path in paths.items():
                    logger.log_image(key=f"probe/{name}", images=[str(path)], step=step)
            if hasattr(logger, "log_table"):
                data = [[_table_cell(row.get(c)) for c in columns] for row in table]
                logger.log_table(key="probe/evaluation", columns=columns, data=data, step=step)
            logger.save()


def _table_cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
