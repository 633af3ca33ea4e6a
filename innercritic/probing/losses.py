"""The loss terms of a linear value probe, and the weights that mix them.

A probe configuration is a weighted sum of the terms below (DESIGN.md, "Probe losses"), for heads
``v[:, i]`` (head 0 values the policy, head i >= 1 the i-th noisy version):

- ``td``: squared TD error of each head on its own version's transitions, semi-gradient (the target
  ``r + gamma (1 - terminal) v(s')`` is held fixed, as in TD(0)), so its optimum is the TD fixed point
  that LSTD computes in closed form; bootstraps through time-limit truncations, never through terminals.
- ``mc``: squared error against the Monte-Carlo return on the head's own version's transitions.
- ``critic``: squared error against the agent's own critic at s_t (the positive control: at the critic
  tower's last layer that value is linear by construction, so a probe must recover it there).
- ``neg_var``: minus the batch variance of each head (keeps unsupervised solutions from collapsing to
  a constant; small weights only: alone it rewards any salient feature).
- ``slack``: dominance of the policy over its noisy versions, ``v_0(s) - v_i(s) = margin + softplus(xi_i(s))``
  at every state of every version, with learned slack variables xi; the loss is the squared residual.
- ``ordering``: noisier versions are worth no more, ``v_i(s) >= v_{i+1}(s)`` (versions listed from
  least to most noisy), as a squared hinge.
- ``terminal_zero``: every head values a terminal state (the ``s'`` of a terminating transition) at 0.
- ``bounds``: values stay within ``value_range`` (squared hinge).

``slack`` and ``neg_var`` use no reward labels; such a probe is fixed only up to sign and an affine
map, so it needs a scale constraint (``scale="unit_norm"``) and is scored after calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from innercritic.errors import InnerCriticError

__all__ = ["LOSS_TERMS", "LossConfig", "probe_loss_terms"]

LOSS_TERMS = ("td", "mc", "critic", "neg_var", "slack", "ordering", "terminal_zero", "bounds")
SCALES = ("auto", "none", "unit_norm")


@dataclass(frozen=True)
class LossConfig:
    """One probe configuration: a weight per loss term, the slack margin and the scale constraint."""

    td: float = 0.0  # semi-gradient TD(0) error on each head's own transitions
    mc: float = 0.0  # squared error against the Monte-Carlo return
    critic: float = 0.0  # squared error against the agent's critic (the positive control's target)
    neg_var: float = 0.0  # minus the batch variance of each head
    slack: float = 0.0  # dominance v_0 - v_i = margin + softplus(xi) with learned slack variables
    ordering: float = 0.0  # squared hinge on v_i < v_{i+1} between consecutive versions
    terminal_zero: float = 0.0  # squared value of terminal states
    bounds: float = 0.0  # squared hinge outside value_range
    margin: float = 0.0  # the slack term's minimum gap between the policy and a noisy version
    scale: str = "auto"  # "unit_norm" (head 0's weights have unit norm), "none", or "auto": unit_norm without td/mc

    def __post_init__(self) -> None:
        for name in LOSS_TERMS + ("margin",):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise InnerCriticError(f"probe loss weight {name}={value!r} is invalid: weights are numbers >= 0")
        if self.scale not in SCALES:
            raise InnerCriticError(f"probe scale {self.scale!r} is invalid; valid: {', '.join(SCALES)}")
        if not any(getattr(self, name) for name in LOSS_TERMS):
            raise InnerCriticError(f"a probe configuration needs at least one positive weight among {', '.join(LOSS_TERMS)}")

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> "LossConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise InnerCriticError(f"probe configuration {name!r} has unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        try:
            return cls(**{k: (float(v) if k != "scale" else v) for k, v in spec.items()})
        except ValueError as err:
            raise InnerCriticError(f"probe configuration {name!r}: {err}") from None

    @property
    def supervised(self) -> bool:
        """True when the configuration is fitted to labels (rewards, returns or the critic's values)."""
        return self.td > 0 or self.mc > 0 or self.critic > 0

    @property
    def quadratic(self) -> bool:
        """True when the loss is a quadratic in the head's weights with a linear stationary point (td, mc and
        critic only, no scale constraint): ``closed_form.fit_quadratic`` then gives the optimum SGD approaches."""
        others = [name for name in LOSS_TERMS if name not in ("td", "mc", "critic") and getattr(self, name)]
        return self.supervised and not others and not self.unit_norm

    @property
    def needs_next(self) -> bool:
        """True when a term reads the value of s_{t+1} (td, terminal_zero): the others skip that forward pass."""
        return self.td > 0 or self.terminal_zero > 0

    @property
    def unit_norm(self) -> bool:
        return self.scale == "unit_norm" or (self.scale == "auto" and not self.supervised)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _own(v: Tensor, version: Tensor) -> Tensor:
    """Each row's value under its own version's head: (B, V) -> (B,)."""
    return v.gather(1, version[:, None]).squeeze(1)


def probe_loss_terms(
    cfg: LossConfig,
    v: Tensor,  # (B, V) every head at s_t
    v_next: Tensor | None,  # (B, V) every head at s_{t+1}; needed only when cfg.needs_next
    batch: Mapping[str, Tensor],  # reward, terminal, ret, value (the critic), version: (B,)
    gamma: float,
    slack: Tensor | None = None,  # (B, V-1) slack variables xi at s_t, when cfg.slack > 0
    value_range: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Tensor]:
    """The weighted terms of one configuration (only those with a positive weight), each a scalar."""
    terms: dict[str, Tensor] = {}
    version = batch["version"]
    if cfg.td:
        target = batch["reward"] + gamma * (1.0 - batch["terminal"]) * _own(v_next, version).detach()
        terms["td"] = cfg.td * F.mse_loss(_own(v, version), target)
    if cfg.mc:
        terms["mc"] = cfg.mc * F.mse_loss(_own(v, version), batch["ret"])
    if cfg.critic:
        terms["critic"] = cfg.critic * F.mse_loss(_own(v, version), batch["value"])
    if cfg.neg_var:
        # The population variance written out: torch's var kernel took four times as long on a full batch.
        terms["neg_var"] = -cfg.neg_var * (v - v.mean(0)).pow(2).mean(0).mean()
    if cfg.slack and v.shape[1] > 1:
        if slack is None:
            raise InnerCriticError("the slack term needs slack variables")
        gap = v[:, :1] - v[:, 1:]
        terms["slack"] = cfg.slack * ((gap - cfg.margin - F.softplus(slack)) ** 2).mean()
    if cfg.ordering and v.shape[1] > 1:
        terms["ordering"] = cfg.ordering * (F.relu(v[:, 1:] - v[:, :-1]) ** 2).mean()
    if cfg.terminal_zero:
        term = batch["terminal"] > 0
        zero = v_next.new_zeros(())
        terms["terminal_zero"] = cfg.terminal_zero * ((v_next[term] ** 2).mean() if term.any() else zero)
    if cfg.bounds:
        lo, hi = value_range
        terms["bounds"] = cfg.bounds * ((F.relu(v - hi) ** 2) + (F.relu(lo - v) ** 2)).mean()
    return terms
