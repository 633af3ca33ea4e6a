"""Closed-form ceilings and calibration on cached activations (numpy, float64).

- :class:`Standardiser`: per-feature mean/std fitted on the training split only.
- :func:`fit_ridge`: ridge regression on returns with an unpenalised intercept, the penalty picked
  by R^2 on a calibration split; :func:`ridge_path` gives every penalty's fit from one decomposition.
- :func:`fit_lstd`: LSTD(0), the closed-form TD fixed point of a linear value; :func:`lstd_path` the same
  for every penalty.
- :func:`fit_quadratic`: any mix of the two (the stationary point of a probe trained on mc and td terms
  with their penalties), so every probe configuration made of those terms has an exact solution.
- :func:`fit_affine`: least-squares scale and offset, to calibrate unsupervised probes (fitted on
  the calibration split, never on test).
- :class:`Moments`: the second moments of one set of transitions that all of the above are solved from.
  Forming them is the O(n d^2) part; a probe stage needs ridge on two targets, LSTD over a penalty grid
  and every mix of its configurations on the same rows, so it forms them once per hook point and
  version and solves everything else from them (d x d work each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from innercritic.probing.metrics import r2
from innercritic.errors import InnerCriticError

__all__ = [
    "DEFAULT_ALPHAS",
    "LinearValue",
    "Moments",
    "Standardiser",
    "fit_affine",
    "fit_lstd",
    "fit_quadratic",
    "lstd_path",
    "fit_ridge",
    "ridge_path",
]

#: Log grid of ridge penalties 1e-4 .. 1e6. The top reaches past the number of samples, because wide
#: layers on a few hundred correlated episodes choose penalties there (1e4 was the top choice on the
#: default maze agent's conv layers before the grid was widened).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-4, 6, 11))

_STD_FLOOR = 1e-8


def _matrix(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as a 2-d float array (a 1-d input is one feature): float32 stays float32, so the
    O(n d^2) products of wide layers run at single precision; every solve is in float64."""
    x = np.asarray(x)
    a = x if x.dtype == np.float32 else np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise InnerCriticError(f"{name} must be 1-d or 2-d, got shape {a.shape}")
    return a


def _vector(y: np.ndarray, n: int, name: str) -> np.ndarray:
    """Return ``y`` as a flat float64 vector of length ``n``."""
    v = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(v) != n:
        raise InnerCriticError(f"{name} has {len(v)} entries but x has {n} rows")
    return v


@dataclass(frozen=True)
class Standardiser:
    """Per-feature standardisation (x - mean) / std with std floored at 1e-8."""

    mean: np.ndarray  # per-feature mean of the training split
    std: np.ndarray  # per-feature std of the training split, floored at 1e-8

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        """Fit on the training split ``x`` of shape (n, d)."""
        a = _matrix(x, "x")
        if len(a) < 1:
            raise InnerCriticError("need at least 1 sample to fit a Standardiser")
        return cls(mean=a.mean(axis=0), std=np.maximum(a.std(axis=0), _STD_FLOOR))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise ``x`` (any split) with the training statistics."""
        a = _matrix(x, "x")
        if a.shape[1] != len(self.mean):
            raise InnerCriticError(
                f"x has {a.shape[1]} features, Standardiser was fit on {len(self.mean)}"
            )
        return (a - self.mean) / self.std


@dataclass(frozen=True)
class LinearValue:
    """A linear value v(x) = x . w + b."""

    w: np.ndarray  # weights, shape (d,)
    b: float  # intercept
    alpha: float  # penalty it was fitted with

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Values of the rows of ``x`` (shape (n, d)) as a float64 vector."""
        a = _matrix(x, "x")
        if a.shape[1] != len(self.w):
            raise InnerCriticError(f"x has {a.shape[1]} features, the probe has {len(self.w)}")
        return a @ self.w + self.b


class Moments:
    """Centred second moments of transitions ``x -> x_next``: every closed form of this module from one pass.

    With the rows' feature mean ``mean``, xc = x - mean and xc' = x_next - mean (the same shift, so an
    intercept absorbs it and no solution changes), and m = gamma (1 - terminal) per row, it holds

    - ``gram``: Xc^T Xc (d x d): ridge on any target from one eigendecomposition (:meth:`ridge_path`);
    - ``td``: the LSTD matrix Z^T (Z - m Z') of z = [xc, 1], (d+1) x (d+1) (:meth:`lstd_path`), when
      ``x_next`` is given;
    - ``xty``: Xc^T y and ``y_sum`` the sum of each named target in ``targets`` (returns, rewards, critic values).

    Products run at the features' precision (float32 stays float32, as in the rest of this module); the
    moments and every solve are float64. A probe stage forms these once per hook point and version and
    gets its ridge and LSTD ceilings, the closed forms of its probe configurations and the top principal
    component (a floor) from them, where each used to form its own products.
    """

    def __init__(self, x: np.ndarray, targets: dict[str, np.ndarray], x_next: np.ndarray | None = None,
                 terminal: np.ndarray | None = None, gamma: float | None = None) -> None:
        a = _matrix(x, "x")
        n, d = a.shape
        if n < 2:
            raise InnerCriticError(f"need at least 2 samples, got {n}")
        self.n, self.d = n, d
        self.mean = a.mean(axis=0, dtype=np.float64)
        # Centred at the features' precision, in place on one copy: a float64 temporary of a wide layer's rows
        # is twice their size, and each temporary is a pass over them. x and x_next take the same shift, so
        # its rounding is absorbed by the intercept.
        shift = self.mean.astype(a.dtype)
        xc = np.subtract(a, shift, dtype=a.dtype)
        self.gram = (xc.T @ xc).astype(np.float64)
        ys = {name: _vector(y, n, name) for name, y in targets.items()}
        self.xty = {name: (xc.T @ y.astype(a.dtype)).astype(np.float64) for name, y in ys.items()}
        self.y_sum = {name: float(y.sum()) for name, y in ys.items()}
        self.td: np.ndarray | None = None
        if x_next is not None:
            an = _matrix(x_next, "x_next")
            if an.shape != a.shape:
                raise InnerCriticError(f"x_next has shape {an.shape} but x has {a.shape}")
            if gamma is None or terminal is None:
                raise InnerCriticError("Moments with x_next needs terminal and gamma")
            m = gamma * (1.0 - _vector(terminal, n, "terminal"))
            diff = np.subtract(an, shift, dtype=a.dtype)  # Xc - m Xc', in place
            diff *= m.astype(a.dtype)[:, None]
            np.subtract(xc, diff, out=diff)
            td = np.empty((d + 1, d + 1))
            td[:d, :d] = xc.T @ diff
            td[:d, d] = xc.T @ (1.0 - m).astype(a.dtype)
            td[d, :d] = diff.sum(axis=0, dtype=np.float64)
            td[d, d] = float(np.sum(1.0 - m))
            self.td = td
        self._eig: tuple[np.ndarray, np.ndarray] | None = None

    def _linear(self, sol: np.ndarray, alpha: float) -> LinearValue:
        """The fit in raw coordinates from a solution [w, b] on the centred features."""
        w = sol[:-1]
        return LinearValue(w=w, b=float(sol[-1] - self.mean @ w), alpha=float(alpha))

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues ascending, eigenvectors) of ``gram``, computed once."""
        if self._eig is None:
            self._eig = np.linalg.eigh(self.gram)
        return self._eig

    def top_pc(self) -> np.ndarray:
        """The unit direction of the rows' largest variance (the top principal component)."""
        return self.eigh()[1][:, -1].copy()

    def ridge_path(self, target: str):
        """A function alpha -> ridge fit of ``target`` (unpenalised intercept), from one eigendecomposition;
        directions the data do not span get weight 0 (the minimum-norm solution at alpha 0)."""
        evals, evecs = self.eigh()
        proj = evecs.T @ self.xty[target]
        floor = 1e-12 * max(float(evals.max(initial=0.0)), 1.0)
        y_mean = self.y_sum[target] / self.n

        def fit(alpha: float) -> LinearValue:
            denom = evals + alpha
            inv = np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > floor)
            w = evecs @ (proj * inv)
            return LinearValue(w=w, b=float(y_mean - self.mean @ w), alpha=float(alpha))

        return fit

    def _system(self, mc: float, td: float, critic: float, target_mc: str, target_td: str, target_critic: str) -> tuple[np.ndarray, np.ndarray]:
        """The (d+1) x (d+1) matrix and right-hand side of a mix's stationary point, before its penalty."""
        d = self.d
        mat = np.zeros((d + 1, d + 1))
        rhs = np.zeros(d + 1)
        if mc + critic:
            mat[:d, :d] += (mc + critic) * self.gram
            mat[d, d] += (mc + critic) * self.n
        if td:
            if self.td is None:
                raise InnerCriticError("a TD closed form needs Moments formed with x_next, terminal and gamma")
            mat += td * self.td
        for weight, name in ((mc, target_mc), (td, target_td), (critic, target_critic)):
            if weight:
                rhs[:d] += weight * self.xty[name]
                rhs[d] += weight * self.y_sum[name]
        return mat, rhs

    def lstd_path(self, target: str = "reward"):
        """A function alpha -> LSTD(0) fit (TD fixed point on rewards ``target``; the intercept unpenalised)."""
        mat, rhs = self._system(0.0, 1.0, 0.0, "", target, "")
        eye = np.eye(self.d + 1)
        eye[-1, -1] = 0.0

        def solve(alpha: float) -> LinearValue:
            return self._linear(np.linalg.solve(mat + alpha * eye, rhs), alpha)

        return solve

    def quadratic(self, mc: float, td: float, critic: float = 0.0, alpha_mc: float = 0.0, alpha_td: float = 0.0,
                  alpha_critic: float = 0.0, targets: tuple[str, str, str] = ("ret", "reward", "value")) -> LinearValue:
        """The stationary point of a weighted mix of MC regression, semi-gradient TD(0) and regression on the
        critic, each with its L2 strength (see :func:`fit_quadratic`); ``targets`` names the moments' return,
        reward and critic-value targets."""
        if min(mc, td, critic) < 0 or mc + td + critic <= 0:
            raise InnerCriticError(f"fit_quadratic needs weights mc, td, critic >= 0 with one positive, got {mc}, {td}, {critic}")
        mat, rhs = self._system(mc, td, critic, *targets)
        pen = mc * alpha_mc + td * alpha_td + critic * alpha_critic
        mat[np.diag_indices(self.d)] += pen
        try:
            sol = np.linalg.solve(mat, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(mat, rhs, rcond=None)[0]  # no penalty on a rank-deficient layer: minimum norm
        return self._linear(sol, pen)


def _dual_ridge_path(xc: np.ndarray, yc: np.ndarray):
    """A function alpha -> ridge weights on centred data wider than long (n < d), from one eigendecomposition
    of the n x n kernel (the primal, n >= d, goes through :class:`Moments`)."""
    evals, evecs = np.linalg.eigh((xc @ xc.T).astype(np.float64))
    proj = evecs.T @ yc
    floor = 1e-12 * max(float(evals.max(initial=0.0)), 1.0)

    def weights(alpha: float) -> np.ndarray:
        denom = evals + alpha
        # Directions the data do not span get weight 0 (the minimum-norm solution) instead of 1/0 at alpha = 0.
        inv = np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > floor)
        scaled = evecs @ (proj * (inv if proj.ndim == 1 else inv[:, None]))
        return (xc.T @ scaled.astype(xc.dtype)).astype(np.float64)

    return weights


def ridge_path(x: np.ndarray, y: np.ndarray):
    """A function alpha -> ridge fit of ``y`` on ``x`` (unpenalised intercept), from one eigendecomposition.

    ``y`` of shape (n, m) fits m targets on the one decomposition; the function then returns a list of m fits.
    """
    a = _matrix(x, "x")
    many = np.ndim(y) == 2
    t = np.asarray(y, dtype=np.float64) if many else _vector(y, len(a), "y")
    if len(t) != len(a):
        raise InnerCriticError(f"y has {len(t)} rows, x has {len(a)}")
    if len(a) < 2:
        raise InnerCriticError(f"need at least 2 samples, got {len(a)}")
    columns = t if many else t[:, None]
    if len(a) >= a.shape[1]:
        moments = Moments(a, {str(k): columns[:, k] for k in range(columns.shape[1])})
        paths = [moments.ridge_path(str(k)) for k in range(columns.shape[1])]
        return (lambda alpha: [p(alpha) for p in paths]) if many else paths[0]
    x_mean, y_mean = a.mean(axis=0, dtype=np.float64), t.mean(axis=0)
    path = _dual_ridge_path((a - x_mean).astype(a.dtype), t - y_mean)

    def fit(alpha: float) -> LinearValue | list[LinearValue]:
        w = path(alpha)
        if not many:
            return LinearValue(w=w, b=float(y_mean - x_mean @ w), alpha=float(alpha))
        return [LinearValue(w=w[:, k], b=float(y_mean[k] - x_mean @ w[:, k]), alpha=float(alpha)) for k in range(t.shape[1])]

    return fit


def fit_ridge(
    x: np.ndarray,
    y: np.ndarray,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    x_cal: np.ndarray | None = None,
    y_cal: np.ndarray | None = None,
) -> LinearValue:
    """Ridge regression of ``y`` on ``x`` with an unpenalised intercept, in closed form.

    The penalty is the alpha in ``alphas`` with the best R^2 on (``x_cal``, ``y_cal``) when a
    calibration split is given (ties go to the smaller alpha), else the smallest alpha.
    """
    grid = sorted(float(al) for al in alphas)
    if not grid or grid[0] < 0:
        raise InnerCriticError(f"alphas must be non-empty and non-negative, got {list(alphas)}")
    if (x_cal is None) != (y_cal is None):
        raise InnerCriticError("give both x_cal and y_cal, or neither")
    fit = ridge_path(x, y)
    if x_cal is None:
        return fit(grid[0])
    ac = _matrix(x_cal, "x_cal")
    tc = _vector(y_cal, len(ac), "y_cal")
    best, best_score = None, -np.inf
    for alpha in grid:
        probe = fit(alpha)
        score = r2(probe.predict(ac), tc)
        if best is None or score > best_score:
            best, best_score = probe, score
    assert best is not None
    return best


def _transitions(x: np.ndarray, x_next: np.ndarray, reward: np.ndarray, terminal: np.ndarray):
    """Checked (x, x_next, reward, terminal) of at least 2 transitions, as float arrays."""
    a = _matrix(x, "x")
    an = _matrix(x_next, "x_next")
    if an.shape != a.shape:
        raise InnerCriticError(f"x_next has shape {an.shape} but x has {a.shape}")
    r = _vector(reward, len(a), "reward")
    d = _vector(terminal, len(a), "terminal")
    if len(a) < 2:
        raise InnerCriticError(f"need at least 2 samples, got {len(a)}")
    return a, an, r, d


def lstd_path(
    x: np.ndarray,
    x_next: np.ndarray,
    reward: np.ndarray,
    terminal: np.ndarray,
    gamma: float,
):
    """A function alpha -> LSTD(0) solution, forming the (d+1) x (d+1) system once (see :func:`fit_lstd`)."""
    a, an, r, d = _transitions(x, x_next, reward, terminal)
    n, k = len(a), a.shape[1] + 1
    if n >= k:
        # The intercept goes unpenalised, as in ridge, so that a penalty chosen on calibration data shrinks
        # the weights only (and semi-gradient TD with an L2 term on the weights has this same fixed point).
        return Moments(a, {"reward": r}, an, d, gamma).lstd_path("reward")
    # Wider than long (a conv layer on a short dataset): the push-through identity
    # (alpha I + Z^T D)^-1 Z^T = Z^T (alpha I + D Z^T)^-1 gives the solution from an n x n system; it
    # needs the penalty on every coordinate, so here the intercept is penalised too.
    ones = np.ones((n, 1), dtype=a.dtype)
    z = np.hstack([a, ones])
    diff = z - (gamma * (1.0 - d)).astype(a.dtype)[:, None] * np.hstack([an.astype(a.dtype), ones])
    kernel = (diff @ z.T).astype(np.float64)
    eye = np.eye(n)

    def solve(alpha: float) -> LinearValue:
        sol = (z.T @ np.linalg.solve(kernel + alpha * eye, r).astype(a.dtype)).astype(np.float64)
        return LinearValue(w=sol[:-1], b=float(sol[-1]), alpha=float(alpha))

    return solve


def fit_lstd(
    x: np.ndarray,
    x_next: np.ndarray,
    reward: np.ndarray,
    terminal: np.ndarray,
    gamma: float,
    alpha: float = 1e-6,
) -> LinearValue:
    """LSTD(0) with an intercept: the linear value whose TD error is orthogonal to the features.

    With z = [x, 1] and z' = [x_next, 1]: A = Z^T (Z - gamma (1 - terminal) Z'), c = Z^T r,
    [w, b] = solve(A + alpha P, c) with P = diag(1, .., 1, 0) (unpenalised intercept; all ones when
    n < d + 1, where the dual is solved). ``terminal`` is 1 only at true terminations, so the value never
    bootstraps through a terminal (x_next there is ignored); time-limit truncations must carry
    terminal = 0 with the real next state's features in ``x_next``, so it bootstraps through them.
    """
    return lstd_path(x, x_next, reward, terminal, gamma)(alpha)


def fit_quadratic(
    x: np.ndarray,
    x_next: np.ndarray,
    ret: np.ndarray,
    reward: np.ndarray,
    terminal: np.ndarray,
    gamma: float,
    mc: float,
    td: float,
    alpha_mc: float = 0.0,
    alpha_td: float = 0.0,
    value: np.ndarray | None = None,
    critic: float = 0.0,
    alpha_critic: float = 0.0,
) -> LinearValue:
    """The stationary point of ``mc * (MSE to the return + alpha_mc |w|^2 / n) + td * (semi-gradient TD(0)
    + alpha_td |w|^2 / n) + critic * (MSE to ``value`` + alpha_critic |w|^2 / n)`` over a linear value with
    an unpenalised intercept, in closed form.

    With z = [x, 1], z' = [x_next, 1], P = diag(1, .., 1, 0) and V the critic's values it solves
    (mc (Z^T Z + alpha_mc P) + critic (Z^T Z + alpha_critic P) + td (Z^T (Z - gamma (1 - terminal) Z') + alpha_td P)) [w, b]
    = Z^T (mc G + critic V + td r):
    ridge at ``td = 0``, LSTD at ``mc = 0`` (the same solutions as :func:`fit_ridge` and :func:`fit_lstd`
    at those penalties), and for a mix the point where the two gradients cancel, which is what a probe
    trained on the weighted sum converges to (the TD term's target is held fixed, so this is a fixed
    point, not a minimum, and exists whenever the matrix is invertible).
    """
    if critic and value is None:
        raise InnerCriticError("fit_quadratic with a critic term needs the critic's values (value=)")
    a, an, r, d = _transitions(x, x_next, reward, terminal)
    targets = {"ret": _vector(ret, len(a), "ret"), "reward": r}
    if critic:
        targets["value"] = _vector(value, len(a), "value")
    moments = Moments(a, targets, an if td else None, d if td else None, gamma if td else None)
    return moments.quadratic(mc, td, critic, alpha_mc, alpha_td, alpha_critic)


def fit_affine(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Least-squares (scale, offset) so that scale * pred + offset best matches ``target``.

    A constant ``pred`` gets scale 0 and the target's mean as offset.
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = _vector(target, len(p), "target")
    if len(p) < 2:
        raise InnerCriticError(f"need at least 2 samples, got {len(p)}")
    pc = p - p.mean()
    var = float(pc @ pc)
    scale = 0.0 if var == 0.0 else float(pc @ (t - t.mean())) / var
    return scale, float(t.mean() - scale * p.mean())
