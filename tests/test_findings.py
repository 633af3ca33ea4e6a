"""The value-probe section of the loop report calls a finding positive or null from its intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from innercritic.probing.findings import probe_findings

HOOK, CONTROL = "encoder.hook_hidden", "critic_encoder.hook_hidden"


def _row(source, hook, ep, lo, hi, **extra):
    return {"source": source, "hook": hook, "version": "policy", "r2_exact": ep, "r2_exact_ep": ep, "r2_exact_ep_lo": lo,
            "r2_exact_ep_hi": hi, "r2_exact_lo": lo, "r2_exact_hi": hi, "r2_return": ep, "r2_critic": extra.pop("r2_critic", 0.5), **extra}


def _summary(headline, critic, control=1.0, unsup=(0.1, -0.1, 0.3), floor=0.2):
    table = [_row("probe:td", HOOK, *headline), _row("critic", None, *critic),
             _row("probe:critic", CONTROL, 0.5, 0.4, 0.6, r2_critic=control), _row("ridge_critic", CONTROL, 0.5, 0.4, 0.6, r2_critic=control),
             _row("probe:unsupervised", CONTROL, *unsup), _row("probe:unsupervised", HOOK, *unsup),
             _row("top_pc", CONTROL, floor, floor - 0.1, floor + 0.1), _row("random_dir", CONTROL, 0.0, -0.1, 0.1)]
    return {"hook": HOOK, "probe_config": "td", "version_names": ["policy"], "table": table,
            "test_split": {"policy": {"episodes": 200, "cut_episodes": 1}}, "solver": "closed_form"}


def test_positive_only_when_every_interval_clears_and_the_summary_keeps_each_seed():
    seeds = [_summary((0.30, 0.26, 0.34), (0.8, 0.75, 0.85)), _summary((0.33, 0.29, 0.37), (0.82, 0.77, 0.86))]
    lines, res = probe_findings(seeds, ["probe_seed0", "probe_seed1"], {})
    text = "\n".join(lines)
    assert "**Positive control holds**" in text and "**positive**, every seed's interval above 0" in text
    assert "a real ceiling (>= 0.7)" in text and "**not above its floors** (null)" in text
    assert res["probe"]["r2_exact"] == [0.30, 0.33] and res["probe"]["r2_exact_ci"] == [[0.26, 0.34], [0.29, 0.37]]
    assert math.isclose(res["probe"]["seed_spread"], 0.03) and math.isclose(res["probe"]["ci_half_width"], 0.04)
    assert res["control"]["r2_vs_critic"] == [1.0, 1.0] and res["unsupervised"]["floors"]["top_pc"] == [0.2, 0.2]

    nulls = [_summary((0.05, -0.02, 0.12), (0.4, 0.3, 0.5), control=0.9, unsup=(0.5, 0.45, 0.55), floor=0.2)]
    text = "\n".join(probe_findings(nulls, ["probe_seed0"], {})[0])
    assert "**Positive control FAILS**" in text and "**null**: an interval reaches 0" in text
    assert "below the 0.7 a ceiling needs" in text and "**above its floors**" in text


def test_within_maze_spearman_is_the_mean_of_each_groups_own_spearman():
    from innercritic.probing.maze_exact import within_group_spearman
    from innercritic.probing.metrics import spearman

    rng = np.random.default_rng(0)
    group = np.repeat([7, 3, 9, 4, 5], [6, 5, 2, 8, 4])  # 9 has too few rows; 5 gets a constant target
    pred = np.round(rng.normal(size=len(group)), 1)  # ties inside groups
    target = np.round(pred + rng.normal(size=len(group)), 0)
    target[group == 5] = 1.0
    expected = np.mean([spearman(pred[group == g], target[group == g]) for g in (7, 3, 4)])
    assert within_group_spearman(pred, target, group) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(within_group_spearman(pred[:2], target[:2], group[:2]))
