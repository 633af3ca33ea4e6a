"""Multi-loss linear value probes on the activations of a policy network, as a LightningModule.

Method: linear probing for a value estimate (after Alain & Bengio 2016, "Understanding intermediate
layers using linear classifier probes"), trained under any weighted mix of TD error, Monte-Carlo
regression, negative variance and the unsupervised dominance-with-slack loss of
:mod:`innercritic.probing.losses` (DESIGN.md, "Probe losses"), one linear head per policy version on
the standardised activations of each served hook point.

Run (fits every configuration at every served hook point together, then evaluates them against
returns, exact values, ceilings and floors, and writes the table into ``summary.json``)::

    python train.py fit -c configs/probe/maze.yaml --data.agent_ckpt A.ckpt --data.cache_dir D
    python train.py test -c configs/probe/maze.yaml --data.agent_ckpt A.ckpt --data.cache_dir D --ckpt_path P.ckpt

Several configurations and hook points train in one pass over the data: their parameters are
disjoint, so the summed loss gives each the gradient it would get alone, and the data are read once.
``init_from`` starts a new run from a probe checkpoint's weights and standardisation (fine-tuning with
new loss weights or new data); ``--ckpt_path`` resumes a run.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innercritic.agents.checkpoint import describe_checkpoint, read_checkpoint
from innercritic.agents.networks import ActorCritic
from innercritic.probing.closed_form import fit_quadratic
from innercritic.probing.evaluate import Split, calibrated, evaluation_table, fit_ceilings, hook_features, split_composition
from innercritic.probing.planning import compare_planners, critic_value_fn, exact_value_fn, probe_value_fn
from innercritic.probing.losses import LossConfig, probe_loss_terms
from innercritic.errors import InnerCriticError

__all__ = ["ValueProbe", "PROBE_KIND"]

PROBE_KIND = "innercritic-value-probe"
SLACK_HEADS = ("state", "linear")
PENALTIES = ("match", "none")
SOLVERS = ("closed_form", "sgd")
# Planning plays levels no collection seed reaches (collections draw seeds below 2**30).
PLANNING_SEED_OFFSET = 1_500_000_001
# Variance floor of the SGD preconditioner, against the standardised features' unit variance: directions that
# carry less (and are not held down by the head's penalty) are amplified at most 1 / sqrt of it (30x).
PRECONDITION_FLOOR = 1e-3


def _key(config: str, hook: str) -> str:
    # Module names may not contain dots; hook points are dotted module paths.
    return f"{config}@{hook.replace('.', ':')}"


def _successors(state_index: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of a batch, the position in the batch of its successor (cache row + 1) and whether it is
    there: (at (B,) int64, found (B,) bool); ``at`` is arbitrary where ``found`` is False."""
    order = state_index.argsort()
    ranked = state_index[order]
    pos = torch.searchsorted(ranked, state_index + 1).clamp_(max=len(ranked) - 1)
    return order[pos], ranked[pos] == state_index + 1


class ValueProbe(L.LightningModule):
    """Linear value heads (one per policy version) for each named loss configuration and hook point.

    Args:
        configs: named probe configurations, ``{name: {term: weight, ...}}`` with the terms and options of
            :class:`~innercritic.probing.losses.LossConfig` (td, mc, neg_var, slack, ordering, terminal_zero,
            bounds, margin, scale); None: ``{"mc": {"mc": 1.0}}``.
        slack_head: slack variables of the slack term: ``state`` (a free variable per cached state) or
            ``linear`` (a linear head on the activations, so the slack generalises to unseen states).
        reward_range: (min, max) reward of the environment; the bounds term uses [min, max] / (1 - gamma).
        lr: Adam learning rate.
        weight_decay: Adam weight decay on the heads.
        primary_hook: the hook point whose figures headline the summary; None: the last served hook point
            outside the critic tower.
        eval_seed: seed of the evaluation's random floors (random direction, random network).
        penalty: ``match`` gives each supervised probe the L2 strength its closed-form counterpart chose on the
            calibration split (ridge's for ``mc``, LSTD's for ``td``; one per hook point), so the SGD
            probe converges to that regularised optimum rather than overfitting a wide layer; ``none``: no penalty.
        solver: ``closed_form`` solves every configuration made of td and mc terms only exactly at setup
            (:func:`~innercritic.probing.closed_form.fit_quadratic`, at the penalties of ``penalty``) and
            freezes its heads, so the training steps fit only the other configurations (label-free ones);
            ``sgd`` fits every configuration with Adam (to check SGD against the closed form:
            ``benchmarks/td_probe.py``).
        precondition: with ``solver sgd``, fit the supervised heads in whitened coordinates: version i's weights are
            w_i = P_i u_i with P_i = (Sigma_i + (lambda_i + eps) I)^(-1/2), Sigma_i the covariance of its train rows
            (the ceilings' Gram), lambda_i the head's matched penalty per unit of data weight and eps =
            ``PRECONDITION_FLOOR``, and Adam moves u. The loss and its optimum are unchanged; what changes is the
            conditioning: the regularised regression's Hessian in u is the identity, and semi-gradient TD
            contracts at a rate set by 1 - gamma, not by the layer's smallest variance, which is where the plain
            fit stalled on conv layers (BENCHMARKS.md, "Probe fits against their closed forms"). Label-free
            heads are never preconditioned (their scale constraint is on w itself).
        sgd_hooks: the hook points at which the configurations left to SGD get heads (closed-form ones get
            them everywhere); None: every served hook point. A full-batch step reads every activation of the
            hook points it fits, so on a large cache this is what an SGD configuration's cost scales with.
        planning_episodes: when > 0, plan one step ahead with the first configuration's probe, ridge (both at
            the primary hook point) and the critic on this many held-out episodes each, next to the policy.
        init_from: a probe checkpoint whose heads and standardisation start this run (fine-tuning).
    """

    CHECKPOINT_KIND = PROBE_KIND  # what --ckpt_path must hold

    def __init__(
        self,
        configs: dict[str, dict[str, Any]] | None = None,
        slack_head: str = "state",
        reward_range: tuple[float, float] = (0.0, 1.0),
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        primary_hook: str | None = None,
        eval_seed: int = 0,
        penalty: str = "match",
        solver: str = "closed_form",
        precondition: bool = True,
        sgd_hooks: list[str] | None = None,
        planning_episodes: int = 0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        configs = {"mc": {"mc": 1.0}} if configs is None else dict(configs)
        if not configs:
            raise InnerCriticError("model.configs is empty; give at least one probe configuration, e.g. {mc: {mc: 1.0}}")
        self.loss_configs = {name: LossConfig.from_dict(name, spec or {}) for name, spec in configs.items()}
        for name in self.loss_configs:
            if not name or any(ch in name for ch in ".@/ "):
                raise InnerCriticError(f"probe configuration name {name!r} is invalid: use letters, digits, '_' or '-'")
        if slack_head not in SLACK_HEADS:
            raise InnerCriticError(f"model.slack_head {slack_head!r} is invalid; valid: {', '.join(SLACK_HEADS)}")
        if lr <= 0:
            raise InnerCriticError(f"model.lr must be positive, got {lr}")
        if penalty not in PENALTIES:
            raise InnerCriticError(f"model.penalty {penalty!r} is invalid; valid: {', '.join(PENALTIES)}")
        if solver not in SOLVERS:
            raise InnerCriticError(f"model.solver {solver!r} is invalid; valid: {', '.join(SOLVERS)}")
        #: configurations solved in closed form at setup; the optimiser fits the rest
        self.closed_form = [name for name, cfg in self.loss_configs.items() if solver == "closed_form" and cfg.quadratic]
        self.save_hyperparameters()
        self.heads = nn.ModuleDict()
        self.slacks = nn.ModuleDict()
        self.hooks: list[str] = []
        self.gamma = 0.99
        self.results: dict[str, Any] = {}
        self.ceilings: dict[str, Any] | None = None
        # The ceilings' second moments per hook point and version: the closed forms and the evaluation's
        # top-principal-component floor are solved from them (dropped once the evaluation is done).
        self._moments: dict[str, list[Any]] = {}

    # ------------------------------------------------------------------ construction and checkpoints
    def setup(self, stage: str) -> None:
        if self.hooks:
            return
        dm = self.trainer.datamodule
        for attr in ("hooks", "feature_dims", "num_versions", "num_states", "stats", "gamma"):
            if getattr(dm, attr, None) is None:
                raise InnerCriticError(f"ValueProbe needs a trajectory datamodule exposing {attr!r} after setup "
                                 f"(datamodules.trajectories.TrajectoryDataModule); got {type(dm).__name__}")
        self.hooks = list(dm.hooks)
        primary = self.hparams.primary_hook
        if primary is not None and primary not in self.hooks:
            raise InnerCriticError(f"model.primary_hook {primary!r} is not among the served hook points {self.hooks}")
        # The headline is the policy network's last layer: a critic tower's hooks serve the positive control.
        actor = [h for h in self.hooks if not h.startswith("critic_encoder.")]
        self.primary_hook = primary or (actor or self.hooks)[-1]
        sgd_hooks = self.hparams.sgd_hooks
        if sgd_hooks is not None and (not sgd_hooks or any(h not in self.hooks for h in sgd_hooks)):
            raise InnerCriticError(f"model.sgd_hooks {sgd_hooks} must be a non-empty subset of the served hook points {self.hooks}")
        self._sgd_hooks = list(self.hooks if sgd_hooks is None else sgd_hooks)
        first = next(iter(self.loss_configs))
        if self.primary_hook not in self.hooks_of(first):
            raise InnerCriticError(f"the headline configuration {first!r} is fitted by SGD at {self._sgd_hooks} only, not at the primary hook "
                                   f"{self.primary_hook!r}: add it to model.sgd_hooks or list a closed-form configuration first")
        self.gamma = float(dm.gamma)
        V = int(dm.num_versions)
        for hook in self.hooks:
            tag = hook.replace(".", ":")
            self.register_buffer(f"mean@{tag}", dm.stats[hook]["mean"].clone())
            self.register_buffer(f"std@{tag}", dm.stats[hook]["std"].clone())
            for name, cfg in self.loss_configs.items():
                if hook not in self.hooks_of(name):
                    continue
                head = nn.Linear(dm.feature_dims[hook], V)
                nn.init.zeros_(head.bias)
                if cfg.supervised:
                    nn.init.zeros_(head.weight)  # a convex problem: start from the constant-zero value
                else:
                    # Unsupervised objectives are symmetric at 0; start from a small random direction.
                    nn.init.normal_(head.weight, std=dm.feature_dims[hook] ** -0.5)
                self.heads[_key(name, hook)] = head
                if cfg.slack and V > 1:
                    if self.hparams.slack_head == "state":
                        self.slacks[_key(name, hook)] = nn.Embedding(int(dm.num_states), V - 1, _weight=torch.zeros(int(dm.num_states), V - 1))
                    else:
                        self.slacks[_key(name, hook)] = nn.Linear(dm.feature_dims[hook], V - 1)
        if hasattr(dm, "split_arrays") and any(c.supervised for c in self.loss_configs.values()):
            train, calib = dm.split_arrays("train"), dm.split_arrays("calib")
            self._start_biases(train, V)
            preconditioned = any(self._whitened(name) for name in self.loss_configs)
            if self.hparams.penalty == "match" or self.closed_form or preconditioned:
                self.ceilings = fit_ceilings(train, calib, self.gamma, V, progress=self._bar("closed forms"), moments=self._moments)
            if self.hparams.penalty == "match":
                self._match_penalties(train, V)
            if self.closed_form:
                self._solve_closed_form(train, V)
            self._register_preconditioners()
        elif self.closed_form:
            raise InnerCriticError(f"model.solver closed_form needs a trajectory datamodule with split_arrays to solve {self.closed_form}")
        lo, hi = self.hparams.reward_range
        self.value_range = (min(lo, 0.0) / (1.0 - self.gamma) if self.gamma < 1 else -np.inf,
                            max(hi, 0.0) / (1.0 - self.gamma) if self.gamma < 1 else np.inf)
        if self.hparams.init_from:
            self._init_from(self.hparams.init_from)

    def _start_biases(self, train: Split, num_versions: int) -> None:
        """Every supervised head starts at its configuration's best constant predictor, so Adam spends its
        steps on the weights rather than on the offset.

        With zero weights, the bias b of version i that zeroes the sum of the mc gradient c_mc (b - mean G)
        and the semi-gradient TD step c_td (b (1 - gamma mean(1 - terminal)) - mean r) is
        b = (c_mc mean G + c_td mean r) / (c_mc + c_td (1 - gamma mean(1 - terminal))). For mc alone this
        is the mean return (ridge's intercept on standardised features); for td it is LSTD's constant
        fixed point, which differs from the mean return. (On the maze agents this changed no figure: the
        slow part of a td fit is in the weights, see BENCHMARKS.md "TD probe against LSTD".)
        """
        stats = []
        for i in range(num_versions):
            rows = train.version == i
            if rows.any():
                stats.append((float(train.ret[rows].mean()), float(train.reward[rows].mean()),
                              float(1.0 - train.terminal[rows].mean()), float(train.value[rows].mean())))
            else:
                stats.append((0.0, 0.0, 0.0, 0.0))
        for name, cfg in self.loss_configs.items():
            if not cfg.supervised:
                continue
            start = torch.tensor([(cfg.mc * ret + cfg.critic * val + cfg.td * rew) / (cfg.mc + cfg.critic + cfg.td * (1.0 - self.gamma * live))
                                  for ret, rew, live, val in stats])
            for hook in self.hooks_of(name):
                with torch.no_grad():
                    self.heads[_key(name, hook)].bias.copy_(start)

    def _alphas(self, hook: str) -> dict[str, list[float]]:
        """Per version, the penalties ridge, LSTD and ridge on the critic chose on the calibration split at
        ``hook`` (0 where ``penalty`` is ``none`` or a version has no fit)."""
        fits = self.ceilings[hook]
        match = self.hparams.penalty == "match"
        return {kind: [f[kind].alpha if match and kind in f else 0.0 for f in fits] for kind in ("ridge", "lstd", "ridge_critic")}

    def _match_penalties(self, train: Split, num_versions: int) -> None:
        """L2 strengths per head from the closed forms' penalties: with a loss weight c on a batch mean over
        all N train transitions, ridge's (and LSTD's) alpha corresponds to lambda = c * alpha / N."""
        n = max(1, len(train.reward))
        for hook in self.hooks:
            alpha = {kind: torch.tensor(a, dtype=torch.float32) for kind, a in self._alphas(hook).items()}
            for name, cfg in self.loss_configs.items():
                if cfg.supervised and not cfg.unit_norm and hook in self.hooks_of(name):
                    l2 = cfg.mc * alpha["ridge"] + cfg.td * alpha["lstd"] + cfg.critic * alpha["ridge_critic"]
                    self.register_buffer(f"l2@{_key(name, hook)}", l2 / n)

    def _solve_closed_form(self, train: Split, num_versions: int) -> None:
        """Each closed-form configuration's heads set to the exact stationary point of its loss (with its L2
        term) on each version's train transitions, then frozen. A lone mc, td or critic term is ridge, LSTD or
        ridge on the critic at the same penalty, already fitted as a ceiling; a mix is solved by ``fit_quadratic``."""
        for hook in self.hooks:
            alphas = self._alphas(hook)
            for name in self.closed_form:
                cfg, head = self.loss_configs[name], self.heads[_key(name, hook)]
                for i in range(num_versions):
                    rows = train.rows(i)
                    if len(rows) < 2:
                        continue
                    alone = [kind for kind, w in (("ridge", cfg.mc), ("lstd", cfg.td), ("ridge_critic", cfg.critic)) if w]
                    fit = self.ceilings[hook][i].get(alone[0]) if len(alone) == 1 else None
                    if fit is None or fit.alpha != alphas[alone[0]][i]:
                        moments = (self._moments.get(hook) or [None] * num_versions)[i]
                        penalties = dict(alpha_mc=alphas["ridge"][i], alpha_td=alphas["lstd"][i], alpha_critic=alphas["ridge_critic"][i])
                        if moments is not None:  # the ceilings' products of these rows
                            fit = moments.quadratic(cfg.mc, cfg.td, cfg.critic, **penalties)
                        else:
                            fit = fit_quadratic(train.x[hook][rows], train.x_next[hook][rows], train.ret[rows], train.reward[rows],
                                                train.terminal[rows], self.gamma, cfg.mc, cfg.td, value=train.value[rows],
                                                critic=cfg.critic, **penalties)
                    with torch.no_grad():
                        head.weight[i] = torch.from_numpy(fit.w).to(head.weight.dtype)
                        head.bias[i] = float(fit.b)
                head.requires_grad_(False)

    def _whitened(self, name: str) -> bool:
        """True when configuration ``name``'s heads are fitted in whitened coordinates (see ``precondition``)."""
        return name not in self.closed_form and self.loss_configs[name].supervised and bool(self.hparams.precondition)

    def _register_preconditioners(self) -> None:
        """P_i = (Sigma_i + (lambda_i + eps) I)^(-1/2) per preconditioned head: Sigma_i the covariance of version i's
        train rows (the ceilings' Gram, whose eigendecomposition the ridge path already holds) and lambda_i the
        head's matched L2 strength per unit of data weight, so that in u the regularised regression's Hessian is
        the identity and TD's is within (1 - gamma, 1 + gamma) of it. None where a version was wider than long."""
        for name in self.loss_configs:
            if not self._whitened(name):
                continue
            cfg = self.loss_configs[name]
            for hook in self.hooks_of(name):
                found = self._moments.get(hook) or []
                if not found or any(m is None for m in found):
                    continue
                alphas = self._alphas(hook)
                mats = []
                for i, m in enumerate(found):
                    pen = cfg.mc * alphas["ridge"][i] + cfg.td * alphas["lstd"][i] + cfg.critic * alphas["ridge_critic"][i]
                    shift = pen / ((cfg.mc + cfg.td + cfg.critic) * m.n) + PRECONDITION_FLOOR
                    evals, evecs = m.eigh()
                    mats.append((evecs * (1.0 / np.sqrt(np.maximum(evals / m.n, 0.0) + shift))) @ evecs.T)
                self.register_buffer(f"whiten@{_key(name, hook)}", torch.from_numpy(np.stack(mats)).float())

    def _weight(self, name: str, hook: str) -> Tensor:
        """The weights w (V, D) of ``name``'s heads at ``hook`` on standardised activations: the parameter itself,
        or w_i = P_i u_i for a preconditioned head (its parameter u lives in whitened coordinates)."""
        key = _key(name, hook)
        whiten = getattr(self, f"whiten@{key}", None)
        return self.heads[key].weight if whiten is None else torch.einsum("vde,ve->vd", whiten, self.heads[key].weight)

    def _init_from(self, path: str) -> None:
        """Start every head that the checkpoint also has (same configuration, hook point and versions) from
        the function it computes, re-expressed on this run's standardisation.

        The batches arrive standardised with this data's statistics (m, s); a head w . (x - m0) / s0 + b
        trained on other data reads the same on them as w * s / s0 . (x - m) / s + b + w . (m - m0) / s0,
        so that is what it starts from (identical weights when the data are the same). An unsupervised head
        keeps its direction; its scale is the free one that calibration sets.
        """
        ckpt = read_checkpoint(path)
        meta = ckpt.get("innercritic_probe") if isinstance(ckpt, dict) else None
        if meta is None or meta.get("kind") != PROBE_KIND:
            raise InnerCriticError(f"init_from {path!r} is {describe_checkpoint(ckpt)}, not an InnerCritic value-probe checkpoint ({PROBE_KIND})")
        state = ckpt["state_dict"]
        matched = []
        # Slack variables belong to the old data's states and L2 strengths to its penalties: both start afresh.
        solved = {_key(name, hook) for name in self.closed_form for hook in self.hooks}
        for key, head in self.heads.items():
            weight, bias = state.get(f"heads.{key}.weight"), state.get(f"heads.{key}.bias")
            if weight is None or bias is None or weight.shape != head.weight.shape:
                continue
            if key in solved:  # solved exactly on this run's data: that is where fine-tuning would end
                matched.append(f"heads.{key}")
                continue
            tag = key.split("@", 1)[1]
            mean0, std0 = state[f"mean@{tag}"].double(), state[f"std@{tag}"].double()
            mean, std = getattr(self, f"mean@{tag}").double(), getattr(self, f"std@{tag}").double()
            weight = weight.double()
            if f"whiten@{key}" in state:  # a preconditioned head stores u; the function it computes is w_i = P_i u_i
                weight = torch.einsum("vde,ve->vd", state[f"whiten@{key}"].double(), weight)
            new = weight * (std / std0)
            here = getattr(self, f"whiten@{key}", None)
            with torch.no_grad():
                head.weight.copy_(new if here is None else torch.linalg.solve(here.double(), new))  # u_i = P_i^-1 w_i
                head.bias.copy_(bias.double() + weight @ ((mean - mean0) / std0))
            matched.append(f"heads.{key}")
        if not matched:
            raise InnerCriticError(f"init_from {path!r} holds heads for {meta.get('heads')}, none of which match this run's "
                             f"{sorted(self.heads.keys())} (same configuration name, hook point and number of versions)")
        self.initialised_from = sorted(matched)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["innercritic_probe"] = {"kind": PROBE_KIND, "heads": sorted(self.heads.keys()), "hooks": self.hooks,
                                           "configs": {k: c.as_dict() for k, c in self.loss_configs.items()}, "gamma": self.gamma,
                                           "whitened": sorted(key for key in self.heads if hasattr(self, f"whiten@{key}"))}

    def hooks_of(self, config: str) -> list[str]:
        """The hook points at which ``config`` has heads."""
        return self.hooks if config in self.closed_form else self._sgd_hooks

    @property
    def sgd_configs(self) -> list[str]:
        """The configurations the training steps fit (those not solved in closed form)."""
        return [name for name in self.loss_configs if name not in self.closed_form]

    def on_train_start(self) -> None:
        if not self.sgd_configs:
            self.trainer.should_stop = True  # every head is solved: nothing for the epochs to do

    def configure_optimizers(self) -> dict[str, Any] | None:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None
        opt = torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # Cosine decay to 0 over the run: a constant step leaves Adam's last iterate jittering around the
        # optimum, and the closed forms the probes are compared with are the optimum itself.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ the probe
    def values(self, configs: list[str], hook: str, xs: Tensor) -> dict[str, Tensor]:
        """Every head's value (B, V) of each of ``configs`` on standardised activations (B, D) of ``hook``.

        One matrix product for all of them: on a full batch the pass over the activations is the cost.
        """
        heads = [self.heads[_key(name, hook)] for name in configs]
        weights = [self._weight(name, hook) for name in configs]
        v = F.linear(xs, torch.cat(weights), torch.cat([h.bias for h in heads]))
        out = dict(zip(configs, v.split([h.out_features for h in heads], dim=1)))
        for name, weight in zip(configs, weights):
            if self.loss_configs[name].unit_norm:
                out[name] = out[name] / weight[0].norm().clamp_min(1e-8)
        return out

    def linear_map(self, config: str, hook: str) -> tuple[Tensor, Tensor]:
        """(w (V, D), b (V,)) of the heads on standardised activations, scale constraint applied."""
        head, weight = self.heads[_key(config, hook)], self._weight(config, hook)
        scale = weight[0].norm().clamp_min(1e-8) if self.loss_configs[config].unit_norm else 1.0
        return (weight / scale).detach(), (head.bias / scale).detach()

    def _next_values(self, configs: list[str], hook: str, v: Mapping[str, Tensor], x_next: Tensor, at: Tensor,
                     found: Tensor) -> dict[str, Tensor]:
        """Every head's value (B, V) of each of ``configs`` at s_{t+1}: read from ``v`` (the values at s_t) where
        the successor row is in the batch, computed from ``x_next`` only for the rest.

        In a full batch every transition's successor is in the batch except an episode's last, so this skips
        one of a step's three passes over the activations, which are most of its cost (the fits are
        memory-bound; BENCHMARKS.md, "Probe step").
        """
        missing = (~found).nonzero().squeeze(1)
        computed = self.values(configs, hook, x_next[missing])
        return {name: v[name][at].index_put((missing,), computed[name]) for name in configs}

    def _loss(self, batch: Mapping[str, Any], stage: str) -> Tensor | None:
        total = 0.0
        logs: dict[str, Tensor] = {}
        # Training steps skip the closed-form heads (frozen); validation reports every configuration's loss.
        names = self.sgd_configs if stage == "train" else list(self.loss_configs)
        if not names:
            return None
        needs_next = [name for name in names if self.loss_configs[name].needs_next]
        successor = _successors(batch["state_index"]) if needs_next else None
        for hook in self.hooks:
            here = [name for name in names if hook in self.hooks_of(name)]
            if not here:
                continue
            xs = batch["x"][hook]
            v = self.values(here, hook, xs)
            here_next = [name for name in needs_next if name in here]
            v_next = self._next_values(here_next, hook, v, batch["x_next"][hook], *successor) if here_next else {}
            for name in here:
                cfg, key = self.loss_configs[name], _key(name, hook)
                slack = None
                if key in self.slacks:
                    module = self.slacks[key]
                    # index_select, not the Embedding's forward: its backward scatters into the table without the
                    # sort that embedding's backward does, a third of a full-batch step's time.
                    slack = module.weight.index_select(0, batch["state_index"]) if isinstance(module, nn.Embedding) else module(xs)
                terms = probe_loss_terms(cfg, v[name], v_next.get(name), batch, self.gamma,
                                         slack=slack, value_range=self.value_range)
                loss = sum(terms.values())
                l2 = getattr(self, f"l2@{key}", None)
                if l2 is not None:
                    loss = loss + (l2 * self._weight(name, hook).pow(2).sum(1)).sum()
                total = total + loss
                if hook == self.primary_hook:
                    logs[f"{stage}/{name}/loss"] = loss.detach()
        logs[f"{stage}/loss"] = total.detach()
        self.log_dict(logs, on_step=stage == "train", on_epoch=stage != "train", batch_size=len(batch["reward"]))
        return total

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        return self._loss(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._loss(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._loss(batch, "test")

    # ------------------------------------------------------------------ evaluation
    def on_train_end(self) -> None:
        self.results = self.evaluate()

    def on_test_epoch_end(self) -> None:
        self.results = self.evaluate()

    def teardown(self, stage: str) -> None:
        # The moments of wide layers hold hundreds of megabytes; the results and the fits are what a run keeps.
        self._moments.clear()

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """The evaluation table on the test split, plus the data behind the figures."""
        dm = self.trainer.datamodule
        splits = {name: dm.split_arrays(name) for name in ("train", "calib", "test")}
        random_net = self._random_net_features(dm)
        probes: dict[str, dict[str, tuple[Any, bool]]] = {}
        for name, cfg in self.loss_configs.items():
            probes[f"probe:{name}"] = {h: (self._predictor(name, h), not cfg.supervised) for h in self.hooks_of(name)}
        table = evaluation_table(splits["train"], splits["calib"], splits["test"], self.gamma, dm.version_names,
                                 probes=probes, random_net=random_net, seed=self.hparams.eval_seed, ceilings=self.ceilings,
                                 progress=self._bar("scoring"), moments=self._moments)
        out = {"table": table, "figures": self._figure_data(splits, probes), "version_names": list(dm.version_names),
               "test_split": split_composition(splits["test"], dm.version_names), "closed_form": list(self.closed_form)}
        if self.hparams.planning_episodes > 0 and getattr(dm, "agent", None) is not None:
            out["planning"] = self._plan(dm, splits["train"], splits["calib"])
        return out

    def _plan(self, dm: Any, train: Split, calib: Split) -> list[dict[str, Any]]:
        """One-step lookahead with the probe, ridge and the critic (and in the maze the exact value of the
        policy, which validates the planner), next to the policy and a random policy."""
        hook, agent = self.primary_hook, dm.agent
        tag = hook.replace(".", ":")
        mean, std = getattr(self, f"mean@{tag}").cpu(), getattr(self, f"std@{tag}").cpu()
        first = next(iter(self.loss_configs))
        w, b = self.linear_map(first, hook)
        ceilings = self.ceilings or fit_ceilings(train, calib, self.gamma, len(dm.version_names), hooks=[hook])
        ridge = ceilings[hook][0]["ridge"]
        sources = {
            f"probe:{first}": probe_value_fn(agent, hook, mean, std, w[0].cpu(), b[0].cpu()),
            "ridge": probe_value_fn(agent, hook, mean, std, torch.from_numpy(ridge.w).float(), float(ridge.b)),
            "critic": critic_value_fn(agent),
        }
        env = dm.request["env"]
        if env["spec"] == "maze":  # the planner's own check: lookahead on the policy's exact value
            sources["exact"] = exact_value_fn(agent, self.gamma)
        return compare_planners(agent, env["spec"], env["kwargs"], sources, self.gamma,
                                episodes=self.hparams.planning_episodes, seed=PLANNING_SEED_OFFSET + self.hparams.eval_seed,
                                num_envs=min(100, self.hparams.planning_episodes), progress=self._bar("planning") is not None)

    def _bar(self, label: str) -> str | None:
        """``label`` when the run shows a progress bar (long evaluations then show theirs), else None."""
        shown = self._trainer is not None and self._trainer.progress_bar_callback is not None
        return f"probe {label}" if shown else None

    def _predictor(self, config: str, hook: str):
        w, b = self.linear_map(config, hook)
        w64, b64 = w.double().cpu().numpy(), b.double().cpu().numpy()
        return lambda x: np.asarray(x, dtype=np.float64) @ w64.T + b64

    def _random_net_features(self, dm: Any):
        """Standardised activations, at the primary hook point, of a randomly initialised copy of the agent
        (the random-network floor): one forward pass over every cached state, indexed per split."""
        agent, cache = getattr(dm, "agent", None), getattr(dm, "cache", None)
        if agent is None or cache is None:
            return None
        torch.manual_seed(self.hparams.eval_seed)
        fresh = ActorCritic(**agent.config).eval()
        feats = hook_features(fresh, cache.column("obs"), [self.primary_hook])[self.primary_hook]
        rows = {name: dm.split_rows(name) for name in ("train", "calib", "test")}
        mean, std = feats[rows["train"]].mean(0), feats[rows["train"]].std(0)
        std[std < 1e-8] = 1.0
        z = (feats - mean) / std
        return {self.primary_hook: (z[rows["train"]], z[rows["train"] + 1], z[rows["calib"]], z[rows["test"]], z[rows["test"] + 1])}

    def _figure_data(self, splits: Mapping[str, Split], probes: Mapping[str, Mapping[str, tuple[Any, bool]]]) -> dict[str, Any]:
        """Predicted value against return on test states, and value traces along a few test episodes."""
        test, calib = splits["test"], splits["calib"]
        first = next(iter(self.loss_configs))
        predict, unsupervised = probes[f"probe:{first}"][self.primary_hook]
        rows = test.rows(0)
        pred = predict(test.x[self.primary_hook][rows])[:, 0]
        if unsupervised and len(calib.rows(0)) > 1:
            cal = calib.rows(0)
            (pred,) = calibrated(predict(calib.x[self.primary_hook][cal])[:, 0], calib.ret[cal], pred)
        episodes = list(dict.fromkeys(test.episode[rows].tolist()))[:4]
        traces = []
        for ep in episodes:
            r = rows[test.episode[rows] == ep]
            k = np.searchsorted(rows, r)
            traces.append({"episode": int(ep), "step": test.step[r].tolist(), "probe": pred[k].tolist(),
                           "return": test.ret[r].tolist(), "critic": test.value[r].tolist(),
                           "exact": None if test.exact is None else test.exact[r].tolist()})
        return {"config": first, "hook": self.primary_hook, "pred": pred.tolist(), "ret": test.ret[rows].tolist(),
                "exact": None if test.exact is None else test.exact[rows].tolist(), "traces": traces}

    def summary(self) -> dict[str, Any]:
        """Headline figures (first configuration, primary hook point, the policy's head) and the full table.

        The headline configuration's name is ``probe_config``: ``summary.json`` keeps ``config`` for the run's
        resolved hyperparameters (``callbacks.summary.RunSummary``)."""
        table = self.results.get("table", [])
        names = self.results.get("version_names", ["policy"])
        first = next(iter(self.loss_configs))
        out: dict[str, Any] = {"hook": getattr(self, "primary_hook", None), "probe_config": first,
                               "loss_weights": {k: c.as_dict() for k, c in self.loss_configs.items()},
                               "solver": self.hparams.solver, "closed_form": list(self.closed_form), "version_names": list(names)}

        def pick(source: str, hook: str | None) -> Mapping[str, Any] | None:
            return next((r for r in table if r["source"] == source and r["hook"] == hook and r["version"] == names[0]), None)

        for label, source, hook in (("probe", f"probe:{first}", out["hook"]), ("ridge", "ridge", out["hook"]),
                                    ("lstd", "lstd", out["hook"]), ("critic", "critic", None)):
            row = pick(source, hook)
            if row is not None:
                out[f"{label}/r2_return"] = row["r2_return"]
                if "r2_exact" in row:  # the maze: against the exact value of the policy
                    out[f"{label}/r2_return_exact"] = row["r2_exact"]
        for name in self.loss_configs:
            row = pick(f"probe:{name}", out["hook"])
            if row is not None:
                out[f"probe:{name}/r2_return"] = row["r2_return"]
        for key in ("planning", "test_split"):
            if key in self.results:
                out[key] = self.results[key]
        out["table"] = table
        return out
