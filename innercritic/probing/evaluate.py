"""Judging value probes: exact maze values, ceilings, floors and the evaluation table.

The protocol (DESIGN.md, "Evaluation protocol"): on the test episodes of each policy version, every
value source is scored against the Monte-Carlo returns and, in the cheese maze, against the exact
value of that version's policy. Beside the probes stand

- ceilings on the same activations: closed-form ridge on returns and LSTD (the TD fixed point), each
  with one penalty per hook point chosen on the calibration split (:func:`shared_penalty`), and the
  agent's own critic;
- the positive control: ridge on the critic's own values (``ridge_critic``), scored against the critic
  (``r2_critic``): at the critic tower's last layer the critic is linear by construction, so this must
  read ~1 there, and where along the tower it rises says where the value becomes readable;
- floors: the training mean, a regression on the time step, ridge on the raw observations, ridge on
  the same hook point of a randomly initialised copy of the network, and a random direction and the
  top principal component, each calibrated like an unsupervised probe.

Unsupervised sources (and probes trained without reward labels) get a scale and an offset fitted on
the calibration split before they are scored; their rows record how many labelled episodes that used.
The table is a list of flat dict rows (source, hook, version, metrics), ready for JSON, W&B tables and
plots; :func:`aggregate` folds the tables of several seeds into mean and spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from innercritic.agents.noisy import parse_version
from innercritic.envs.maze_values import policy_value
from innercritic.probing.closed_form import DEFAULT_ALPHAS, LinearValue, Moments, fit_affine, fit_ridge, lstd_path, ridge_path
from innercritic.probing.maze_exact import every_square, within_group_spearman
from innercritic.probing.metrics import dominance_accuracy, mse_over_var, normalised_td_error, pearson, r2, spearman
from innercritic.stats import bootstrap_r2, grouped_r2

__all__ = [
    "calibrated",
    "Split",
    "aggregate",
    "evaluation_table",
    "fit_ceilings",
    "hook_features",
    "maze_exact_values",
    "score",
    "shared_penalty",
    "split_composition",
]

LSTD_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


@dataclass
class Split:
    """The transitions of one split, as numpy arrays (n rows)."""

    x: dict[str, np.ndarray]  # hook -> standardised activations at s_t, (n, D)
    x_next: dict[str, np.ndarray]  # hook -> standardised activations at s_{t+1}, (n, D)
    reward: np.ndarray  # r_t
    terminal: np.ndarray  # 1.0 where the episode terminated after action t
    ret: np.ndarray  # discounted return G_t
    value: np.ndarray  # the critic at s_t
    value_next: np.ndarray  # the critic at s_{t+1}
    version: np.ndarray  # int, policy version of the row
    step: np.ndarray  # int, time step t
    episode: np.ndarray  # int, global episode id
    exact: np.ndarray | None = None  # exact value of the row's version at s_t (maze), else None
    obs: np.ndarray | None = None  # (n, P) flattened raw observations at s_t (for the raw-observation floor)
    obs_next: np.ndarray | None = None  # (n, P) at s_{t+1}

    def rows(self, version: int) -> np.ndarray:
        return np.flatnonzero(self.version == version)


# ---------------------------------------------------------------------------------------------
# Targets and features that need the agent


@torch.no_grad()
def maze_exact_values(obs: np.ndarray, episode: np.ndarray, version: np.ndarray, version_names: Sequence[str],
                      agent: torch.nn.Module, gamma: float, batch: int = 4096) -> np.ndarray:
    """The exact value, under each row's policy version, of the state of each row of a maze cache.

    Per episode, the walls and cheese come from its first observation; the policy's action
    probabilities at every free square come from the agent looking at that maze with the mouse moved
    there; :func:`~innercritic.envs.maze_values.policy_value` solves the Bellman equations (infinite
    horizon: the step limit changes a value by at most gamma ** max_steps). Rows are in frame
    coordinates, so padded mazes need no special case.

    Args:
        obs: uint8 (N, 3, S, S) observations (channels walls, mouse, cheese), grouped by episode.
        episode, version: (N,) episode id and version index of each row.
    """
    versions = [parse_version(v) for v in version_names]
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    ends = np.r_[starts[1:], len(episode)]
    # One batch of "mouse at every free square" observations for all episodes together.
    frames = [every_square(np.asarray(obs[s]))[0] for s in starts]
    frames_all = np.concatenate(frames)
    agent_device = next(agent.parameters()).device
    logits = torch.cat([agent.policy_logits(torch.from_numpy(frames_all[i:i + batch]).to(agent_device)).float().cpu()
                        for i in range(0, len(frames_all), batch)])
    offsets = np.r_[0, np.cumsum([len(f) for f in frames])]
    out = np.zeros(len(episode), dtype=np.float64)
    for k, (s, e) in enumerate(zip(starts, ends)):
        first = np.asarray(obs[s])
        walls = first[0] > 0
        cheese_at = np.argwhere(first[2] > 0)
        if len(cheese_at) == 0:
            continue  # no cheese: nothing to reach, every value is 0
        probs = versions[int(version[s])].probs(logits[offsets[k]:offsets[k + 1]]).double().numpy()
        values = policy_value(walls, tuple(cheese_at[0]), probs / probs.sum(1, keepdims=True), gamma)
        mouse = np.asarray(obs[s:e, 1]).reshape(e - s, -1).argmax(1)
        out[s:e] = np.nan_to_num(values.reshape(-1)[mouse], nan=0.0)
    return out


@torch.no_grad()
def hook_features(agent: torch.nn.Module, obs: np.ndarray, hooks: Sequence[str], batch: int = 4096) -> dict[str, np.ndarray]:
    """Flattened activations (N, D) of ``hooks`` for uint8 observations (N, C, H, W), in batches."""
    parts: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    device = next(agent.parameters()).device
    for i in range(0, len(obs), batch):
        _, cache = agent.run_with_cache(torch.from_numpy(np.asarray(obs[i:i + batch])).to(device), names=list(hooks))
        for h in hooks:
            parts[h].append(cache[h].reshape(len(cache[h]), -1).float().cpu().numpy())
    return {h: np.concatenate(p) for h, p in parts.items()}


# ---------------------------------------------------------------------------------------------
# Scoring


def _terminated(data: Split, rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` belong to an episode that terminated (reached a terminal state) inside the split."""
    done = np.unique(data.episode[data.terminal > 0])
    return np.isin(data.episode[rows], done)


def score(pred: np.ndarray, pred_next: np.ndarray | None, data: Split, rows: np.ndarray, gamma: float) -> dict[str, float]:
    """Every figure of one value source on ``rows`` of a split.

    Against the Monte-Carlo return over all rows (``r2_return``) and over the rows of terminated episodes
    only (``r2_return_terminated``): an episode the step limit cuts has a return that bootstraps from the
    critic at the cut (``gamma ** (T - t) V(s_T)``, the cache's convention), so its states' targets carry the
    critic's error and depend on the time left, which no state shows. Against the exact value (the maze):
    R^2 over states, ``r2_exact_ep`` (every test episode weighted the same, :func:`~innercritic.stats.grouped_r2`:
    the headline), Pearson, Spearman and ``spearman_exact_within``, the mean Spearman inside each episode
    (does the source rank the squares of one maze right). ``r2_critic`` is against the agent's own critic.
    ``<figure>_lo`` / ``_hi`` are 95% intervals of the R^2 figures from resampling test episodes
    (:func:`~innercritic.stats.bootstrap_r2`)."""
    target = data.ret[rows]
    episodes = data.episode[rows]
    done = _terminated(data, rows)
    out = {
        "r2_return": r2(pred, target),
        "r2_return_terminated": r2(pred[done], target[done]) if done.sum() > 1 else math.nan,
        "pearson_return": pearson(pred, target),
        "spearman_return": spearman(pred, target),
        "mse_over_var": mse_over_var(pred, target),
        "td_error": (normalised_td_error(pred, pred_next, data.reward[rows], data.terminal[rows], gamma)
                     if pred_next is not None else math.nan),
    }
    targets = {"return": target, "critic": data.value[rows]}
    if data.exact is not None:
        exact = data.exact[rows]
        targets["exact"] = exact
        out.update(r2_exact=r2(pred, exact), r2_exact_ep=grouped_r2(pred, exact, episodes), pearson_exact=pearson(pred, exact),
                   spearman_exact=spearman(pred, exact), spearman_exact_within=within_group_spearman(pred, exact, episodes))
    out["r2_critic"] = r2(pred, data.value[rows])
    for name, t in targets.items():
        out[f"r2_{name}_lo"], out[f"r2_{name}_hi"] = bootstrap_r2(pred, t, episodes)
    if "exact" in targets:
        out["r2_exact_ep_lo"], out["r2_exact_ep_hi"] = bootstrap_r2(pred, targets["exact"], episodes, equal_groups=True)
    return out


def calibrated(pred_cal: np.ndarray, target_cal: np.ndarray, *preds: np.ndarray | None) -> list[np.ndarray | None]:
    """``preds`` mapped by the scale and offset that best fit ``pred_cal`` to ``target_cal`` (how
    unsupervised sources are scored: fitted on calibration data, applied elsewhere)."""
    scale, offset = fit_affine(pred_cal, target_cal)
    return [None if p is None else scale * p + offset for p in preds]


def _row(source: str, hook: str | None, version: int, version_names: Sequence[str], figures: Mapping[str, float],
         **extra: Any) -> dict[str, Any]:
    return {"source": source, "hook": hook, "version": version_names[version], **figures, **extra}


def shared_penalty(paths: Sequence[Callable[[float], LinearValue] | None], alphas: Sequence[float],
                   calib: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[LinearValue | None]:
    """Every version's fit at one penalty: the alpha in ``alphas`` with the best mean calibration R^2.

    ``paths[i]`` maps a penalty to version i's fit (None: no fit for that version) and ``calib[i]`` is
    (features, returns) of its calibration rows; each version is scored on its own rows and the
    scores are averaged, ties going to the smaller alpha. Why one penalty for all versions: a penalty
    chosen on one version's third of the calibration split (12 episodes on the maze default) was noisy
    enough to pick alpha 1 for an LSTD fit that then scored R^2 -3.3 on test, where alpha 1e5 scored
    -0.09 (BENCHMARKS.md, "TD probe against LSTD"); the penalty is a property of the layer and the
    estimator, so every version's episodes vote on it. An alpha whose system is singular is skipped.
    """
    best: list[LinearValue | None] | None = None
    best_score = -np.inf
    for alpha in sorted(float(a) for a in alphas):
        try:
            fits = [None if path is None else path(alpha) for path in paths]
        except np.linalg.LinAlgError:
            continue
        scores = [r2(fit.predict(x), y) for fit, (x, y) in zip(fits, calib) if fit is not None and len(y) > 1]
        score = float(np.mean(scores)) if scores else 0.0
        if best is None or score > best_score:
            best, best_score = fits, score
    return best if best is not None else [None] * len(paths)


def _per_version(train: Split, calib: Split, test: Split, V: int) -> tuple[list[Split], list[tuple[_Rows, _Rows, _Rows]]]:
    # A calibration split too small to fit a scale and offset (tiny runs) falls back to the train
    # split, so every source is still scored; the rows then report the train episodes as labelled.
    calib_or_train = [calib if len(calib.rows(i)) >= 2 else train for i in range(V)]
    return calib_or_train, [(_Rows(train, train.rows(i)), _Rows(calib_or_train[i], calib_or_train[i].rows(i)),
                             _Rows(test, test.rows(i))) for i in range(V)]


def _hook_bar(hooks: Sequence[str], label: str | None):
    """``hooks`` as they are, or wrapped in a tqdm bar on stderr named ``label`` (one step per hook point)."""
    if label is None:
        return hooks
    import sys

    from tqdm import tqdm  # lazy: a run without a bar never loads it

    return tqdm(list(hooks), desc=label, unit=" hook points", file=sys.stderr, dynamic_ncols=True, leave=False)


def fit_ceilings(train: Split, calib: Split, gamma: float, num_versions: int, hooks: Sequence[str] | None = None,
                 progress: str | None = None, moments: dict[str, list[Moments | None]] | None = None) -> dict[str, list[dict[str, LinearValue]]]:
    """Ridge, LSTD and ridge on the critic per hook point and policy version, each at the penalty of
    :func:`shared_penalty`.

    ``{hook: [{"ridge": LinearValue, "lstd": LinearValue, "ridge_critic": LinearValue}, ...one per version]}``
    (a version with fewer than 2 train rows gets an empty dict), for ``hooks`` (None: every hook point of the
    splits). ``ridge_critic`` is ridge on the critic's own values, the positive control's closed form.
    The probe module reads the chosen penalties to give its SGD probes the same L2 strength, and hands
    the fits back to :func:`evaluation_table`. ``progress`` labels a bar of the hook points (stderr).

    Where a version has more train rows than features, all three come from one :class:`Moments` of its
    rows (the products formed once); ``moments``, when given, receives them per hook point (None where
    a version is wider than long), so that the probe configurations' closed forms and the top-principal-
    component floor are solved from the same products.
    """
    calib_or_train, per_version = _per_version(train, calib, train, num_versions)
    out: dict[str, list[dict[str, LinearValue]]] = {}
    for hook in _hook_bar(list(train.x) if hooks is None else hooks, progress):
        x, x_next = train.x[hook], train.x_next[hook]
        cal = [(calib_or_train[i].x[hook][ca.at], ca) for i, (_, ca, _) in enumerate(per_version)]
        found: list[Moments | None] = []
        paths: dict[str, list[Callable[[float], LinearValue] | None]] = {"ridge": [], "ridge_critic": [], "lstd": []}
        for tr, _, _ in per_version:
            m = None
            if len(tr.rows) > x.shape[1]:
                m = Moments(x[tr.at], {"ret": tr.ret_, "value": tr.value_, "reward": tr.reward_}, x_next[tr.at], tr.terminal_, gamma)
                paths["ridge"].append(m.ridge_path("ret"))
                paths["ridge_critic"].append(m.ridge_path("value"))
                paths["lstd"].append(m.lstd_path("reward"))
            elif len(tr.rows) >= 2:  # wider than long: the dual forms
                both = ridge_path(x[tr.at], np.stack([tr.ret_, tr.value_], 1))
                paths["ridge"].append(lambda alpha, both=both: both(alpha)[0])
                paths["ridge_critic"].append(lambda alpha, both=both: both(alpha)[1])
                paths["lstd"].append(lstd_path(x[tr.at], x_next[tr.at], tr.reward_, tr.terminal_, gamma))
            else:
                for column in paths.values():
                    column.append(None)
            found.append(m)
        fits = {"ridge": shared_penalty(paths["ridge"], DEFAULT_ALPHAS, [(xc, ca.ret_) for xc, ca in cal]),
                "lstd": shared_penalty(paths["lstd"], LSTD_ALPHAS, [(xc, ca.ret_) for xc, ca in cal]),
                "ridge_critic": shared_penalty(paths["ridge_critic"], DEFAULT_ALPHAS, [(xc, ca.value_) for xc, ca in cal])}
        out[hook] = [{kind: f[i] for kind, f in fits.items() if f[i] is not None} for i in range(num_versions)]
        if moments is not None:
            moments[hook] = found
    return out


def _shared_ridge(x_train: np.ndarray, x_calib: Sequence[np.ndarray], per_version, targets: Sequence[str] = ("ret_",)):
    """Ridge on returns per version at one :func:`shared_penalty` (the ceiling, and the floors on raw
    observations and on a random network); ``x_calib[i]`` holds version i's calibration rows.

    With several ``targets`` (attributes of :class:`_Rows`: ``ret_``, ``value_``), one fit list per target,
    each at its own penalty, from one decomposition of the features per version."""
    paths = [ridge_path(x_train[tr.rows], np.stack([getattr(tr, t) for t in targets], 1)) if len(tr.rows) >= 2 else None
             for tr, _, _ in per_version]
    out = []
    for k, t in enumerate(targets):
        column = [None if p is None else (lambda alpha, p=p, k=k: p(alpha)[k]) for p in paths]
        out.append(shared_penalty(column, DEFAULT_ALPHAS, [(x_calib[i][ca.rows], getattr(ca, t)) for i, (_, ca, _) in enumerate(per_version)]))
    return out[0] if len(targets) == 1 else out


def _linear_sources(ceilings: Mapping[str, LinearValue], x_tr, rng, moments: Moments | None = None) -> dict[str, tuple[LinearValue, bool]]:
    """Fitted linear sources on one feature set: name -> (linear value, needs calibration)."""
    out: dict[str, tuple[LinearValue, bool]] = {name: (lin, False) for name, lin in ceilings.items()}
    d = x_tr.shape[1]
    direction = rng.standard_normal(d)
    out["random_dir"] = (LinearValue(w=direction / np.linalg.norm(direction), b=0.0, alpha=0.0), True)
    if moments is not None:  # the ceilings' decomposition of the same rows already holds it
        out["top_pc"] = (LinearValue(w=moments.top_pc(), b=0.0, alpha=0.0), True)
        return out
    centred = (x_tr - x_tr.mean(0, dtype=np.float64)).astype(np.float32)
    # Top principal component by power iteration at single precision: a floor needs the direction,
    # not ten digits of it, and a d x d eigendecomposition per layer would cost more than the ceilings.
    v = rng.standard_normal(d).astype(np.float32)
    for _ in range(30):
        v = centred.T @ (centred @ v)
        v /= np.linalg.norm(v) + 1e-30
    out["top_pc"] = (LinearValue(w=v.astype(np.float64), b=0.0, alpha=0.0), True)
    return out


class _Rows:
    """A split restricted to some rows, with the label arrays pre-sliced (suffix _)."""

    def __init__(self, data: Split, rows: np.ndarray) -> None:
        self.rows = rows
        # What indexes a split's activations: a slice (a view, no copy) where the rows are one run, as a
        # version's rows are in a cache's order; the rows themselves otherwise.
        run = len(rows) > 0 and int(rows[-1]) - int(rows[0]) + 1 == len(rows)
        self.at: slice | np.ndarray = slice(int(rows[0]), int(rows[-1]) + 1) if run else rows
        self.ret_ = data.ret[rows].astype(np.float64)
        self.value_ = data.value[rows].astype(np.float64)
        self.reward_ = data.reward[rows].astype(np.float64)
        self.terminal_ = data.terminal[rows].astype(np.float64)
        self.step_ = data.step[rows].astype(np.float64)


def evaluation_table(
    train: Split,
    calib: Split,
    test: Split,
    gamma: float,
    version_names: Sequence[str],
    probes: Mapping[str, Mapping[str, tuple[Callable[[np.ndarray], np.ndarray], bool]]] | None = None,
    random_net: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None,
    seed: int = 0,
    ceilings: Mapping[str, list[dict[str, LinearValue]]] | None = None,
    progress: str | None = None,
    moments: Mapping[str, Sequence[Moments | None]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of figures for every value source, hook point and policy version on the test split.

    Args:
        train, calib, test: the three splits (features standardised with train statistics).
        gamma: the dataset's discount.
        version_names: names of the policy versions (index = head).
        probes: ``{source_name: {hook: (predict, unsupervised)}}`` where ``predict`` maps standardised
            features (n, D) to every head's value (n, V); unsupervised probes are calibrated per head.
        random_net: ``{hook: (x_train, x_next_train, x_calib, x_test, x_next_test)}`` activations of a
            randomly initialised network (standardised), for the random-network floor.
        seed: seed of the random direction (and of the principal component's start).
        ceilings: the output of :func:`fit_ceilings` on the same splits, when already computed.
        progress: a label for a bar of the hook points scored (stderr); None: silent.
        moments: the :class:`Moments` that :func:`fit_ceilings` formed (its ``moments``): the top principal
            component floor is read from their decomposition instead of a power iteration over the rows.
    """
    rows: list[dict[str, Any]] = []
    V = len(version_names)
    calib_or_train, per_version = _per_version(train, calib, test, V)
    if ceilings is None:
        moments = {}
        ceilings = fit_ceilings(train, calib, gamma, V, moments=moments)
    calib_episodes = [int(len(np.unique(calib_or_train[i].episode[ca.rows]))) for i, (_, ca, _) in enumerate(per_version)]

    for hook in _hook_bar(list(train.x), progress):
        fitted: dict[str, list[LinearValue]] = {}
        every_state: dict[str, np.ndarray] = {}
        random_floor = None
        if random_net and hook in random_net:
            r_tr, _, r_ca, _, _ = random_net[hook]
            random_floor = _shared_ridge(r_tr, [r_ca if calib_or_train[i] is calib else r_tr for i in range(V)], per_version)
        for i, (tr, ca, te) in enumerate(per_version):
            if len(tr.rows) < 2 or len(te.rows) < 2:
                continue
            x_tr = train.x[hook][tr.at]
            x_ca, x_te, xn_te = calib_or_train[i].x[hook][ca.at], test.x[hook][te.at], test.x_next[hook][te.at]
            found = (moments or {}).get(hook)
            sources = _linear_sources(ceilings[hook][i], x_tr, np.random.default_rng(seed), None if found is None else found[i])
            for name, (lin, calibrate) in sources.items():
                fitted.setdefault(name, []).append(lin)
                pred, pred_next = lin.predict(x_te), lin.predict(xn_te)
                extra: dict[str, Any] = {}
                if calibrate:
                    pred, pred_next = calibrated(lin.predict(x_ca), ca.ret_, pred, pred_next)
                    extra["labelled_episodes"] = calib_episodes[i]
                if name in ("ridge", "lstd", "ridge_critic"):
                    extra["alpha"] = lin.alpha
                rows.append(_row(name, hook, i, version_names, score(pred, pred_next, test, te.rows, gamma), **extra))
            for name, sources in (probes or {}).items():
                if hook not in sources:
                    continue
                predict, unsupervised = sources[hook]
                pred, pred_next = predict(x_te)[:, i], predict(xn_te)[:, i]
                extra = {}
                if unsupervised:
                    pred, pred_next = calibrated(predict(x_ca)[:, i], ca.ret_, pred, pred_next)
                    extra["labelled_episodes"] = calib_episodes[i]
                if i > 0:
                    if name not in every_state:  # every head on every test state, once per probe and hook point
                        every_state[name] = predict(test.x[hook])
                    extra["dominance"] = dominance_accuracy(every_state[name][:, 0], every_state[name][:, i])
                rows.append(_row(name, hook, i, version_names, score(pred, pred_next, test, te.rows, gamma), **extra))
            if random_floor is not None and random_floor[i] is not None:
                _, _, _, r_te, rn_te = random_net[hook]
                lin = random_floor[i]
                rows.append(_row("random_net", hook, i, version_names,
                                 score(lin.predict(r_te[te.rows]), lin.predict(rn_te[te.rows]), test, te.rows, gamma)))
        # Dominance of the separately fitted per-version ceilings, on every test state.
        for name in ("ridge", "lstd"):
            lins = fitted.get(name, [])
            if len(lins) == V:
                v0 = lins[0].predict(test.x[hook])
                for row in rows:
                    if row["source"] == name and row["hook"] == hook and row["version"] != version_names[0]:
                        i = list(version_names).index(row["version"])
                        row["dominance"] = dominance_accuracy(v0, lins[i].predict(test.x[hook]))

    # Sources that do not depend on a hook point.
    raw_floor = None
    if train.obs is not None and test.obs is not None and calib.obs is not None:
        raw_floor = _shared_ridge(train.obs.astype(np.float64), [c.obs.astype(np.float64) for c in calib_or_train], per_version)
    for i, (tr, ca, te) in enumerate(per_version):
        if len(tr.rows) < 2 or len(te.rows) < 2:
            continue
        rows.append(_row("critic", None, i, version_names,
                         score(test.value[te.rows].astype(np.float64), test.value_next[te.rows].astype(np.float64), test, te.rows, gamma)))
        mean = np.full(len(te.rows), tr.ret_.mean())
        rows.append(_row("mean", None, i, version_names, score(mean, mean, test, te.rows, gamma)))
        lin = fit_ridge(tr.step_[:, None], tr.ret_, (0.0,))
        rows.append(_row("time", None, i, version_names,
                         score(lin.predict(te.step_[:, None]), lin.predict(te.step_[:, None] + 1), test, te.rows, gamma)))
        if raw_floor is not None and raw_floor[i] is not None:
            lin = raw_floor[i]
            nxt = lin.predict(test.obs_next[te.rows].astype(np.float64)) if test.obs_next is not None else None
            rows.append(_row("raw_obs", None, i, version_names,
                             score(lin.predict(test.obs[te.rows].astype(np.float64)), nxt, test, te.rows, gamma)))
    return rows


def split_composition(split: Split, version_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per policy version, what a split holds: its episodes, those cut by the time limit (no terminal
    transition), and the states of each. Figures over states (R^2, MSE) weigh an episode by its length,
    so a few long, cut episodes can hold much of a small split and decide its R^2."""
    out = {}
    for i, name in enumerate(version_names):
        rows = split.rows(i)
        episodes, inverse = np.unique(split.episode[rows], return_inverse=True)
        terminated = np.zeros(len(episodes), bool)
        np.logical_or.at(terminated, inverse, split.terminal[rows] > 0)
        states = np.bincount(inverse, minlength=len(episodes))
        out[name] = {"episodes": int(len(episodes)), "cut_episodes": int((~terminated).sum()),
                     "states": int(len(rows)), "states_in_cut": int(states[~terminated].sum())}
    return out


def aggregate(tables: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Mean, standard deviation and count over seeds of every numeric figure, per (source, hook, version)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for table in tables:
        for row in table:
            groups.setdefault((row["source"], row["hook"], row["version"]), []).append(row)
    out = []
    for (source, hook, version), members in groups.items():
        row: dict[str, Any] = {"source": source, "hook": hook, "version": version, "seeds": len(members)}
        keys = [k for k in members[0] if k not in ("source", "hook", "version") and isinstance(members[0][k], (int, float))]
        for k in keys:
            vals = np.array([m[k] for m in members if isinstance(m.get(k), (int, float)) and m[k] is not None], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            row[k] = float(vals.mean()) if len(vals) else math.nan
            row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else math.nan
        out.append(row)
    return out
