"""The value-probe section of the loop report: tables, intervals and findings stated with their certainty.

:func:`probe_findings` reads the ``summary.json`` of each probe seed's run (``ValueProbe.summary``) and
returns the report's markdown lines and the figures ``runs/<loop>/report/summary.json`` keeps. What it
reports, in the order a reader should trust it:

1. the positive control, where the answer is known: at the critic tower's layers the agent's own value
   is there to find (linearly so at the last layer), so ridge on the critic must recover it (R^2 about 1
   at the last layer) and the per-layer figures say where along the tower the value becomes readable;
   the label-free probe is judged there too, against its floors;
2. the critic itself as the ceiling: its R^2 against the exact value of the policy;
3. the open question, the policy network's (actor tower's) layers, headlined at one hook point against
   the exact value, per seed with 95% intervals from resampling test episodes.

A figure is called positive only when its whole interval clears the comparison (the floor, or 0), null
when the interval contains it; the text says which and gives the numbers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from innercritic.probing.evaluate import aggregate

__all__ = ["CLOSED_FORMS", "CONTROL_PREFIX", "closed_form_gaps", "fmt", "probe_findings"]

CONTROL_PREFIX = "critic_encoder."  # hook points of the critic tower: the positive control's
FLOORS = ("random_dir", "top_pc")
CLOSED_FORMS = {"probe:mc": "ridge", "probe:td": "lstd"}


def closed_form_gaps(tables: Sequence[Sequence[Mapping[str, Any]]], version: str) -> dict[str, dict[str, float]]:
    """``{"probe:mc vs ridge": {hook: gap}, ...}``: per hook point, the largest |R² against returns| difference
    between an SGD probe and its closed form over the seeds' tables (the probe's convergence check)."""
    out: dict[str, dict[str, float]] = {}
    for probe, closed in CLOSED_FORMS.items():
        for table in tables:
            r2 = {(r["source"], r["hook"]): r["r2_return"] for r in table if r["version"] == version}
            for (source, hook), value in r2.items():
                if source == probe and (closed, hook) in r2:
                    per_hook = out.setdefault(f"{probe} vs {closed}", {})
                    per_hook[hook] = max(per_hook.get(hook, 0.0), abs(value - r2[(closed, hook)]))
    return out


def fmt(x: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals, or "-" for what is not a finite number (the report's cells)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return f"{x:.{digits}f}"
    return "-"


def _pm(row: Mapping[str, Any] | None, key: str) -> str:
    if not row or not isinstance(row.get(key), (int, float)) or not math.isfinite(row[key]):
        return "-"
    return f"{row[key]:.3f} ± {row.get(key + '_std', 0.0):.3f}"


def _ci(row: Mapping[str, Any] | None, key: str) -> str:
    if not row or not isinstance(row.get(key), (int, float)):
        return "-"
    return f"{fmt(row[key])} [{fmt(row.get(key + '_lo'))}, {fmt(row.get(key + '_hi'))}]"


def _short(hook: str | None) -> str:
    return "-" if hook is None else hook


def probe_findings(summaries: Sequence[Mapping[str, Any]], runs: Sequence[str],
                   commands: Mapping[str, str]) -> tuple[list[str], dict[str, Any]]:
    """(markdown lines, figures for report/summary.json) from the probe seeds' summaries."""
    tables = [s["table"] for s in summaries]
    table = aggregate(tables)
    hook, config = summaries[0]["hook"], summaries[0]["probe_config"]
    policy = (summaries[0].get("version_names") or ["policy"])[0]
    hooks = list(dict.fromkeys(r["hook"] for r in table if r["hook"] is not None))
    control_hooks = [h for h in hooks if h.startswith(CONTROL_PREFIX)]
    control = control_hooks[-1] if control_hooks else None
    maze = any("r2_exact" in r for r in tables[0])
    target = "exact" if maze else "return"
    # The headline figure: R^2 against the exact value with every test episode weighted the same (a few long,
    # wandering episodes otherwise hold most of the variance of the states a policy visits).
    metric = "r2_exact_ep" if maze else "r2_return"
    metric_name = "R² exact (episodes equal)" if maze else "R² return"

    def pick(rows: Sequence[Mapping[str, Any]], source: str, at: str | None) -> Mapping[str, Any] | None:
        return next((r for r in rows if r["source"] == source and r["hook"] == at and r["version"] == policy), None)

    def per_seed(source: str, at: str | None, key: str) -> list[float]:
        # summary.json writes a nan as null
        values = [(pick(t, source, at) or {}).get(key) for t in tables]
        return [float(v) if isinstance(v, (int, float)) else math.nan for v in values]

    probe = f"probe:{config}"
    results: dict[str, Any] = {}
    def figure(source: str, at: str | None) -> dict[str, Any]:
        return {f"r2_{target}": per_seed(source, at, metric),
                f"r2_{target}_ci": [[(pick(t, source, at) or {}).get(f"{metric}_lo"), (pick(t, source, at) or {}).get(f"{metric}_hi")]
                                    for t in tables]}

    results["probe"] = {"hook": hook, "config": config, "metric": metric, **figure(probe, hook)}
    results["critic"] = {"metric": metric, **figure("critic", None)}
    for key, label in (("r2_exact", "r2_exact_states"), ("spearman_exact", "spearman_exact"), ("spearman_exact_within", "spearman_exact_within"),
                       ("r2_return_terminated", "r2_return_terminated"), ("r2_return", "r2_return")):
        if key != metric:
            results["probe"][label] = per_seed(probe, hook, key)
            results["critic"][label] = per_seed("critic", None, key)

    lines = ["## Value probes", "",
             f"Headline: `{probe}` at `{hook}` (the policy network's last layer) against the "
             f"{'exact value of the policy (solved per maze), every test episode weighted the same' if maze else 'Monte-Carlo return'}, "
             f"on the test episodes of the policy (`{policy}`); {len(tables)} seed(s), each its own episode split and random "
             "floors. Intervals are 95%, from resampling the test episodes (1,000 draws). Weighted by state instead, a few "
             "long episodes decide R² (their states hold most of the value's variance), so that figure is given beside it. Returns are a second target: a step-limited episode's "
             "return bootstraps from the critic at the cut (gamma^(T-t) V(s_T)), so it carries the critic's error and the "
             "time left, which no state shows; R² against returns is given over all test episodes and over the terminated ones.", "",
             "Commands: " + "; ".join(f"`{commands[k]}`" for k in commands if k.startswith("probe_")), ""]

    # Per seed: the headline and the critic with intervals, and what each test split holds.
    lines += [f"| probe run | {probe} {metric_name} | critic {metric_name} | {probe} R² exact (states) | {probe} Spearman exact | "
              "within-maze Spearman | R² return, terminated | R² return, all | test episodes | cut by the step limit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, summary, t in zip(runs, summaries, tables):
        row, critic = pick(t, probe, hook), pick(t, "critic", None)
        comp = (summary.get("test_split") or {}).get(policy) or {}
        lines.append(f"| {name} | {_ci(row, metric)} | {_ci(critic, metric)} | {_ci(row, 'r2_exact')} | {fmt((row or {}).get('spearman_exact'))} | "
                     f"{fmt((row or {}).get('spearman_exact_within'))} | {fmt((row or {}).get('r2_return_terminated'))} | "
                     f"{fmt((row or {}).get('r2_return'))} | {comp.get('episodes', '-')} | {comp.get('cut_episodes', '-')} |")
    heads = np.array(results["probe"][f"r2_{target}"], dtype=float)
    cis = np.array([[np.nan if v is None else v for v in ci] for ci in results["probe"][f"r2_{target}_ci"]], dtype=float)
    spread = float(np.nanmax(heads) - np.nanmin(heads)) if len(heads) else math.nan
    half = float(np.nanmax((cis[:, 1] - cis[:, 0]) / 2)) if len(cis) else math.nan
    results["probe"]["seed_spread"], results["probe"]["ci_half_width"] = spread, half
    lines += ["", f"The seeds' headlines span {fmt(spread)} (largest minus smallest); the widest interval is ±{fmt(half)}.", ""]

    # Every source at the headline hook point, mean ± standard deviation over the seeds.
    lines += [f"Every value source at `{hook}` (and the hook-free ones), mean ± standard deviation over seeds:", "",
              f"| source | hook | {metric_name} | R² exact (states) | Spearman exact | within-maze Spearman | R² return, terminated | "
              "R² return, all | R² vs the critic | TD error / Var(v) | calib. episodes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"probe": 0, "ridge": 1, "lstd": 2, "critic": 3}
    rows = [r for r in table if r["version"] == policy and r["hook"] in (hook, None)]
    rows.sort(key=lambda r: (order.get(r["source"].split(":")[0], 4), r["source"]))
    for r in rows:
        lines.append(f"| {r['source']} | {_short(r['hook'])} | {_pm(r, metric)} | {_pm(r, 'r2_exact')} | {_pm(r, 'spearman_exact')} | "
                     f"{_pm(r, 'spearman_exact_within')} | {_pm(r, 'r2_return_terminated')} | {_pm(r, 'r2_return')} | "
                     f"{_pm(r, 'r2_critic')} | {_pm(r, 'td_error')} | {fmt(r.get('labelled_episodes'), 0)} |")

    # Per layer, both towers.
    sources = [s for s in dict.fromkeys(r["source"] for r in table if r["hook"] is not None)]
    lines += ["", f"Per layer ({metric_name}, mean over seeds; "
              "`critic_encoder.*` is the critic tower, the positive control):", "",
              "| source | " + " | ".join(hooks) + " |", "|---|" + "---|" * len(hooks)]
    for source in sources:
        cells = [fmt((next((x for x in table if x["source"] == source and x["hook"] == h and x["version"] == policy), None) or {})
                      .get(metric)) for h in hooks]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")

    findings: list[str] = []
    if control is not None:
        ridge_c = [r for r in (pick(t, "ridge_critic", control) for t in tables) if r]
        probe_c = [r for r in (pick(t, "probe:critic", control) for t in tables) if r]
        results["control"] = {"hook": control,
                              "r2_vs_critic": [r["r2_critic"] for r in probe_c] or [r["r2_critic"] for r in ridge_c],
                              "ridge_r2_vs_critic": [r["r2_critic"] for r in ridge_c]}
        lines += ["", "### Positive control: the critic tower", "",
                  "The critic's value is a linear function of its tower's last layer, so a supervised probe of the critic's "
                  "own value must recover it there; where along the tower it becomes readable is the layer-by-layer figure. "
                  "R² against the critic (mean ± sd over seeds):", "",
                  f"| hook | ridge on the critic | probe:critic | LSTD, {metric_name} | probe:unsupervised, {metric_name} | "
                  f"top_pc, {metric_name} | random_dir, {metric_name} |", "|---|---|---|---|---|---|---|"]
        for h in control_hooks:
            row = {s: next((x for x in table if x["source"] == s and x["hook"] == h and x["version"] == policy), None)
                   for s in ("ridge_critic", "probe:critic", "lstd", "probe:unsupervised", "top_pc", "random_dir")}
            lines.append(f"| {h} | {_pm(row['ridge_critic'], 'r2_critic')} | {_pm(row['probe:critic'], 'r2_critic')} | "
                         f"{_pm(row['lstd'], metric)} | {_pm(row['probe:unsupervised'], metric)} | "
                         f"{_pm(row['top_pc'], metric)} | {_pm(row['random_dir'], metric)} |")
        got = results["control"]["r2_vs_critic"]
        if got:
            ok = min(got) >= 0.99
            findings.append(f"- **Positive control {'holds' if ok else 'FAILS'}**: the supervised probe of the critic at `{control}` "
                            f"reads the critic with R² {fmt(min(got))}-{fmt(max(got))} over {len(got)} seed(s) (asked: >= 0.99)"
                            + ("." if ok else ": the probing machinery misses a value that is there; no null below can be trusted."))
    # The label-free probe where a value direction exists (the control) and at the headline.
    unsup_at = control or hook
    un = [pick(t, "probe:unsupervised", unsup_at) for t in tables]
    if any(un):
        results["unsupervised"] = {"hook": unsup_at, "metric": metric, **figure("probe:unsupervised", unsup_at),
                                   "floors": {f: per_seed(f, unsup_at, metric) for f in FLOORS},
                                   f"headline_r2_{target}": per_seed("probe:unsupervised", hook, metric)}
        best_floor = max(max(v) for v in results["unsupervised"]["floors"].values()) if results["unsupervised"]["floors"] else math.nan
        lows = [c[0] for c in results["unsupervised"][f"r2_{target}_ci"] if c[0] is not None]
        mean_un = float(np.nanmean(results["unsupervised"][f"r2_{target}"]))
        above = bool(lows) and min(lows) > best_floor
        findings.append(f"- **Label-free probe (slack + neg_var) at `{unsup_at}`**: {metric_name} {fmt(mean_un)} (mean over seeds), "
                        f"against the best floor's {fmt(best_floor)} (random direction, top principal component): "
                        + ("**above its floors** in every seed's interval." if above else
                           "**not above its floors** (null), as expected where dominance between separately fitted heads is "
                           "met by their offsets: the variance term then picks the layer's top principal direction "
                           "(tests/test_value_probe.py plants a value to show both cases)."))
    crit = np.array(results["critic"][f"r2_{target}"], dtype=float)
    findings.append(f"- **The critic as ceiling**: {metric_name} {fmt(float(np.nanmean(crit)))} (seeds {', '.join(fmt(c) for c in crit)}); "
                    + ("a real ceiling (>= 0.7)." if np.nanmin(crit) >= 0.7 else
                       "below the 0.7 a ceiling needs: the agent's own value estimate is itself poor, so probe figures are "
                       "read against it (BENCHMARKS.md, \"Critic capacity\")."))
    lo_all = np.nanmin(cis[:, 0]) if len(cis) else math.nan
    findings.append(f"- **Headline, {probe} at `{hook}`**: {metric_name} {fmt(float(np.nanmean(heads)))} (seeds "
                    f"{', '.join(fmt(h) for h in heads)}; spread {fmt(spread)}, widest interval ±{fmt(half)}): "
                    + ("**positive**, every seed's interval above 0." if lo_all > 0 else
                       "**null**: an interval reaches 0 or below, no linear read-out of the value at this layer beyond the mean.")
                    + f" The critic on the same states: {fmt(float(np.nanmean(crit)))}.")
    lines += ["", "### Findings", "", *findings]

    if summaries[0].get("solver") == "sgd":  # the convergence check matters only where SGD fitted the supervised probes
        gaps = closed_form_gaps(tables, policy)
        if gaps:
            lines += ["", "SGD probes against their closed forms (largest |R² probe - R² closed form| over the seeds, against returns):", "",
                      "| probe vs closed form | " + " | ".join(hooks) + " |", "|---|" + "---|" * len(hooks)]
            for pair, per_hook in gaps.items():
                lines.append(f"| {pair} | " + " | ".join(fmt(per_hook.get(h), 4) for h in hooks) + " |")
    dom = [r for r in table if r["source"].startswith("probe:") and r["hook"] == hook and "dominance" in r]
    if dom:
        lines += ["", "Dominance accuracy (fraction of test states where the policy's head exceeds the noisy version's):", "",
                  "| probe | version | dominance |", "|---|---|---|"]
        lines += [f"| {r['source']} | {r['version']} | {_pm(r, 'dominance')} |" for r in dom]
    return lines, results
