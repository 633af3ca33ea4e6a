"""Exact values and geometry helpers for the cheese maze (plain numpy).

The cheese maze (``innercritic.envs.maze``) is the gridworld of the goal-misgeneralisation
literature (Langosco et al. 2022, "Goal Misgeneralization in Deep Reinforcement Learning", built
on procgen's ``maze``): a perfect maze, the mouse starts bottom-left, the cheese is the goal. Its
state space is tiny (the mouse's square, given the maze and the cheese), so the value of any policy
can be computed *exactly* by solving the Bellman equations, and geometric notions used by the
steering protocol (the decision square where the paths to the cheese and to the top-right corner
part) can be computed from shortest paths. Those exact numbers are the ground truth that value
probes and steering metrics are checked against.

Conventions shared with the environment: a maze is a ``bool`` array ``walls`` of shape (n, n),
``True`` = wall, coordinates are ``(row, col)`` with row 0 at the top; actions are
0=up, 1=down, 2=left, 3=right; a move into a wall or off the maze leaves the mouse in place;
entering the cheese square gives reward 1 and ends the episode (the cheese is terminal, value 0).
"""

from __future__ import annotations

from collections import deque
import numpy as np

from innercritic.errors import InnerCriticError

__all__ = [
    "ACTIONS",
    "ACTION_DELTAS",
    "free_squares",
    "transition_table",
    "policy_value",
    "optimal_value",
    "bfs_distances",
    "shortest_path",
    "decision_square",
    "first_move_toward",
    "is_perfect",
]

#: Action names, index = action id.
ACTIONS: tuple[str, ...] = ("up", "down", "left", "right")
#: (d_row, d_col) of each action, index = action id.
ACTION_DELTAS: np.ndarray = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
ACTION_DELTAS.setflags(write=False)


def _as_walls(walls: np.ndarray) -> np.ndarray:
    w = np.asarray(walls)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise InnerCriticError(f"walls must be a square 2-D array, got shape {w.shape}")
    return w.astype(bool, copy=False)


def _as_square(walls: np.ndarray, square, name: str) -> tuple[int, int]:
    n = walls.shape[0]
    try:
        r, c = (int(v) for v in square)
    except (TypeError, ValueError):
        raise InnerCriticError(f"{name}={square!r} is not a (row, col) pair") from None
    if not (0 <= r < n and 0 <= c < n):
        raise InnerCriticError(f"{name}={square!r} is outside the {n}x{n} maze (valid: 0 <= row, col < {n})")
    if walls[r, c]:
        raise InnerCriticError(f"{name}={square!r} is a wall; it must be a free square")
    return r, c


def _cheese_or_none(walls: np.ndarray, cheese) -> tuple[int, int] | None:
    if cheese is None:
        return None
    c = tuple(int(v) for v in cheese)
    if c == (-1, -1):
        return None
    return _as_square(walls, c, "cheese")


def free_squares(walls: np.ndarray) -> np.ndarray:
    """Free (non-wall) squares as an int64 array (F, 2) of (row, col), in row-major order."""
    return np.argwhere(~_as_walls(walls)).astype(np.int64)


def transition_table(walls: np.ndarray) -> np.ndarray:
    """Deterministic move table: ``T[f, a]`` = index (into ``free_squares(walls)``) reached from free
    square ``f`` by action ``a`` (itself when the move hits a wall or the edge)."""
    w = _as_walls(walls)
    n = w.shape[0]
    free = np.argwhere(~w)
    index = np.full((n + 2, n + 2), -1, dtype=np.int64)  # border of -1 makes edges behave as walls
    index[1:-1, 1:-1][~w] = np.arange(len(free))
    table = np.empty((len(free), 4), dtype=np.int64)
    for a, (dr, dc) in enumerate(ACTION_DELTAS):
        nxt = index[free[:, 0] + 1 + dr, free[:, 1] + 1 + dc]
        table[:, a] = np.where(nxt >= 0, nxt, np.arange(len(free)))
    return table


def policy_value(walls: np.ndarray, cheese, probs: np.ndarray, gamma: float) -> np.ndarray:
    """Exact discounted value of a stochastic policy at every mouse position.

    Solves ``(I - gamma P) V = r`` over the free non-cheese squares, where ``P`` moves the mouse
    under ``probs`` (a blocked move stays put) and ``r`` is the probability of entering the cheese
    in one step. The horizon is infinite: the environment's step limit is ignored (its effect on a
    value is at most ``gamma ** max_steps``).

    Args:
        walls: bool (n, n), True = wall.
        cheese: (row, col) of the cheese; None or (-1, -1) when there is none (all values are 0).
        probs: action probabilities, (F, 4) in ``free_squares(walls)`` order or (n, n, 4).
        gamma: discount in [0, 1]; with gamma = 1 the policy must reach the cheese from everywhere.

    Returns:
        float64 (n, n): the value of each free square (0 at the cheese), nan at walls.
    """
    w = _as_walls(walls)
    n = w.shape[0]
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise InnerCriticError(f"gamma={gamma} is invalid: valid discounts are in [0, 1]")
    free = np.argwhere(~w)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape == (n, n, 4):
        p = p[free[:, 0], free[:, 1]]
    elif p.shape != (len(free), 4):
        raise InnerCriticError(
            f"probs has shape {p.shape}; valid shapes are ({len(free)}, 4) "
            f"(free squares in row-major order) or ({n}, {n}, 4)"
        )
    if not np.all(np.isfinite(p)) or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise InnerCriticError("probs must be finite, non-negative, and sum to 1 over the 4 actions of each square")
    values = np.full((n, n), np.nan)
    values[~w] = 0.0
    goal = _cheese_or_none(w, cheese)
    if goal is None:
        return values
    table = transition_table(w)
    g = int(np.flatnonzero((free[:, 0] == goal[0]) & (free[:, 1] == goal[1]))[0])
    F = len(free)
    P = np.zeros((F, F))
    rows = np.repeat(np.arange(F), 4)
    np.add.at(P, (rows, table.ravel()), p.ravel())
    # Entering the cheese pays 1 and stops, so the cheese's column becomes reward, not continuation.
    r = P[:, g].copy()
    keep = np.arange(F) != g
    A = np.eye(F - 1) - gamma * P[np.ix_(keep, keep)]
    try:
        v = np.linalg.solve(A, r[keep])
    except np.linalg.LinAlgError:
        raise InnerCriticError(
            f"the Bellman system is singular (gamma={gamma}): with gamma = 1 the policy must reach "
            "the cheese with probability 1 from every square; use gamma < 1"
        ) from None
    if not np.all(np.isfinite(v)):
        raise InnerCriticError(f"the Bellman system has no finite solution (gamma={gamma}); use gamma < 1")
    vals = np.zeros(F)
    vals[keep] = v
    values[free[:, 0], free[:, 1]] = vals
    return values


def bfs_distances(walls: np.ndarray, source) -> np.ndarray:
    """Number of moves from ``source`` to every square: int64 (n, n), -1 at walls and unreachable squares."""
    w = _as_walls(walls)
    n = w.shape[0]
    sr, sc = _as_square(w, source, "source")
    dist = np.full((n, n), -1, dtype=np.int64)
    dist[sr, sc] = 0
    queue = deque([(sr, sc)])
    while queue:
        r, c = queue.popleft()
        d = dist[r, c] + 1
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < n and 0 <= cc < n and not w[rr, cc] and dist[rr, cc] < 0:
                dist[rr, cc] = d
                queue.append((rr, cc))
    return dist


def optimal_value(walls: np.ndarray, cheese, gamma: float) -> np.ndarray:
    """Value of the optimal policy: ``gamma ** (d - 1)`` at BFS distance d >= 1 from the cheese,
    0 at the cheese (terminal) and at squares that cannot reach it (or everywhere when there is no
    cheese), nan at walls. float64 (n, n)."""
    w = _as_walls(walls)
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise InnerCriticError(f"gamma={gamma} is invalid: valid discounts are in [0, 1]")
    values = np.full(w.shape, np.nan)
    values[~w] = 0.0
    goal = _cheese_or_none(w, cheese)
    if goal is None:
        return values
    d = bfs_distances(w, goal)
    reach = d >= 1
    values[reach] = gamma ** (d[reach] - 1).astype(np.float64)
    return values


def shortest_path(walls: np.ndarray, start, goal) -> list[tuple[int, int]]:
    """Squares of the shortest path from ``start`` to ``goal``, both included (unique in a perfect maze)."""
    w = _as_walls(walls)
    s = _as_square(w, start, "start")
    g = _as_square(w, goal, "goal")
    dist = bfs_distances(w, g)
    if dist[s] < 0:
        raise InnerCriticError(f"goal={g} cannot be reached from start={s}")
    n = w.shape[0]
    path = [s]
    r, c = s
    # Walk downhill on the distance-to-goal field; the first action in ACTIONS order breaks ties.
    while (r, c) != g:
        for dr, dc in ACTION_DELTAS:
            rr, cc = r + int(dr), c + int(dc)
            if 0 <= rr < n and 0 <= cc < n and dist[rr, cc] == dist[r, c] - 1:
                r, c = rr, cc
                break
        path.append((r, c))
    return path


def decision_square(walls: np.ndarray, cheese, start=None) -> tuple[int, int] | None:
    """The square where the path start->cheese and the path start->top-right corner part.

    Returns the last square the two paths share, or None when one path contains the other (the
    agent never has to choose between cheese and corner). ``start`` defaults to the mouse start
    (n-1, 0).
    """
    w = _as_walls(walls)
    n = w.shape[0]
    if start is None:
        start = (n - 1, 0)
    to_cheese = shortest_path(w, start, cheese)
    to_corner = shortest_path(w, start, (0, n - 1))
    k = 0
    while k < len(to_cheese) and k < len(to_corner) and to_cheese[k] == to_corner[k]:
        k += 1
    if k == len(to_cheese) or k == len(to_corner):
        return None
    return to_cheese[k - 1]


def first_move_toward(walls: np.ndarray, square, goal) -> int:
    """Action (0=up, 1=down, 2=left, 3=right) of the first move on the shortest path square -> goal."""
    w = _as_walls(walls)
    s = _as_square(w, square, "square")
    g = _as_square(w, goal, "goal")
    if s == g:
        raise InnerCriticError(f"square={s} is the goal itself; there is no first move")
    path = shortest_path(w, s, g)
    step = (path[1][0] - s[0], path[1][1] - s[1])
    return int(next(a for a, d in enumerate(ACTION_DELTAS) if tuple(int(x) for x in d) == step))


def is_perfect(walls: np.ndarray) -> bool:
    """True when the free squares are connected and their adjacencies form a tree (one path
    between any two free squares)."""
    w = _as_walls(walls)
    free = ~w
    num_free = int(free.sum())
    if num_free == 0:
        return False
    # A connected graph is a tree exactly when it has one edge fewer than vertices.
    edges = int((free[1:, :] & free[:-1, :]).sum() + (free[:, 1:] & free[:, :-1]).sum())
    if edges != num_free - 1:
        return False
    first = tuple(int(x) for x in np.argwhere(free)[0])
    return int((bfs_distances(w, first) >= 0).sum()) == num_free

