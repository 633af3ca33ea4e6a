"""Closed-form probes (ridge, LSTD, affine calibration) and probe metrics, against known answers."""

import numpy as np
import pytest

from innercritic.probing import (
    DEFAULT_ALPHAS,
    LinearValue,
    Standardiser,
    dominance_accuracy,
    fit_affine,
    fit_lstd,
    fit_ridge,
    mse_over_var,
    normalised_td_error,
    pearson,
    r2,
    spearman,
)
from innercritic.probing.closed_form import fit_quadratic, ridge_path
from innercritic.probing.evaluate import Split, shared_penalty, split_composition

# --------------------------------------------------------------------------------------------
# Standardiser


def test_standardiser_uses_train_stats_and_floors_constant_features():
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.normal(5.0, 2.0, 500), np.full(500, 3.0)])
    st = Standardiser.fit(train)
    z = st.transform(train)
    np.testing.assert_allclose(z[:, 0].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, 0].std(), 1.0, atol=1e-12)
    assert np.all(z[:, 1] == 0.0)  # constant feature: no blow-up
    assert st.std[1] == pytest.approx(1e-8)
    # Other splits are transformed with the training statistics, not their own.
    other = np.array([[st.mean[0] + 2 * st.std[0], 3.0], [st.mean[0], 3.0 + 1e-8]])
    np.testing.assert_allclose(st.transform(other), [[2.0, 0.0], [0.0, 1.0]], atol=1e-6)
    with pytest.raises(ValueError):
        st.transform(np.zeros((3, 5)))


# --------------------------------------------------------------------------------------------
# Ridge


def _linear_data(rng, n, d, w, b, noise):
    x = rng.normal(size=(n, d))
    return x, x @ w + b + noise * rng.normal(size=n)


def test_ridge_recovers_linear_value_with_small_alpha():
    rng = np.random.default_rng(1)
    d = 10
    w_true = rng.normal(size=d)
    x, y = _linear_data(rng, 400, d, w_true, 3.0, 0.01)
    xc, yc = _linear_data(rng, 200, d, w_true, 3.0, 0.01)
    xt, yt = _linear_data(rng, 200, d, w_true, 3.0, 0.01)
    st = Standardiser.fit(x)
    probe = fit_ridge(st.transform(x), y, x_cal=st.transform(xc), y_cal=yc)
    assert isinstance(probe, LinearValue)
    assert probe.alpha <= 1e-1
    # Undo the standardisation to compare with the generating weights.
    np.testing.assert_allclose(probe.w / st.std, w_true, atol=5e-3)
    assert probe.b - (st.mean / st.std) @ probe.w == pytest.approx(3.0, abs=5e-3)
    assert r2(probe.predict(st.transform(xt)), yt) > 0.99


def test_ridge_without_calibration_uses_smallest_alpha():
    rng = np.random.default_rng(2)
    x, y = _linear_data(rng, 50, 3, np.ones(3), 0.0, 0.1)
    assert fit_ridge(x, y).alpha == min(DEFAULT_ALPHAS) == pytest.approx(1e-4)
    assert fit_ridge(x, y, alphas=(10.0, 0.5, 3.0)).alpha == 0.5


def test_shared_penalty_maximises_the_mean_calibration_r2_over_versions():
    # Version i's fit at penalty alpha predicts x / (1 + alpha). Version 0's calibration returns are x
    # (alone it would choose alpha 0), version 1's are x / 4 (alone: alpha 3). Mean R^2 by hand:
    # alpha 0: (1 + (1 - 0.5625 / 0.0625)) / 2 = -3.5; alpha 1: (0.75 + 0) / 2 = 0.375;
    # alpha 3: (0.4375 + 1) / 2 = 0.71875. So both versions get their alpha-3 fits.
    x = np.linspace(-1.0, 1.0, 41)
    path = lambda alpha: LinearValue(w=np.array([1.0 / (1.0 + alpha)]), b=0.0, alpha=alpha)  # noqa: E731
    calib = [(x[:, None], x), (x[:, None], x / 4)]
    assert [f.alpha for f in shared_penalty([path, path], (0.0, 1.0, 3.0), [calib[0], calib[0]])] == [0.0, 0.0]
    assert [f.alpha for f in shared_penalty([path, path], (3.0, 0.0, 1.0), calib)] == [3.0, 3.0]

    def singular_at_3(alpha):
        if alpha == 3.0:
            raise np.linalg.LinAlgError("singular")
        return path(alpha)

    # An alpha whose system is singular is skipped; a version without a fit keeps None and no vote.
    assert [f.alpha for f in shared_penalty([path, singular_at_3], (0.0, 1.0, 3.0), calib)] == [1.0, 1.0]
    fits = shared_penalty([None, path], (0.0, 1.0, 3.0), calib)
    assert fits[0] is None and fits[1].alpha == 3.0


def test_ridge_calibration_picks_large_alpha_on_pure_noise():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 25)), rng.normal(size=30)
    xc, yc = rng.normal(size=(300, 25)), rng.normal(size=300)
    assert fit_ridge(x, y, x_cal=xc, y_cal=yc).alpha >= 1e2


def test_ridge_huge_alpha_shrinks_to_mean():
    rng = np.random.default_rng(4)
    w_true = np.array([2.0, -1.0, 0.5])
    x, y = _linear_data(rng, 200, 3, w_true, 7.0, 0.01)
    probe = fit_ridge(x, y, alphas=(1e9,))
    assert np.linalg.norm(probe.w) < 1e-5 * np.linalg.norm(w_true)
    assert probe.b == pytest.approx(y.mean(), abs=1e-4)
    # Intercept is unpenalised: the prediction is the training mean, not 0.
    np.testing.assert_allclose(probe.predict(x), y.mean(), atol=1e-4)


def test_ridge_dual_matches_primal_formula_when_n_less_than_d():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(8, 20)), rng.normal(size=8)
    alpha = 0.3
    probe = fit_ridge(x, y, alphas=(alpha,))
    xc, yc = x - x.mean(0), y - y.mean()
    w_primal = np.linalg.solve(xc.T @ xc + alpha * np.eye(20), xc.T @ yc)
    np.testing.assert_allclose(probe.w, w_primal, atol=1e-10)
    assert probe.b == pytest.approx(y.mean() - x.mean(0) @ w_primal)


def test_ridge_bad_inputs():
    x, y = np.zeros((5, 2)), np.zeros(5)
    with pytest.raises(ValueError):
        fit_ridge(x, np.zeros(4))
    with pytest.raises(ValueError):
        fit_ridge(x, y, x_cal=x)
    with pytest.raises(ValueError):
        fit_ridge(x[:1], y[:1])


# --------------------------------------------------------------------------------------------
# LSTD


def _random_chain(rng, n_states):
    p = rng.uniform(size=(n_states, n_states)) + 0.1
    p /= p.sum(axis=1, keepdims=True)
    return p, rng.normal(size=n_states)


def _sample_chain(rng, p, r, n_steps, horizon):
    """One long stream of transitions, truncated (terminal=0) and reset every ``horizon`` steps."""
    n = len(r)
    s = np.empty(n_steps, dtype=int)
    s_next = np.empty(n_steps, dtype=int)
    cum = np.cumsum(p, axis=1)
    u = rng.uniform(size=n_steps)
    state = rng.integers(n)
    for t in range(n_steps):
        if t % horizon == 0:
            state = rng.integers(n)
        s[t] = state
        state = min(int(np.searchsorted(cum[state], u[t])), n - 1)
        s_next[t] = state
    return s, s_next


def test_lstd_recovers_true_value_from_sampled_transitions():
    rng = np.random.default_rng(6)
    n, gamma = 5, 0.9
    p, r = _random_chain(rng, n)
    v_true = np.linalg.solve(np.eye(n) - gamma * p, r)
    phi = rng.normal(size=(n, n))  # full-rank map: V is exactly linear in the features
    s, s_next = _sample_chain(rng, p, r, 20_000, horizon=50)
    probe = fit_lstd(phi[s], phi[s_next], r[s], np.zeros(len(s)), gamma)
    v_hat = probe.predict(phi)
    np.testing.assert_allclose(v_hat, v_true, atol=0.05 * np.abs(v_true).max())
    # With features that represent every function of the state, LSTD is exactly the value of the
    # empirical chain (truncations bootstrap, so there is no horizon effect).
    counts = np.zeros((n, n))
    np.add.at(counts, (s, s_next), 1.0)
    p_hat = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(v_hat, np.linalg.solve(np.eye(n) - gamma * p_hat, r), atol=1e-4)


def test_lstd_solves_projected_bellman_equation_with_low_rank_features():
    rng = np.random.default_rng(7)
    n, k, gamma = 6, 2, 0.8
    # Transition probabilities in quarters, uniform state weighting: enumerate every (s, s') pair
    # 4 * P[s, s'] times so the sample *is* the distribution D(s) P(s, s').
    p = rng.multinomial(4, np.ones(n) / n, size=n) / 4.0
    r = rng.normal(size=n)
    phi = rng.normal(size=(n, k))
    pairs = [(i, j) for i in range(n) for j in range(n) for _ in range(int(round(4 * p[i, j])))]
    s, s_next = np.array(pairs).T
    probe = fit_lstd(phi[s], phi[s_next], r[s], np.zeros(len(s)), gamma, alpha=1e-12)
    z = np.hstack([phi, np.ones((n, 1))])
    d_w = np.eye(n) / n
    theta = np.linalg.solve(z.T @ d_w @ (z - gamma * p @ z), z.T @ d_w @ r)
    np.testing.assert_allclose(probe.w, theta[:-1], atol=1e-8)
    assert probe.b == pytest.approx(theta[-1], abs=1e-8)
    # Fixed point: the TD error is orthogonal to the features (projected Bellman equation).
    v, v_next = probe.predict(phi[s]), probe.predict(phi[s_next])
    delta = r[s] + gamma * v_next - v
    np.testing.assert_allclose(np.hstack([phi[s], np.ones((len(s), 1))]).T @ delta, 0.0, atol=1e-8)
    # And it is not simply regression on one-step rewards (the chain matters).
    assert not np.allclose(probe.predict(phi), fit_ridge(phi[s], r[s], alphas=(0.0,)).predict(phi))


def test_lstd_never_bootstraps_through_terminals():
    gamma = 0.9
    phi = np.eye(3)
    # Chain 0 -> 1 -> 2 -> end, reward 1 per step. The terminal row's x_next is a decoy (state 0).
    s = np.array([0, 1, 2])
    s_next_feat = phi[[1, 2, 0]]
    term = np.array([0.0, 0.0, 1.0])
    probe = fit_lstd(phi[s], s_next_feat, np.ones(3), term, gamma, alpha=1e-12)
    v_true = np.array([1 + gamma + gamma**2, 1 + gamma, 1.0])
    np.testing.assert_allclose(probe.predict(phi), v_true, atol=1e-8)
    td = normalised_td_error(v_true, v_true[[1, 2, 0]], np.ones(3), term, gamma)
    assert td == pytest.approx(0.0, abs=1e-20)
    # Marking the last step as a truncation instead bootstraps into the decoy and changes values.
    trunc = fit_lstd(phi[s], s_next_feat, np.ones(3), np.zeros(3), gamma, alpha=1e-12)
    np.testing.assert_allclose(trunc.predict(phi), np.full(3, 1 / (1 - gamma)), atol=1e-6)


def test_lstd_with_zero_gamma_is_least_squares_on_rewards():
    rng = np.random.default_rng(8)
    x, x_next = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    reward = rng.normal(size=100)
    probe = fit_lstd(x, x_next, reward, np.zeros(100), gamma=0.0, alpha=1e-12)
    coef, *_ = np.linalg.lstsq(np.hstack([x, np.ones((100, 1))]), reward, rcond=None)
    np.testing.assert_allclose(probe.w, coef[:-1], atol=1e-9)
    assert probe.b == pytest.approx(coef[-1], abs=1e-9)


def test_lstd_bad_inputs():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError):
        fit_lstd(x, np.zeros((4, 3)), np.zeros(4), np.zeros(4), 0.9)
    with pytest.raises(ValueError):
        fit_lstd(x, x, np.zeros(3), np.zeros(4), 0.9)


# --------------------------------------------------------------------------------------------
# Affine calibration


def test_fit_affine_recovers_negative_scale_and_offset():
    rng = np.random.default_rng(9)
    pred = rng.normal(size=100)
    scale, offset = fit_affine(pred, -2.5 * pred + 4.0)
    assert scale == pytest.approx(-2.5)
    assert offset == pytest.approx(4.0)
    assert fit_affine(np.ones(5), np.arange(5.0)) == (0.0, 2.0)
    with pytest.raises(ValueError):
        fit_affine(np.ones(5), np.ones(4))


# --------------------------------------------------------------------------------------------
# Metrics


def test_r2_perfect_and_mean_prediction():
    t = np.array([1.0, 2.0, 4.0, 7.0])
    assert r2(t, t) == 1.0
    assert r2(np.full(4, t.mean()), t) == pytest.approx(0.0, abs=1e-15)
    # Hand-computed: mean 3.5, SS_res = 1 + 0 + 1 + 0 = 2, SS_tot = 6.25 + 2.25 + 0.25 + 12.25 = 21.
    assert r2(np.array([2.0, 2.0, 5.0, 7.0]), t) == pytest.approx(1 - 2 / 21)
    assert mse_over_var(np.array([2.0, 2.0, 5.0, 7.0]), t) == pytest.approx(2 / 21)


def test_pearson_and_spearman_on_monotone_nonlinear_pair():
    x = np.arange(1.0, 11.0)
    y = np.exp(x)
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.9
    assert pearson(x, 3 * x - 1) == pytest.approx(1.0)
    assert spearman(x, -y) == pytest.approx(-1.0)


def test_spearman_uses_average_ranks_for_ties():
    # Ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; Pearson against [1, 2, 3, 4] is 0.94868...
    a = np.array([1.0, 2.0, 2.0, 3.0])
    b = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, b) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], b)[0, 1])
    assert spearman(a, b) == pytest.approx(0.9486832980505138)


def test_dominance_accuracy_tiny_example():
    v0 = np.array([1.0, 2.0, 3.0, 4.0])
    vi = np.array([0.5, 2.0, 3.5, 1.0])  # strictly greater at states 0 and 3; a tie does not count
    assert dominance_accuracy(v0, vi) == 0.5
    assert isinstance(dominance_accuracy(v0, vi), float)


def test_normalised_td_error_hand_computed():
    v = np.array([1.0, 3.0])
    v_next = np.array([2.0, 10.0])
    reward = np.array([0.0, 1.0])
    term = np.array([0.0, 1.0])
    # deltas: 1 - 0 - 0.5 * 2 = 0 ; 3 - 1 - 0 = 2  -> mean sq 2, Var(v) = 1.
    assert normalised_td_error(v, v_next, reward, term, 0.5) == pytest.approx(2.0)


def test_normalised_td_error_zero_for_true_value_of_deterministic_cycle():
    # Cycle 0 -> 1 -> 2 -> 0 (no terminals, e.g. truncated episodes), V = (I - gamma P)^-1 r.
    gamma, r = 0.9, np.array([1.0, -2.0, 0.5])
    p = np.roll(np.eye(3), 1, axis=1)
    v = np.linalg.solve(np.eye(3) - gamma * p, r)
    nxt = np.array([1, 2, 0])
    assert normalised_td_error(v, v[nxt], r, np.zeros(3), gamma) == pytest.approx(0.0, abs=1e-20)
    # A wrong value (V + 1) has TD error (1 - gamma)^2 / Var(V).
    expected = (1 - gamma) ** 2 / v.var()
    assert normalised_td_error(v + 1, v[nxt] + 1, r, np.zeros(3), gamma) == pytest.approx(expected)


@pytest.mark.parametrize("fn", [r2, pearson, spearman, mse_over_var, dominance_accuracy])
def test_metrics_reject_bad_inputs(fn):
    with pytest.raises(ValueError, match="mismatched lengths"):
        fn(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        fn(np.zeros(1), np.zeros(1))


def test_td_error_rejects_bad_inputs():
    with pytest.raises(ValueError, match="mismatched lengths"):
        normalised_td_error(np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(3), 0.9)
    with pytest.raises(ValueError, match="at least 2"):
        normalised_td_error(np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1), 0.9)


def test_lstd_on_wide_features_solves_the_same_system_through_its_dual():
    rng = np.random.default_rng(3)
    n, d, gamma, alpha = 30, 50, 0.9, 0.5
    x, x_next, reward = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=n)
    terminal = (rng.random(n) < 0.2).astype(float)
    z, zn = np.hstack([x, np.ones((n, 1))]), np.hstack([x_next, np.ones((n, 1))])
    primal = np.linalg.solve(z.T @ (z - gamma * (1 - terminal)[:, None] * zn) + alpha * np.eye(d + 1), z.T @ reward)
    fitted = fit_lstd(x, x_next, reward, terminal, gamma, alpha=alpha)
    assert np.allclose(fitted.w, primal[:-1], atol=1e-10) and abs(fitted.b - primal[-1]) < 1e-10


def test_lstd_leaves_the_intercept_unpenalised_when_solved_in_its_primal():
    rng = np.random.default_rng(5)
    n, d, gamma, alpha = 200, 4, 0.9, 50.0
    x, x_next, reward = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=n) + 3.0
    terminal = (rng.random(n) < 0.2).astype(float)
    z, zn = np.hstack([x, np.ones((n, 1))]), np.hstack([x_next, np.ones((n, 1))])
    penalty = alpha * np.diag([1.0] * d + [0.0])
    expected = np.linalg.solve(z.T @ (z - gamma * (1 - terminal)[:, None] * zn) + penalty, z.T @ reward)
    fitted = fit_lstd(x, x_next, reward, terminal, gamma, alpha=alpha)
    assert np.allclose(fitted.w, expected[:-1], atol=1e-10) and abs(fitted.b - expected[-1]) < 1e-10


def test_split_composition_counts_the_episodes_cut_by_the_time_limit_and_their_states():
    # version 0: episode 7 terminates after 3 steps, episode 9 is cut after 5; version 1: one episode of 2, terminated
    episode = np.array([7, 7, 7, 9, 9, 9, 9, 9, 4, 4])
    terminal = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=np.float32)
    version = np.array([0] * 8 + [1] * 2)
    n = len(episode)
    split = Split(x={}, x_next={}, reward=np.zeros(n), terminal=terminal, ret=np.zeros(n), value=np.zeros(n),
                  value_next=np.zeros(n), version=version, step=np.zeros(n, np.int64), episode=episode)
    assert split_composition(split, ["policy", "eps:0.5"]) == {
        "policy": {"episodes": 2, "cut_episodes": 1, "states": 8, "states_in_cut": 5},
        "eps:0.5": {"episodes": 1, "cut_episodes": 0, "states": 2, "states_in_cut": 0},
    }


def test_ridge_path_with_several_targets_equals_one_fit_per_target():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 4))
    y = np.stack([x @ rng.normal(size=4) + rng.normal(size=60), rng.normal(size=60)], 1)
    both = ridge_path(x, y)(2.0)
    for k in range(2):
        one = ridge_path(x, y[:, k])(2.0)
        assert np.allclose(both[k].w, one.w) and both[k].b == pytest.approx(one.b)


def test_fit_quadratic_is_ridge_lstd_and_the_critic_regression_at_its_corners():
    rng = np.random.default_rng(4)
    x, xn = rng.normal(size=(80, 3)), rng.normal(size=(80, 3))
    ret, rew, value = rng.normal(size=80), rng.normal(size=80), rng.normal(size=80)
    term = (rng.random(80) < 0.2).astype(float)
    pairs = [(fit_quadratic(x, xn, ret, rew, term, 0.9, 1.0, 0.0, alpha_mc=3.0), fit_ridge(x, ret, alphas=(3.0,))),
             (fit_quadratic(x, xn, ret, rew, term, 0.9, 0.0, 1.0, alpha_td=3.0), fit_lstd(x, xn, rew, term, 0.9, alpha=3.0)),
             (fit_quadratic(x, xn, ret, rew, term, 0.9, 0.0, 0.0, value=value, critic=2.0, alpha_critic=3.0),
              fit_ridge(x, value, alphas=(3.0,)))]
    for got, want in pairs:
        assert np.allclose(got.w, want.w, atol=1e-8) and got.b == pytest.approx(want.b, abs=1e-8)
    with pytest.raises(ValueError, match="critic"):
        fit_quadratic(x, xn, ret, rew, term, 0.9, 0.0, 0.0, critic=1.0)


def test_bootstrap_r2_over_groups_contains_the_estimate_and_narrows_with_more_groups():
    from innercritic.stats import bootstrap_r2
    rng = np.random.default_rng(5)
    widths = []
    for groups in (20, 320):
        g = np.repeat(np.arange(groups), 10)
        target = rng.normal(size=groups)[g] + 0.3 * rng.normal(size=len(g))  # most variance between groups
        pred = target + 0.5 * rng.normal(size=len(g))
        lo, hi = bootstrap_r2(pred, target, g, draws=500)
        assert lo < r2(pred, target) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5, widths  # about 1 / sqrt(16) = 1/4 of the width
    assert np.isnan(bootstrap_r2(np.zeros(5), np.arange(5.0), np.zeros(5))[0]), "one group: no interval"
