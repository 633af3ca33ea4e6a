"""The cheese maze: a vectorised, procgen-style maze for goal-misgeneralisation research.

This reproduces the setting of the maze-solving network literature (Langosco et al. 2022, "Goal
Misgeneralization in Deep Reinforcement Learning", which trains on procgen's ``maze`` with the
cheese confined to the top-right corner and tests with the cheese anywhere): a perfect maze on an
odd-sized grid, the mouse starts bottom-left, entering the cheese gives reward 1 and ends the
episode, a step limit truncates. Observations are three binary channels (walls, mouse, cheese)
padded to a fixed size, so one network serves several maze sizes.

Everything is plain numpy behind gymnasium's ``VectorEnv`` API (same-step autoreset). ``step`` is
a handful of whole-batch array operations on a precomputed move table; only the envs whose episode
just ended are touched one by one, to look up their next level. Levels are a pure, memoised
function of a level seed (:func:`generate_level`), so a level can be rebuilt anywhere from its seed,
and the exact value of any policy on it comes from :mod:`innercritic.envs.maze_values`.

Mazes are made like procgen's ``MazeGen::generate_maze``: randomised Kruskal (knock down the walls
between nodes in random order, skipping those that would close a loop), which gives the many short
dead ends of the procgen mazes. The random order comes from a splitmix64 hash of the level seed,
not from numpy's generators, so a level seed names the same maze across numpy versions.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields
from typing import Any, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from innercritic.envs.maze_values import ACTION_DELTAS, ACTIONS, free_squares
from innercritic.errors import InnerCriticError

__all__ = [
    "ACTIONS",
    "ACTION_DELTAS",
    "MIN_SIZE",
    "MAX_SIZE",
    "CheeseMaze",
    "MazeState",
    "generate_level",
    "level_size",
]

MIN_SIZE = 5
MAX_SIZE = 25
_LEVEL_CACHE_SIZE = 16384  # a 25x25 level is ~1 KB: at most ~20 MB
# Levels laid out in a frame (~1 KB at 9x9, ~6 KB at 25x25) are kept per frame size up to this
# many bytes, so that a procgen-style training set of tens of thousands of levels stays cached.
_PREPARED_CACHE_BYTES = 64 * 2**20

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_SALT_SIZE = 0x5A5A_0001
_SALT_CHEESE = 0x5A5A_0002
_CHEESE_FORMS = "'top_right:K' (1 <= K <= smallest size), 'anywhere', 'fixed' (top-right corner), 'fixed:R,C' (R, C even)"


# ---------------------------------------------------------------------------------------------
# Hashing: splitmix64, in Python ints (level generation) and numpy uint64 (per-env streams).


def _mix(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _C1) & _MASK64
    z = ((z ^ (z >> 27)) * _C2) & _MASK64
    return z ^ (z >> 31)


_U27, _U30, _U31 = np.uint64(27), np.uint64(30), np.uint64(31)
_UC1, _UC2 = np.uint64(_C1), np.uint64(_C2)


def _mix_np(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> _U30)
    z *= _UC1
    z ^= z >> _U27
    z *= _UC2
    z ^= z >> _U31
    return z


def _level_hash(level_seed: int, n: int, salt: int) -> int:
    return _mix(_mix(_mix(level_seed + _GOLDEN) ^ (n * _C2)) + salt * _GOLDEN)


# ---------------------------------------------------------------------------------------------
# Argument parsing with one-line errors that name the bad value and the valid ones.


def _check_size(n: Any, what: str = "size") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not (MIN_SIZE <= n <= MAX_SIZE) or n % 2 == 0:
        raise InnerCriticError(f"{what}={n!r} is invalid: valid sizes are odd integers {MIN_SIZE}..{MAX_SIZE}")
    return int(n)


def _parse_sizes(size: Any) -> tuple[int, ...]:
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise InnerCriticError(f"size={size!r} is invalid: give one odd size or an inclusive (min, max) pair")
        lo, hi = _check_size(size[0], "size[0]"), _check_size(size[1], "size[1]")
        if lo > hi:
            raise InnerCriticError(f"size={tuple(size)!r} is invalid: min {lo} is larger than max {hi}")
        return tuple(range(lo, hi + 1, 2))
    return (_check_size(size),)


def _parse_cheese(mode: Any, sizes: Sequence[int]) -> tuple:
    """'top_right:K' -> ('top_right', K); 'anywhere' -> ('anywhere',); 'fixed' -> ('fixed', None);
    'fixed:R,C' -> ('fixed', (R, C)). Checked against every maze size in ``sizes``."""
    if not isinstance(mode, str):
        raise InnerCriticError(f"cheese={mode!r} is invalid: valid forms are {_CHEESE_FORMS}")
    smallest = min(sizes)
    m = re.fullmatch(r"\s*top_right\s*:\s*(-?\d+)\s*", mode)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise InnerCriticError(f"cheese={mode!r} is invalid: K={k}; valid K is 1..{smallest}")
        if k > smallest:
            raise InnerCriticError(f"cheese={mode!r} is invalid: K={k} is larger than the maze (size {smallest}); valid K is 1..{smallest}")
        return ("top_right", k)
    if mode.strip() == "anywhere":
        return ("anywhere",)
    if mode.strip() == "fixed":
        return ("fixed", None)
    m = re.fullmatch(r"\s*fixed\s*:\s*(-?\d+)\s*,\s*(-?\d+)\s*", mode)
    if m:
        r, c = int(m.group(1)), int(m.group(2))
        if not (0 <= r < smallest and 0 <= c < smallest):
            raise InnerCriticError(f"cheese={mode!r} is invalid: ({r}, {c}) is outside the {smallest}x{smallest} maze; valid is 0..{smallest - 1}")
        if r % 2 or c % 2:
            raise InnerCriticError(
                f"cheese={mode!r} is invalid: ({r}, {c}) can be a wall; only squares with both coordinates even are free in every maze"
            )
        for n in sizes:
            if (r, c) == (n - 1, 0):
                raise InnerCriticError(f"cheese={mode!r} is invalid: ({r}, {c}) is the mouse start of the {n}x{n} maze")
        return ("fixed", (r, c))
    raise InnerCriticError(f"cheese={mode!r} is invalid: valid forms are {_CHEESE_FORMS}")


def _mode_string(mode: tuple) -> str:
    if mode[0] == "top_right":
        return f"top_right:{mode[1]}"
    if mode[0] == "fixed" and mode[1] is not None:
        return f"fixed:{mode[1][0]},{mode[1][1]}"
    return mode[0]


def _check_level_seed(seed: Any, what: str = "level_seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (0 <= seed < 2**63):
        raise InnerCriticError(f"{what}={seed!r} is invalid: level seeds are integers in [0, 2**63)")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Level generation: a pure function of (level seed, size, cheese mode), memoised.


@functools.lru_cache(maxsize=None)
def _geometry(n: int) -> tuple[list[int], list[int], list[int], np.ndarray, np.ndarray]:
    """Kruskal's edge list for an n x n maze: node ids u, v, the flat square between them; the
    flat maze with only the node squares open; the per-edge hash increments."""
    m = (n + 1) // 2
    u, v, mid = [], [], []
    for r in range(m):
        for c in range(m):
            if c + 1 < m:  # the node to the right, through the square between
                u.append(r * m + c)
                v.append(r * m + c + 1)
                mid.append(2 * r * n + 2 * c + 1)
            if r + 1 < m:  # the node below
                u.append(r * m + c)
                v.append((r + 1) * m + c)
                mid.append((2 * r + 1) * n + 2 * c)
    closed = np.ones(n * n, dtype=bool)
    closed[[2 * r * n + 2 * c for r in range(m) for c in range(m)]] = False
    ramp = np.arange(len(u), dtype=np.uint64) * np.uint64(_GOLDEN)
    return u, v, mid, closed, ramp


def _make_walls(level_seed: int, n: int) -> np.ndarray:
    u, v, mid, closed, ramp = _geometry(n)
    num_nodes = ((n + 1) // 2) ** 2
    # splitmix64 is a bijection, so the keys are distinct and the order is fully determined.
    order = _mix_np(ramp + np.uint64(_level_hash(level_seed, n, 0))).argsort().tolist()
    parent = list(range(num_nodes))
    flat = closed.copy()
    opened = []
    for e in order:
        a, b = u[e], v[e]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a != b:
            parent[a] = b
            opened.append(mid[e])
            if len(opened) == num_nodes - 1:
                break
    flat[opened] = False
    return flat.reshape(n, n)


@functools.lru_cache(maxsize=None)
def _cheese_region(n: int, mode: tuple) -> np.ndarray:
    """Flat indices (row-major) of the squares the cheese may take, walls not yet excluded."""
    allowed = np.ones((n, n), dtype=bool)
    if mode[0] == "top_right":
        k = mode[1]
        allowed[:] = False
        allowed[:k, n - k :] = True
    allowed[n - 1, 0] = False  # never on the mouse start: the episode could not begin
    return np.flatnonzero(allowed)


@functools.lru_cache(maxsize=_LEVEL_CACHE_SIZE)
def _level_cached(level_seed: int, n: int, mode: tuple) -> tuple[np.ndarray, tuple[int, int]]:
    walls = _make_walls(level_seed, n)
    walls.setflags(write=False)  # shared by every env that plays this level
    if mode[0] == "fixed":
        return walls, ((0, n - 1) if mode[1] is None else mode[1])
    region = _cheese_region(n, mode)
    candidates = region[~walls.reshape(-1)[region]]
    pick = int(candidates[_level_hash(level_seed, n, _SALT_CHEESE) % len(candidates)])
    return walls, (pick // n, pick % n)


@functools.lru_cache(maxsize=None)
def _move_basis(S: int) -> tuple[np.ndarray, np.ndarray]:
    """(4 * pixel) broadcast over the 4 actions, and 4 * the pixel offset of each action."""
    dtype = np.int16 if 4 * S * S < 2**15 else np.int32
    stay = (np.arange(S * S, dtype=dtype) * 4).reshape(S, S, 1)
    step = np.array([4 * (dr * S + dc) for dr, dc in ACTION_DELTAS.tolist()], dtype=dtype)
    return stay, step


def _prepare_level(level_seed: int, n: int, mode: tuple, S: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """A level laid out in an S x S frame, ready to copy into an env: the wall channel (uint8 (S, S)),
    the move table (int (S*S*4,), 4 * the pixel each action leads to from each pixel), and the
    pixels of the start, the cheese and the top-right corner."""
    walls, (cr, cc) = _level_cached(level_seed, n, mode)
    o = (S - n) // 2
    free = np.zeros((S + 2, S + 2), dtype=bool)  # a closed border: moves off the frame are blocked
    free[o + 1 : o + 1 + n, o + 1 : o + 1 + n] = ~walls
    frame = np.logical_not(free[1:-1, 1:-1]).view(np.uint8)
    # can_move[r, c, a]: the square that action a leads to is free (ACTION_DELTAS order).
    can_move = np.stack([free[:-2, 1:-1], free[2:, 1:-1], free[1:-1, :-2], free[1:-1, 2:]], axis=-1)
    stay, step = _move_basis(S)
    moves = (stay + step * can_move).reshape(-1)
    frame.setflags(write=False)
    moves.setflags(write=False)
    return frame, moves, (o + n - 1) * S + o, (o + cr) * S + o + cc, o * S + o + n - 1


@functools.lru_cache(maxsize=None)
def _level_preparer(S: int):
    """The memoised :func:`_prepare_level` for frame size S, its LRU sized to the byte budget."""
    per_level = S * S * (1 + 4 * _move_basis(S)[1].itemsize) + 512

    @functools.lru_cache(maxsize=max(256, _PREPARED_CACHE_BYTES // per_level))
    def prepared(level_seed: int, n: int, mode: tuple) -> tuple[np.ndarray, np.ndarray, int, int, int]:
        return _prepare_level(level_seed, n, mode, S)

    return prepared


def generate_level(level_seed: int, size: int, cheese_mode: str = "top_right:5") -> tuple[np.ndarray, tuple[int, int]]:
    """The maze and cheese of a level: a pure, deterministic function of its arguments.

    The walls depend on (level_seed, size) only, so the same seed gives the same maze under every
    cheese mode (useful for contrast pairs); the cheese depends on all three.

    Returns:
        walls: bool (size, size), True = wall (a fresh copy).
        cheese: (row, col) of the cheese.
    """
    seed = _check_level_seed(level_seed)
    n = _check_size(size)
    walls, cheese = _level_cached(seed, n, _parse_cheese(cheese_mode, (n,)))
    return walls.copy(), tuple(cheese)


def level_size(level_seed: int, size: int | tuple[int, int]) -> int:
    """Maze size of a level under ``size`` (one odd size or an inclusive (min, max) range).

    With a range, the size is a pure function of the level seed (uniform over the odd sizes), so a
    level seed names one level and ``num_levels`` levels are a finite set, as in procgen.
    """
    return _size_of(_check_level_seed(level_seed), _parse_sizes(size))


def _size_of(level_seed: int, sizes: tuple[int, ...]) -> int:
    if len(sizes) == 1:
        return sizes[0]
    return sizes[_mix(level_seed ^ (_SALT_SIZE * _GOLDEN)) % len(sizes)]


# ---------------------------------------------------------------------------------------------
# The vectorised environment.


@dataclass
class MazeState:
    """Everything a :class:`CheeseMaze` needs to continue identically (deep copies).

    Positions are indices into the env's internal move table / observation buffer; read them
    through the env (``mouse_pos``, ``cheese_pos``) after ``restore_state``.
    """

    obs: np.ndarray  #: uint8 (N, 3, S, S), the current observation (walls, mouse, cheese)
    next_index: np.ndarray  #: int64 (N * S * S * 4,), the move table of the current mazes
    mouse: np.ndarray  #: int64 (N,), mouse index into the move table
    cheese: np.ndarray  #: int64 (N,), cheese index into the move table, -1 when removed
    top_right: np.ndarray  #: int64 (N,), index of the top-right corner
    size: np.ndarray  #: int64 (N,), maze size n of each env
    level_seed: np.ndarray  #: int64 (N,), level seed of each env's episode
    episode_step: np.ndarray  #: int64 (N,), steps taken in the current episodes
    max_steps: np.ndarray  #: int64 (N,), step limit of the current episodes
    rng_key: np.ndarray  #: uint64 (N,), per-env random stream key
    rng_counter: np.ndarray  #: uint64 (N,), per-env random stream position

    def copy(self) -> "MazeState":
        return MazeState(**{f.name: getattr(self, f.name).copy() for f in fields(self)})


class CheeseMaze(gymnasium.vector.VectorEnv):
    """A batch of cheese mazes with same-step autoreset.

    Actions are 0=up, 1=down, 2=left, 3=right; a move into a wall or off the maze leaves the mouse
    in place. Entering the cheese gives reward 1 and terminates; otherwise the reward is 0. An
    episode truncates after ``max_steps`` steps. Observations are uint8 (N, 3, S, S), channels
    (walls, mouse, cheese) with values 0/1, the maze centred in the frame and the padding drawn as
    wall. When an episode ends, the returned observation is already the first of the next episode
    and ``info["final_obs"]`` holds the last one (rows where ``info["_final_obs"]``).

    Every episode draws a level seed from its env's own random stream (from ``range(num_levels)``
    when ``num_levels > 0``); the maze and cheese are ``generate_level(level_seed, n, cheese)``.

    Args:
        num_envs: number of mazes stepped together.
        size: maze size, an odd integer in 5..25, or an inclusive (min, max) range of them (each level's size is then a function of its seed).
        obs_size: side S of the observation frame, odd and >= the largest size (default: the largest size).
        cheese: cheese placement, 'top_right:K' (uniform on the free squares with row < K and col >= n-K), 'anywhere' (any free square but the start), 'fixed' (top-right corner) or 'fixed:R,C'.
        max_steps: step limit of an episode (default 4 * n * n for that episode's size n).
        num_levels: 0 for unlimited levels; L > 0 draws every level seed from range(L) (a finite training set, as in procgen).
        seed: seed of the per-env random streams (env i uses (seed, i)); None for fresh entropy.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        size: int | tuple[int, int] = 9,
        obs_size: int | None = None,
        cheese: str = "top_right:5",
        max_steps: int | None = None,
        num_levels: int = 0,
        seed: int | None = None,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise InnerCriticError(f"num_envs={num_envs!r} is invalid: valid values are integers >= 1")
        self._sizes = _parse_sizes(size)
        largest = max(self._sizes)
        if obs_size is None:
            obs_size = largest
        if isinstance(obs_size, bool) or not isinstance(obs_size, (int, np.integer)) or obs_size < largest or obs_size % 2 == 0:
            raise InnerCriticError(f"obs_size={obs_size!r} is invalid: valid values are odd integers >= the largest maze size ({largest})")
        self._mode = _parse_cheese(cheese, self._sizes)
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1):
            raise InnerCriticError(f"max_steps={max_steps!r} is invalid: valid values are None (4 * n * n) or integers >= 1")
        if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) or not (0 <= num_levels < 2**63):
            raise InnerCriticError(f"num_levels={num_levels!r} is invalid: valid values are 0 (unlimited) or integers >= 1")

        self.num_envs = N = int(num_envs)
        self.size = size
        self.obs_size = S = int(obs_size)
        self.cheese = _mode_string(self._mode)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.num_levels = int(num_levels)
        self.single_observation_space = spaces.Box(0, 1, (3, S, S), np.uint8)
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, N)
        self.action_space = batch_space(self.single_action_space, N)

        SS = S * S
        self._SS = SS
        self._prepared = _level_preparer(S)
        self._obs = np.zeros((N, 3, S, S), dtype=np.uint8)
        self._obs_flat = self._obs.reshape(-1)  # a view: pixel writes land in _obs
        # _next[g + a] is where the mouse at table index g goes under action a; g = 4 * (i*S*S + pixel).
        self._next = np.zeros(N * SS * 4, dtype=np.int64)
        self._table = self._next.reshape(N, SS * 4)  # a view, one row per env
        self._mouse = np.zeros(N, dtype=np.int64)
        self._mouse_px = np.zeros(N, dtype=np.int64)  # flat index of the mouse pixel in _obs
        self._cheese = np.full(N, -1, dtype=np.int64)
        self._top_right = np.zeros(N, dtype=np.int64)
        self._size = np.zeros(N, dtype=np.int64)
        self._level_seed = np.zeros(N, dtype=np.int64)
        self._episode_step = np.zeros(N, dtype=np.int64)
        self._max_steps = np.zeros(N, dtype=np.int64)
        self._rng_key = np.zeros(N, dtype=np.uint64)
        self._rng_counter = np.zeros(N, dtype=np.uint64)
        # Mouse pixel (flat obs index) = (g >> 2) + _pixel_offset, precomputed per env.
        self._env = np.arange(N, dtype=np.int64)
        self._pixel_offset = self._env * 2 * SS + SS
        self._no_final = np.zeros_like(self._obs)
        self._no_final.setflags(write=False)  # shared between steps where nothing ended
        self._ready = False
        self._seed_streams(seed)

    # -- seeding and random streams ----------------------------------------------------------

    def _seed_streams(self, seed: int | Sequence[int] | None) -> None:
        N = self.num_envs
        if seed is None:
            keys = np.random.SeedSequence().generate_state(N, np.uint64)
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            if seed < 0:
                raise InnerCriticError(f"seed={seed!r} is invalid: valid seeds are non-negative integers, a list of {N} of them, or None")
            keys = np.array([np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint64)[0] for i in range(N)], dtype=np.uint64)
        else:
            try:
                seeds = list(seed)
            except TypeError:
                seeds = []
            if len(seeds) != N or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
                raise InnerCriticError(f"seed={seed!r} is invalid: valid seeds are non-negative integers, a list of {N} of them, or None")
            # A per-env seed s makes env i behave like env 0 of an env seeded with the int s.
            keys = np.array([np.random.SeedSequence([int(s), 0]).generate_state(1, np.uint64)[0] for s in seeds], dtype=np.uint64)
        self._rng_key[:] = keys
        self._rng_counter[:] = 0

    def _draw_level_seed(self, i: int) -> int:
        # Per-env splitmix64 stream: output k is mix(key + k * golden); a Python-int scalar path is
        # cheaper than array ops for the few envs that end on a given step.
        counter = int(self._rng_counter[i]) + 1
        self._rng_counter[i] = counter
        z = _mix(int(self._rng_key[i]) + counter * _GOLDEN)
        return z % self.num_levels if self.num_levels else z >> 33  # 31-bit seeds, as procgen's

    # -- loading levels ----------------------------------------------------------------------

    def _load_level(self, i: int, level_seed: int) -> None:
        """Start a fresh episode in env i on level ``level_seed``."""
        SS = self._SS
        n = _size_of(level_seed, self._sizes)
        frame, moves, start, cheese, top_right = self._prepared(level_seed, n, self._mode)
        base = i * SS
        obs = self._obs[i]
        obs[0] = frame
        obs[1:] = 0
        np.add(moves, np.int64(4 * base), out=self._table[i])
        self._mouse[i] = 4 * (base + start)
        self._mouse_px[i] = px = 3 * base + SS + start
        self._cheese[i] = 4 * (base + cheese)
        pixels = self._obs_flat
        pixels[px] = 1
        pixels[3 * base + 2 * SS + cheese] = 1
        self._top_right[i] = 4 * (base + top_right)
        self._size[i] = n
        self._level_seed[i] = level_seed
        self._episode_step[i] = 0
        self._max_steps[i] = 4 * n * n if self.max_steps is None else self.max_steps

    # -- gymnasium API -----------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None):
        """Start new episodes in every env.

        Args:
            seed: int s seeds env i from (s, i); a list seeds each env on its own; None keeps the streams going.
            options: {"level_seeds": [N ints]} puts env i on exactly that level (no random draw).
        """
        if seed is not None:
            self._seed_streams(seed)
        level_seeds = None
        if options:
            unknown = set(options) - {"level_seeds"}
            if unknown:
                raise InnerCriticError(f"reset options {sorted(unknown)} are unknown: valid options are ['level_seeds']")
            level_seeds = options.get("level_seeds")
        if level_seeds is None:
            seeds = [self._draw_level_seed(i) for i in range(self.num_envs)]
        else:
            seeds = list(np.asarray(level_seeds).reshape(-1).tolist()) if not isinstance(level_seeds, (list, tuple)) else list(level_seeds)
            if len(seeds) != self.num_envs:
                raise InnerCriticError(f"level_seeds has {len(seeds)} entries: give exactly num_envs={self.num_envs}")
            seeds = [_check_level_seed(s, f"level_seeds[{j}]") for j, s in enumerate(seeds)]
        for i, s in enumerate(seeds):
            self._load_level(i, s)
        self._ready = True
        info = {"level_seed": self._level_seed.copy(), "episode_step": self._episode_step.copy()}
        return self._obs.copy(), info

    def step(self, actions):
        """Move every mouse; same-step autoreset of the envs whose episode ended.

        Returns ``(obs, reward float32 (N,), terminated, truncated, info)``; ``info`` holds
        ``at_top_right`` (mouse on the top-right corner after the move), ``level_seed`` and
        ``episode_step`` (of the episode each transition belongs to, before any reset),
        ``final_obs`` (uint8 (N, 3, S, S), the last observation of each episode that ended, zeros
        elsewhere; a shared read-only array of zeros on steps where nothing ended) and
        ``_final_obs`` (bool (N,), which rows of ``final_obs`` are filled).
        """
        if not self._ready:
            raise RuntimeError("CheeseMaze.step() called before reset()")
        a = np.asarray(actions)
        N = self.num_envs
        if a.shape != (N,):
            if a.size == N:
                a = a.reshape(N)
            else:
                raise InnerCriticError(f"actions has shape {a.shape}: valid is ({N},) with values in 0..3")
        if a.dtype.kind not in "iu":
            raise InnerCriticError(f"actions have dtype {a.dtype}: valid actions are integers 0..3")
        if a.dtype != np.int64:
            a = a.astype(np.int64)  # int64 + uint64 would promote to float
        if (a >> 2).any():  # catches negatives too
            raise InnerCriticError(f"actions {a[(a < 0) | (a > 3)][:5].tolist()} are invalid: valid actions are 0..3 {ACTIONS}")

        mouse = self._next[self._mouse + a]
        px = (mouse >> 2) + self._pixel_offset
        pixels = self._obs_flat
        pixels[self._mouse_px] = 0
        pixels[px] = 1
        self._mouse = mouse
        self._mouse_px = px
        terminated = mouse == self._cheese
        at_top_right = mouse == self._top_right
        self._episode_step += 1
        truncated = self._episode_step >= self._max_steps
        truncated &= ~terminated
        reward = terminated.astype(np.float32)
        done = terminated | truncated
        info = {
            "at_top_right": at_top_right,
            "level_seed": self._level_seed.copy(),
            "episode_step": self._episode_step.copy(),
            "_final_obs": done,
        }
        if done.any():
            ended = np.flatnonzero(done)
            final = np.zeros_like(self._obs)
            final[ended] = self._obs[ended]
            for i in ended.tolist():
                self._load_level(i, self._draw_level_seed(i))
            info["final_obs"] = final
        else:
            info["final_obs"] = self._no_final
        return self._obs.copy(), reward, terminated, truncated, info

    # -- state -------------------------------------------------------------------------------

    def clone_state(self) -> MazeState:
        """A deep copy of the whole batch's state, random streams included."""
        self._require_reset("clone_state")
        return MazeState(
            obs=self._obs.copy(),
            next_index=self._next.copy(),
            mouse=self._mouse.copy(),
            cheese=self._cheese.copy(),
            top_right=self._top_right.copy(),
            size=self._size.copy(),
            level_seed=self._level_seed.copy(),
            episode_step=self._episode_step.copy(),
            max_steps=self._max_steps.copy(),
            rng_key=self._rng_key.copy(),
            rng_counter=self._rng_counter.copy(),
        )

    def restore_state(self, state: MazeState) -> None:
        """Continue from ``state`` (which stays untouched and can be restored again)."""
        if not isinstance(state, MazeState):
            raise InnerCriticError(f"state is a {type(state).__name__}: valid is a MazeState from clone_state()")
        if state.obs.shape != self._obs.shape or state.next_index.shape != self._next.shape:
            raise InnerCriticError(
                f"state holds observations {state.obs.shape}; this env needs {self._obs.shape} (same num_envs and obs_size)"
            )
        self._obs[...] = state.obs
        self._next[...] = state.next_index
        self._mouse = state.mouse.copy()
        self._mouse_px = (self._mouse >> 2) + self._pixel_offset
        self._cheese[...] = state.cheese
        self._top_right[...] = state.top_right
        self._size[...] = state.size
        self._level_seed[...] = state.level_seed
        self._episode_step[...] = state.episode_step
        self._max_steps[...] = state.max_steps
        self._rng_key[...] = state.rng_key
        self._rng_counter[...] = state.rng_counter
        self._ready = True

    # -- reading and editing -----------------------------------------------------------------

    def _require_reset(self, what: str) -> None:
        if not self._ready:
            raise RuntimeError(f"CheeseMaze.{what} needs reset() first")

    def _check_env(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not (0 <= i < self.num_envs):
            raise InnerCriticError(f"env index {i!r} is invalid: valid indices are 0..{self.num_envs - 1}")
        self._require_reset("editing/reading an env")
        return int(i)

    def _offset(self, i: int) -> int:
        return (self.obs_size - int(self._size[i])) // 2

    def _index_to_rc(self, g: np.ndarray) -> np.ndarray:
        pixel = (g >> 2) - self._env * self._SS
        off = (self.obs_size - self._size) // 2
        return np.stack([pixel // self.obs_size - off, pixel % self.obs_size - off], axis=1)

    def _check_free(self, i: int, pos: Any, what: str) -> tuple[int, int]:
        n = int(self._size[i])
        try:
            r, c = (int(v) for v in pos)
        except (TypeError, ValueError):
            raise InnerCriticError(f"{what}={pos!r} is not a (row, col) pair") from None
        if not (0 <= r < n and 0 <= c < n):
            raise InnerCriticError(f"{what}={(r, c)} is outside env {i}'s {n}x{n} maze: valid rows and cols are 0..{n - 1}")
        o = self._offset(i)
        if self._obs[i, 0, r + o, c + o]:
            raise InnerCriticError(f"{what}={(r, c)} is a wall in env {i}'s maze: it must be a free square")
        return r, c

    @property
    def mouse_pos(self) -> np.ndarray:
        """(N, 2) int64 (row, col) of each mouse."""
        self._require_reset("mouse_pos")
        return self._index_to_rc(self._mouse)

    @property
    def cheese_pos(self) -> np.ndarray:
        """(N, 2) int64 (row, col) of each cheese; (-1, -1) where the cheese was removed."""
        self._require_reset("cheese_pos")
        rc = self._index_to_rc(np.maximum(self._cheese, 0))
        rc[self._cheese < 0] = -1
        return rc

    @property
    def level_seeds(self) -> np.ndarray:
        """(N,) int64 level seed of each env's current episode."""
        return self._level_seed.copy()

    def maze_size(self, i: int) -> int:
        """Side n of env i's maze."""
        return int(self._size[self._check_env(i)])

    def walls(self, i: int) -> np.ndarray:
        """bool (n, n) copy of env i's maze, True = wall."""
        i = self._check_env(i)
        n, o = int(self._size[i]), self._offset(i)
        return self._obs[i, 0, o : o + n, o : o + n].astype(bool)

    def set_cheese(self, i: int, pos: tuple[int, int] | None) -> None:
        """Move env i's cheese to free square ``pos``, or remove it (None: the episode can then only truncate)."""
        i = self._check_env(i)
        SS, S = self._SS, self.obs_size
        g = -1
        if pos is not None:
            r, c = self._check_free(i, pos, "cheese")
            o = self._offset(i)
            g = (i * SS + (r + o) * S + c + o) * 4
            if g == self._mouse[i]:
                raise InnerCriticError(f"cheese={(r, c)} is where env {i}'s mouse is: the cheese must go on another free square")
        if self._cheese[i] >= 0:
            self._obs_flat[(self._cheese[i] >> 2) + self._pixel_offset[i] + SS] = 0
        self._cheese[i] = g
        if g < 0:
            return
        self._obs_flat[(g >> 2) + self._pixel_offset[i] + SS] = 1

    def set_mouse(self, i: int, pos: tuple[int, int]) -> None:
        """Put env i's mouse on free square ``pos`` (not the cheese); the episode's step count is kept."""
        i = self._check_env(i)
        SS, S = self._SS, self.obs_size
        r, c = self._check_free(i, pos, "mouse")
        o = self._offset(i)
        g = (i * SS + (r + o) * S + c + o) * 4
        if g == self._cheese[i]:
            raise InnerCriticError(f"mouse={(r, c)} is env {i}'s cheese square: the episode would already be over; pick another square")
        self._obs_flat[self._mouse_px[i]] = 0
        self._mouse[i] = g
        self._mouse_px[i] = (g >> 2) + self._pixel_offset[i]
        self._obs_flat[self._mouse_px[i]] = 1

    def observe(self, i: int, positions: Any = None) -> np.ndarray:
        """uint8 (P, 3, S, S): env i's current observation with the mouse moved to each position.

        ``positions`` is (P, 2) of free squares (row, col); default every free square, in
        ``free_squares(self.walls(i))`` order. The env's state is not changed.
        """
        i = self._check_env(i)
        o = self._offset(i)
        if positions is None:
            pos = free_squares(self.walls(i))
        else:
            pos = np.asarray(positions)
            if pos.size == 0:
                pos = pos.reshape(0, 2).astype(np.int64)
            if pos.ndim == 1 and pos.shape == (2,):
                pos = pos[None]
            if pos.ndim != 2 or pos.shape[1] != 2 or pos.dtype.kind not in "iu":
                raise InnerCriticError(f"positions has shape {pos.shape} and dtype {pos.dtype}: valid is an integer array (P, 2) of (row, col)")
            for p in pos:
                self._check_free(i, p, "position")
        out = np.repeat(self._obs[i][None], len(pos), axis=0)
        out[:, 1] = 0
        out[np.arange(len(pos)), 1, pos[:, 0] + o, pos[:, 1] + o] = 1
        return out
