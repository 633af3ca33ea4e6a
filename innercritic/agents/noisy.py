"""Noisy versions of a policy: epsilon-mixtures with the uniform policy, and temperature scaling.

A version with mixture weight ``epsilon`` and temperature ``T`` acts with probabilities

    pi_v(a | s) = (1 - epsilon) * softmax(logits(s) / T)_a + epsilon / A.

For epsilon > 0 such a version is worse than a near-optimal policy almost everywhere, which is what
the unsupervised "dominance" probe loss builds on (v_policy(s) >= v_noisy(s)). Versions are named by a
short spec string (``"policy"``, ``"eps:0.25"``, ``"temp:2.0"``, ``"eps:0.1,temp:0.5"``) that
configs and the trajectory cache's manifest store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from innercritic.errors import InnerCriticError

__all__ = ["PolicyVersion", "parse_version"]

_VALID_FORMS = "'policy', 'eps:E', 'temp:T' or 'eps:E,temp:T' (E in [0, 1], T > 0)"


@dataclass(frozen=True)
class PolicyVersion:
    """The policy (epsilon 0, temperature 1) or a noisy version of it."""

    name: str  # identifier used in configs, metrics and the cache manifest, e.g. "eps:0.25"
    epsilon: float = 0.0  # weight of the uniform policy in the mixture, in [0, 1]
    temperature: float = 1.0  # softmax temperature applied to the logits, > 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.epsilon <= 1.0):
            raise InnerCriticError(f"PolicyVersion {self.name!r}: epsilon must be in [0, 1], got {self.epsilon}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise InnerCriticError(f"PolicyVersion {self.name!r}: temperature must be finite and > 0, got {self.temperature}")

    @property
    def is_policy(self) -> bool:
        """True when this version acts exactly like the unmodified policy."""
        return self.epsilon == 0.0 and self.temperature == 1.0

    def probs(self, logits: Tensor) -> Tensor:
        """Action probabilities (..., A) from policy logits (..., A)."""
        probs = torch.softmax(self._scaled(logits), dim=-1)
        if self.epsilon == 0.0:
            return probs
        return (1.0 - self.epsilon) * probs + self.epsilon / logits.shape[-1]

    def log_probs(self, logits: Tensor) -> Tensor:
        """Log action probabilities (..., A), computed in log space for stability."""
        log_policy = torch.log_softmax(self._scaled(logits), dim=-1)
        if self.epsilon == 0.0:
            return log_policy
        # log((1-e) p + e/A) without forming p: exact for tiny p where log(probs()) would underflow to -inf.
        uniform = torch.full_like(log_policy, math.log(self.epsilon / logits.shape[-1]))
        if self.epsilon == 1.0:
            return uniform
        return torch.logaddexp(log_policy + math.log1p(-self.epsilon), uniform)

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample one action per row of ``logits`` (B, A): int64 actions (B,)."""
        return torch.multinomial(self.probs(logits.float()), 1, generator=generator).squeeze(-1)

    def _scaled(self, logits: Tensor) -> Tensor:
        # Skip the division at temperature 1 so the policy version reproduces the raw policy bit for bit.
        return logits if self.temperature == 1.0 else logits / self.temperature


def parse_version(spec: str) -> PolicyVersion:
    """A PolicyVersion from its spec: ``"policy"``, ``"eps:0.25"``, ``"temp:2.0"``, ``"eps:0.1,temp:0.5"``.

    The version's name is the spec in canonical form (no spaces, eps before temp, floats as repr), so
    that equal versions get equal names.
    """
    if not isinstance(spec, str):
        raise InnerCriticError(f"policy version spec must be a string, got {type(spec).__name__}; valid forms: {_VALID_FORMS}")
    text = spec.strip().lower()
    if text == "policy":
        return PolicyVersion("policy")
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, raw = part.partition(":")
        key = key.strip()
        try:
            if not sep or key not in ("eps", "temp") or key in values:
                raise ValueError
            values[key] = float(raw.strip())
        except ValueError:
            raise InnerCriticError(f"bad policy version spec {spec!r}; valid forms: {_VALID_FORMS}") from None
    epsilon, temperature = values.get("eps", 0.0), values.get("temp", 1.0)
    if not (0.0 <= epsilon <= 1.0) or not (temperature > 0.0 and math.isfinite(temperature)):
        raise InnerCriticError(f"bad policy version spec {spec!r} (eps must be in [0, 1], temp > 0); valid forms: {_VALID_FORMS}")
    name = ",".join(f"{key}:{values[key]!r}" for key in ("eps", "temp") if key in values)
    return PolicyVersion(name, epsilon, temperature)
