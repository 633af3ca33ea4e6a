"""Linear probes for the value estimate: closed-form ceilings and evaluation metrics."""

from innercritic.probing.closed_form import (
    DEFAULT_ALPHAS,
    LinearValue,
    Standardiser,
    fit_affine,
    fit_lstd,
    fit_ridge,
)
from innercritic.probing.metrics import (
    dominance_accuracy,
    mse_over_var,
    normalised_td_error,
    pearson,
    r2,
    spearman,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "LinearValue",
    "Standardiser",
    "dominance_accuracy",
    "fit_affine",
    "fit_lstd",
    "fit_ridge",
    "mse_over_var",
    "normalised_td_error",
    "pearson",
    "r2",
    "spearman",
]
