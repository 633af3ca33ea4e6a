"""Exact values and maze geometry: hand-solved Bellman equations, agreement with Monte-Carlo returns
from the real environment, optimal values against value iteration, paths and decision squares."""

from __future__ import annotations

import numpy as np
import pytest

from innercritic.envs.maze import CheeseMaze, generate_level
from innercritic.envs.maze_values import (
    bfs_distances,
    decision_square,
    first_move_toward,
    free_squares,
    is_perfect,
    optimal_value,
    policy_value,
    shortest_path,
    transition_table,
)


def _corridor() -> np.ndarray:
    """5x5, only the bottom row's first three squares free: (4,0) - (4,1) - (4,2)."""
    walls = np.ones((5, 5), dtype=bool)
    walls[4, :3] = False
    return walls


def _t_maze() -> np.ndarray:
    """A hand-made perfect maze: a column up from the start (4,0) to (0,0), a row along the top to
    the corner (0,4), and a side branch (2,0) -> (2,1) -> (2,2)."""
    walls = np.ones((5, 5), dtype=bool)
    walls[:, 0] = False
    walls[0, :] = False
    walls[2, 1:3] = False
    return walls


# --------------------------------------------------------------------------------------------
# Hand-solved values


def test_policy_value_matches_hand_solved_corridor():
    # Free squares s0=(4,0), s1=(4,1), cheese C=(4,2); uniform policy (1/4 per action), gamma=9/10.
    # From s0 only "right" moves (to s1); up/down/left bump and stay. From s1 "left" -> s0,
    # "right" enters C (reward 1, terminal), up/down stay.
    #   V0 = 3/4 * g * V0 + 1/4 * g * V1               ->  (13/40) V0 = (9/40) V1  ->  V0 = 9/13 V1
    #   V1 = 1/4 * 1 + 1/4 * g * V0 + 2/4 * g * V1     ->  (11/20) V1 = 1/4 + (81/520) V1
    #                                                  ->  (205/520) V1 = 1/4  ->  V1 = 26/41
    #   V0 = 9/13 * 26/41 = 18/41
    walls = _corridor()
    values = policy_value(walls, (4, 2), np.full((3, 4), 0.25), gamma=0.9)
    assert values[4, 0] == pytest.approx(18 / 41, abs=1e-12)
    assert values[4, 1] == pytest.approx(26 / 41, abs=1e-12)
    assert values[4, 2] == 0.0
    assert np.isnan(values[walls]).all()
    # Always "right": V1 = 1 (enter the cheese), V0 = g * V1.
    right = np.tile([0.0, 0.0, 0.0, 1.0], (3, 1))
    values = policy_value(walls, (4, 2), right, gamma=0.9)
    np.testing.assert_allclose(values[4, :3], [0.9, 1.0, 0.0])
    # Always "left" never gets there: 0 everywhere.
    left = np.tile([0.0, 0.0, 1.0, 0.0], (3, 1))
    np.testing.assert_allclose(policy_value(walls, (4, 2), left, gamma=0.9)[4, :3], 0.0)
    # The (n, n, 4) layout gives the same numbers as the (F, 4) one.
    grid = np.zeros((5, 5, 4))
    grid[4, :3] = 0.25
    np.testing.assert_allclose(policy_value(walls, (4, 2), grid, 0.9), policy_value(walls, (4, 2), np.full((3, 4), 0.25), 0.9))


def test_no_cheese_means_zero_values():
    walls = _t_maze()
    probs = np.full((len(free_squares(walls)), 4), 0.25)
    for cheese in (None, (-1, -1)):
        v = policy_value(walls, cheese, probs, 0.9)
        assert (v[~walls] == 0).all() and np.isnan(v[walls]).all()
        o = optimal_value(walls, cheese, 0.9)
        assert (o[~walls] == 0).all() and np.isnan(o[walls]).all()


def test_policy_value_satisfies_the_bellman_equation_on_generated_mazes():
    rng = np.random.default_rng(0)
    for seed, n in [(1, 5), (2, 9), (3, 15), (4, 25)]:
        walls, cheese = generate_level(seed, n, "anywhere")
        free = free_squares(walls)
        probs = rng.dirichlet(np.ones(4), size=len(free))
        gamma = 0.95
        v = policy_value(walls, cheese, probs, gamma)
        table = transition_table(walls)
        vf = v[free[:, 0], free[:, 1]]
        target = np.array([(free[table[:, a]] == cheese).all(axis=1) for a in range(4)]).T
        backup = (probs * np.where(target, 1.0, gamma * vf[table])).sum(axis=1)
        at_cheese = (free == cheese).all(axis=1)
        np.testing.assert_allclose(vf[~at_cheese], backup[~at_cheese], atol=1e-10)
        assert vf[at_cheese] == 0
        assert (vf[~at_cheese] > 0).all() and (vf <= 1).all()


# --------------------------------------------------------------------------------------------
# Exact values against Monte-Carlo returns from the real environment


def _monte_carlo(level_seed: int, squares: list, probs_grid: np.ndarray, gamma: float, per_square: int):
    """Discounted return of the first episode from each start square, per env."""
    n = probs_grid.shape[0]
    num = per_square * len(squares)
    env = CheeseMaze(num, size=n, cheese="fixed", max_steps=400, seed=0)
    env.reset(options={"level_seeds": [level_seed] * num})
    group = np.repeat(np.arange(len(squares)), per_square)
    for i in range(num):
        if squares[group[i]] != (n - 1, 0):
            env.set_mouse(i, squares[group[i]])
    rng = np.random.default_rng(1)
    cum = probs_grid.cumsum(axis=-1)
    alive = np.ones(num, dtype=bool)
    returns = np.zeros(num)
    discount = 1.0
    for _ in range(400):
        pos = env.mouse_pos
        u = rng.random(num)
        actions = (u[:, None] > cum[pos[:, 0], pos[:, 1]]).sum(axis=1).clip(0, 3)
        _, rew, term, trunc, _ = env.step(actions)
        returns += alive * rew * discount
        alive &= ~(term | trunc)
        discount *= gamma
        if not alive.any():
            break
    return [returns[group == k] for k in range(len(squares))]


@pytest.mark.parametrize("policy", ["uniform", "biased"])
def test_exact_values_agree_with_monte_carlo_returns(policy):
    level_seed, n, gamma = 12, 5, 0.9
    walls, cheese = generate_level(level_seed, n, "fixed")
    probs = np.zeros((n, n, 4))
    probs[~walls] = 0.25
    if policy == "biased":
        # Lean toward the cheese (0.55 on the shortest-path move), so values are far from uniform.
        for r, c in free_squares(walls):
            if (r, c) != cheese:
                probs[r, c] = 0.15
                probs[r, c, first_move_toward(walls, (r, c), cheese)] = 0.55
    exact = policy_value(walls, cheese, probs, gamma)
    squares = [(n - 1, 0)] + [tuple(int(x) for x in p) for p in free_squares(walls)[::4] if tuple(p) != cheese][:4]
    samples = _monte_carlo(level_seed, squares, probs, gamma, per_square=1500)
    for square, ret in zip(squares, samples):
        se = ret.std(ddof=1) / np.sqrt(len(ret))
        assert abs(ret.mean() - exact[square]) < 4 * se + 1e-3, (square, ret.mean(), exact[square], se)


# --------------------------------------------------------------------------------------------
# Optimal values, paths, decision squares


def _value_iteration(walls: np.ndarray, cheese, gamma: float) -> np.ndarray:
    free = free_squares(walls)
    table = transition_table(walls)
    enters = (free[table] == np.asarray(cheese)).all(axis=-1)
    v = np.zeros(len(free))
    for _ in range(walls.size):
        v = np.where(enters, 1.0, gamma * v[table]).max(axis=1)
        v[(free == cheese).all(axis=1)] = 0.0
    out = np.full(walls.shape, np.nan)
    out[free[:, 0], free[:, 1]] = v
    return out


def test_optimal_value_matches_value_iteration_and_bfs():
    for seed, n in [(5, 5), (6, 9), (7, 13), (8, 21)]:
        walls, cheese = generate_level(seed, n, "anywhere")
        gamma = 0.97
        exact = optimal_value(walls, cheese, gamma)
        np.testing.assert_allclose(exact, _value_iteration(walls, cheese, gamma), atol=1e-12)
        dist = bfs_distances(walls, cheese)
        free = ~walls
        np.testing.assert_allclose(exact[free & (dist > 0)], gamma ** (dist[free & (dist > 0)] - 1.0))
        # The greedy policy that follows shortest paths achieves it.
        probs = np.zeros((n, n, 4))
        for r, c in free_squares(walls):
            if (r, c) != cheese:
                probs[r, c, first_move_toward(walls, (r, c), cheese)] = 1.0
            else:
                probs[r, c] = 0.25
        np.testing.assert_allclose(policy_value(walls, cheese, probs, gamma), exact, atol=1e-10)


def test_shortest_path_and_first_move():
    walls = _t_maze()
    assert shortest_path(walls, (4, 0), (2, 2)) == [(4, 0), (3, 0), (2, 0), (2, 1), (2, 2)]
    assert shortest_path(walls, (2, 2), (2, 2)) == [(2, 2)]
    assert first_move_toward(walls, (4, 0), (0, 4)) == 0  # up
    assert first_move_toward(walls, (0, 0), (0, 4)) == 3  # right
    assert first_move_toward(walls, (2, 2), (4, 0)) == 2  # left
    for seed, n in [(9, 9), (10, 17), (11, 25)]:
        walls, cheese = generate_level(seed, n, "anywhere")
        path = shortest_path(walls, (n - 1, 0), cheese)
        assert path[0] == (n - 1, 0) and path[-1] == cheese
        assert len(path) == bfs_distances(walls, cheese)[n - 1, 0] + 1
        for (r0, c0), (r1, c1) in zip(path, path[1:]):
            assert abs(r0 - r1) + abs(c0 - c1) == 1 and not walls[r1, c1]
        dist = bfs_distances(walls, cheese)
        table, free = transition_table(walls), free_squares(walls)
        for j, (r, c) in enumerate(free):
            if (r, c) != cheese:
                nr, nc = free[table[j, first_move_toward(walls, (r, c), cheese)]]
                assert dist[nr, nc] == dist[r, c] - 1


def test_decision_square():
    walls = _t_maze()
    assert decision_square(walls, (2, 2)) == (2, 0)
    assert decision_square(walls, (2, 1)) == (2, 0)
    assert decision_square(walls, (0, 2)) is None  # the cheese is on the way to the corner
    assert decision_square(walls, (0, 4)) is None
    assert decision_square(walls, (3, 0)) is None  # the corner path passes the cheese first
    # From (0,3) the corner is one step right and the cheese is to the left: they part at once.
    assert decision_square(walls, (2, 2), start=(0, 3)) == (0, 3)
    # On generated mazes the decision square is on both paths and the next squares differ.
    found = 0
    for seed in range(40):
        walls, cheese = generate_level(seed, 13, "anywhere")
        d = decision_square(walls, cheese)
        to_cheese, to_corner = shortest_path(walls, (12, 0), cheese), shortest_path(walls, (12, 0), (0, 12))
        if d is None:
            assert set(to_cheese) <= set(to_corner) or set(to_corner) <= set(to_cheese)
            continue
        found += 1
        k = to_cheese.index(d)
        assert to_corner.index(d) == k and to_cheese[: k + 1] == to_corner[: k + 1]
        assert to_cheese[k + 1] != to_corner[k + 1]
    assert found > 20


def test_is_perfect_and_free_squares():
    walls = _t_maze()
    assert is_perfect(walls)
    np.testing.assert_array_equal(free_squares(_corridor()), [[4, 0], [4, 1], [4, 2]])
    fs = free_squares(walls)
    assert [tuple(p) for p in fs] == sorted(tuple(p) for p in fs)  # row-major
    loop = walls.copy()
    loop[1, 1] = False  # (0,0)-(0,1)-(1,1)-(1,0) is now a cycle
    assert not is_perfect(loop)
    split = walls.copy()
    split[2, 1] = True  # (2,2) is cut off
    assert not is_perfect(split)
    assert not is_perfect(np.ones((5, 5), dtype=bool))
    walls, _ = generate_level(3, 11, "anywhere")
    passage = next((r, c) for r in range(11) for c in range(11) if (r + c) % 2 == 1 and walls[r, c])
    opened = walls.copy()
    opened[passage] = False
    assert is_perfect(walls) and not is_perfect(opened)


def test_value_functions_reject_bad_inputs():
    walls = _corridor()
    good = np.full((3, 4), 0.25)
    cases = [
        (lambda: policy_value(walls, (4, 2), np.full((4, 4), 0.25), 0.9), "(4, 4)"),
        (lambda: policy_value(walls, (4, 2), np.full((3, 4), 0.3), 0.9), "sum to 1"),
        (lambda: policy_value(walls, (4, 2), good, 1.5), "gamma=1.5"),
        (lambda: policy_value(walls, (0, 0), good, 0.9), "cheese=(0, 0)"),
        (lambda: policy_value(walls, (4, 2), np.tile([0, 0, 1.0, 0], (3, 1)), 1.0), "singular"),
        (lambda: optimal_value(walls, (4, 2), -0.1), "gamma=-0.1"),
        (lambda: shortest_path(walls, (0, 0), (4, 2)), "start=(0, 0)"),
        (lambda: shortest_path(walls, (4, 0), (9, 9)), "goal=(9, 9)"),
        (lambda: first_move_toward(walls, (4, 1), (4, 1)), "goal itself"),
        (lambda: free_squares(np.ones((3, 4), dtype=bool)), "(3, 4)"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert fragment in str(err.value), (fragment, str(err.value))
