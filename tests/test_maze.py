"""The vectorised cheese maze: determinism, maze structure, cheese placement, dynamics, autoreset,
state cloning, editing, and the errors bad inputs raise."""

from __future__ import annotations

import numpy as np
import pytest

from innercritic.envs.maze import ACTION_DELTAS, ACTIONS, CheeseMaze, MazeState, generate_level, level_size
from innercritic.envs.maze_values import first_move_toward, free_squares, is_perfect, transition_table


def _rollout(env: CheeseMaze, actions: np.ndarray) -> list:
    out = []
    for a in actions:
        obs, rew, term, trunc, info = env.step(a)
        out.append((obs, rew, term, trunc, {k: np.array(v) for k, v in info.items()}))
    return out


def _assert_same(run_a: list, run_b: list) -> None:
    assert len(run_a) == len(run_b)
    for (oa, ra, ta, ua, ia), (ob, rb, tb, ub, ib) in zip(run_a, run_b):
        np.testing.assert_array_equal(oa, ob)
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ua, ub)
        assert ia.keys() == ib.keys()
        for k in ia:
            np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)


def _mouse_rc(obs: np.ndarray) -> np.ndarray:
    """(N, 2) position of the single mouse pixel of each observation, in frame coordinates."""
    flat = obs[:, 1].reshape(len(obs), -1)
    assert (flat.sum(axis=1) == 1).all(), "every observation has exactly one mouse pixel"
    idx = flat.argmax(axis=1)
    return np.stack(np.divmod(idx, obs.shape[-1]), axis=1)


# --------------------------------------------------------------------------------------------
# Determinism and seeding


def test_same_seed_same_mazes_and_trajectories_and_different_seeds_differ():
    actions = np.random.default_rng(0).integers(0, 4, size=(400, 8))
    runs = []
    for seed in (123, 123, 124):
        env = CheeseMaze(8, size=(5, 11), obs_size=13, cheese="top_right:3", max_steps=40, seed=None)
        obs, info = env.reset(seed=seed)
        runs.append((obs, info["level_seed"], _rollout(env, actions)))
    (o1, l1, r1), (o2, l2, r2), (o3, l3, r3) = runs
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(l1, l2)
    _assert_same(r1, r2)
    # Short episodes: many autoresets happened, so the later levels came from the env streams too.
    assert sum(int((step[2] | step[3]).sum()) for step in r1) > 50
    assert not np.array_equal(l1, l3)
    assert not np.array_equal(o1, o3)


def test_init_seed_equals_reset_seed_and_unseeded_envs_differ():
    a = CheeseMaze(16, size=9, seed=7)
    b = CheeseMaze(16, size=9)
    np.testing.assert_array_equal(a.reset()[0], b.reset(seed=7)[0])
    c, d = CheeseMaze(16, size=9), CheeseMaze(16, size=9)
    assert not np.array_equal(c.reset()[1]["level_seed"], d.reset()[1]["level_seed"])


def test_per_env_seed_list():
    single = CheeseMaze(1, size=9)
    batch = CheeseMaze(3, size=9)
    acts = np.random.default_rng(1).integers(0, 4, size=(300, 3))
    acts[:, 2] = acts[:, 0]
    obs_b, _ = batch.reset(seed=[5, 6, 5])
    run_b = _rollout(batch, acts)
    # Envs 0 and 2 got the same seed: they play the same levels the same way.
    np.testing.assert_array_equal(obs_b[0], obs_b[2])
    for step in run_b:
        np.testing.assert_array_equal(step[0][0], step[0][2])
    # A listed seed s makes env i behave like a one-env batch seeded with s.
    obs_s, _ = single.reset(seed=6)
    np.testing.assert_array_equal(obs_s[0], obs_b[1])
    run_s = _rollout(single, acts[:, 1:2])
    for sb, ss in zip(run_b, run_s):
        np.testing.assert_array_equal(sb[0][1], ss[0][0])
        assert sb[1][1] == ss[1][0]


def test_generate_level_is_pure_and_walls_do_not_depend_on_cheese_mode():
    w1, c1 = generate_level(42, 13, "top_right:5")
    w2, c2 = generate_level(42, 13, "top_right:5")
    np.testing.assert_array_equal(w1, w2)
    assert c1 == c2
    w1[0, 0] = True  # the returned array is a copy: the cache is untouched
    assert not generate_level(42, 13, "top_right:5")[0][0, 0]
    for mode in ("anywhere", "fixed", "fixed:2,4", "top_right:1"):
        np.testing.assert_array_equal(generate_level(42, 13, mode)[0], w2)
    assert not np.array_equal(generate_level(43, 13)[0], w2)


def test_reset_level_seeds_option_reproduces_generate_level():
    env = CheeseMaze(4, size=(5, 25), obs_size=25, cheese="anywhere", seed=0)
    seeds = [3, 1000, 77, 3]
    obs, info = env.reset(options={"level_seeds": seeds})
    np.testing.assert_array_equal(info["level_seed"], seeds)
    for i, s in enumerate(seeds):
        n = level_size(s, (5, 25))
        walls, cheese = generate_level(s, n, "anywhere")
        assert env.maze_size(i) == n
        np.testing.assert_array_equal(env.walls(i), walls)
        assert tuple(env.cheese_pos[i]) == cheese
        assert tuple(env.mouse_pos[i]) == (n - 1, 0)
        o = (25 - n) // 2
        np.testing.assert_array_equal(obs[i, 0, o : o + n, o : o + n], walls)
        assert obs[i, 0].sum() == walls.sum() + 25 * 25 - n * n  # the padding is wall
        assert obs[i, 1, o + n - 1, o] == 1 and obs[i, 1].sum() == 1
        assert obs[i, 2, o + cheese[0], o + cheese[1]] == 1 and obs[i, 2].sum() == 1
    np.testing.assert_array_equal(obs[0], obs[3])


def test_size_range_samples_every_size_and_num_levels_bounds_the_seeds():
    env = CheeseMaze(64, size=(5, 25), num_levels=10, max_steps=1, seed=3)
    env.reset()
    seen_seeds, seen_sizes = set(), set()
    for _ in range(20):
        seen_seeds.update(env.level_seeds.tolist())
        seen_sizes.update(env.maze_size(i) for i in range(env.num_envs))
        env.step(np.zeros(64, dtype=np.int64))
    assert seen_seeds == set(range(10))
    # A level's size is a function of its seed, so L levels are a finite set of mazes.
    assert seen_sizes == {level_size(s, (5, 25)) for s in range(10)}
    assert {level_size(s, (5, 25)) for s in range(2000)} == set(range(5, 26, 2))


# --------------------------------------------------------------------------------------------
# Maze structure and cheese placement


@pytest.mark.parametrize("n", list(range(5, 26, 2)))
def test_generated_mazes_are_perfect(n):
    for seed in range(60 if n <= 13 else 20):
        walls, _ = generate_level(seed * 7919 + n, n, "anywhere")
        assert walls.shape == (n, n) and walls.dtype == bool
        assert is_perfect(walls), (n, seed)
        assert not walls[::2, ::2].any(), "every node square is free"
        assert walls[1::2, 1::2].all(), "squares between four nodes are walls"


@pytest.mark.parametrize("n,k", [(5, 1), (5, 5), (9, 2), (9, 5), (13, 4), (25, 5), (25, 25)])
def test_top_right_cheese_lies_in_region_and_covers_it(n, k):
    hits = set()
    for seed in range(400):
        walls, (r, c) = generate_level(seed, n, f"top_right:{k}")
        assert r < k and c >= n - k, (seed, r, c)
        assert not walls[r, c]
        assert (r, c) != (n - 1, 0)
        hits.add((r, c))
    # Uniform over the region's free squares: across many mazes every square of it gets used.
    region_size = sum(1 for r in range(k) for c in range(n - k, n) if not (r % 2 and c % 2) and (r, c) != (n - 1, 0))
    if region_size <= 30:
        assert len(hits) == region_size


def test_anywhere_and_fixed_cheese():
    spots = set()
    for seed in range(300):
        walls, cheese = generate_level(seed, 9, "anywhere")
        assert not walls[cheese] and cheese != (8, 0)
        spots.add(cheese)
    assert len(spots) > 30 and any(r >= 5 for r, _ in spots)
    assert generate_level(5, 9, "fixed")[1] == (0, 8)
    assert generate_level(5, 13, "fixed:4,2")[1] == (4, 2)
    env = CheeseMaze(6, size=(5, 9), cheese="fixed", seed=0)
    env.reset()
    for i in range(6):
        assert tuple(env.cheese_pos[i]) == (0, env.maze_size(i) - 1)


# --------------------------------------------------------------------------------------------
# Dynamics


def test_moves_follow_the_maze_and_obs_track_the_mouse():
    env = CheeseMaze(32, size=(5, 13), obs_size=15, max_steps=10_000, seed=11)
    env.reset()
    for i in range(env.num_envs):
        env.set_cheese(i, None)
    tables = [transition_table(env.walls(i)) for i in range(env.num_envs)]
    index = [{tuple(p): j for j, p in enumerate(free_squares(env.walls(i)))} for i in range(env.num_envs)]
    frees = [free_squares(env.walls(i)) for i in range(env.num_envs)]
    offsets = np.array([(15 - env.maze_size(i)) // 2 for i in range(env.num_envs)])
    rng = np.random.default_rng(0)
    pos = env.mouse_pos
    for _ in range(200):
        a = rng.integers(0, 4, size=env.num_envs)
        obs, rew, term, trunc, info = env.step(a)
        assert not term.any() and not trunc.any() and not rew.any()
        expected = np.array([frees[i][tables[i][index[i][tuple(pos[i])], a[i]]] for i in range(env.num_envs)])
        np.testing.assert_array_equal(env.mouse_pos, expected)
        np.testing.assert_array_equal(_mouse_rc(obs), expected + offsets[:, None])
        corner = np.array([[0, env.maze_size(i) - 1] for i in range(env.num_envs)])
        np.testing.assert_array_equal(info["at_top_right"], (expected == corner).all(axis=1))
        assert not obs[:, 2].any()
        pos = expected


def test_spaces_dtypes_and_info_fields():
    env = CheeseMaze(5, size=(5, 9), obs_size=11, seed=0)
    assert env.metadata["autoreset_mode"].name == "SAME_STEP"
    assert env.single_observation_space.shape == (3, 11, 11) and env.single_observation_space.dtype == np.uint8
    assert env.single_action_space.n == 4
    assert env.observation_space.shape == (5, 3, 11, 11)
    assert env.action_space.shape == (5,)
    assert ACTIONS == ("up", "down", "left", "right")
    np.testing.assert_array_equal(ACTION_DELTAS, [[-1, 0], [1, 0], [0, -1], [0, 1]])
    obs, _ = env.reset()
    assert env.observation_space.contains(obs)
    obs, rew, term, trunc, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    assert rew.dtype == np.float32 and rew.shape == (5,)
    assert term.dtype == bool and trunc.dtype == bool
    assert info["final_obs"].shape == obs.shape and info["final_obs"].dtype == np.uint8
    assert info["_final_obs"].dtype == bool and info["at_top_right"].dtype == bool
    assert info["level_seed"].dtype == np.int64
    np.testing.assert_array_equal(info["episode_step"], 1)
    # The returned observation is a copy: stepping again does not rewrite it.
    before = obs.copy()
    env.step(np.full(5, 3))
    np.testing.assert_array_equal(obs, before)


def test_default_max_steps_is_four_n_squared():
    env = CheeseMaze(2, size=5, seed=0)
    env.reset()
    for i in range(2):
        env.set_cheese(i, None)
    for t in range(1, 4 * 5 * 5 + 1):
        _, _, term, trunc, info = env.step(np.zeros(2, dtype=np.int64))
        np.testing.assert_array_equal(info["episode_step"], t)
        assert trunc.all() == (t == 100)
    assert not term.any()


def test_autoreset_same_step_on_reaching_the_cheese():
    env = CheeseMaze(3, size=9, cheese="anywhere", num_levels=0, seed=4)
    env.reset()
    i = 1
    walls, cheese = env.walls(i), tuple(env.cheese_pos[i])
    # Put the mouse next to the cheese and step onto it.
    neighbour = next(
        (cheese[0] + dr, cheese[1] + dc)
        for dr, dc in ACTION_DELTAS.tolist()
        if 0 <= cheese[0] + dr < 9 and 0 <= cheese[1] + dc < 9 and not walls[cheese[0] + dr, cheese[1] + dc]
    )
    env.set_mouse(i, neighbour)
    old_seed, old_obs = env.level_seeds[i], None
    actions = np.array([0, first_move_toward(walls, neighbour, cheese), 0])
    # The observation just before the final move, with the mouse moved onto the cheese square.
    old_obs = env.observe(i, [cheese])[0]
    obs, rew, term, trunc, info = env.step(actions)
    assert term[i] and not trunc[i] and rew[i] == 1.0
    assert info["_final_obs"][i] and info["level_seed"][i] == old_seed and info["episode_step"][i] == 1
    np.testing.assert_array_equal(info["final_obs"][i], old_obs)
    assert info["final_obs"][i, 1, cheese[0], cheese[1]] == 1  # the mouse is on the cheese in the terminal obs
    # Rows of envs that did not end hold nothing.
    others = [j for j in range(3) if j != i and not (term[j] or trunc[j])]
    assert not info["final_obs"][others].any() and not info["_final_obs"][others].any()
    # The returned obs is the fresh start of the next level.
    new_seed = env.level_seeds[i]
    fresh = CheeseMaze(1, size=9, cheese="anywhere")
    fresh_obs, _ = fresh.reset(options={"level_seeds": [int(new_seed)]})
    np.testing.assert_array_equal(obs[i], fresh_obs[0])
    assert tuple(env.mouse_pos[i]) == (8, 0)
    _, _, _, _, info = env.step(np.zeros(3, dtype=np.int64))
    assert info["episode_step"][i] == 1  # the new episode counts from scratch


def test_autoreset_on_truncation_keeps_the_last_obs():
    env = CheeseMaze(4, size=7, max_steps=3, cheese="fixed", seed=0)
    env.reset()
    for _ in range(2):
        _, _, term, trunc, info = env.step(np.full(4, 1))  # down: stays at the start
        assert not (term | trunc).any() and not info["_final_obs"].any()
        assert not info["final_obs"].any()
    obs, rew, term, trunc, info = env.step(np.full(4, 1))
    assert trunc.all() and not term.any() and not rew.any()
    assert info["_final_obs"].all()
    np.testing.assert_array_equal(info["episode_step"], 3)
    np.testing.assert_array_equal(_mouse_rc(info["final_obs"]), [[6, 0]] * 4)
    assert not np.array_equal(info["final_obs"][:, 0], obs[:, 0])  # new mazes came in
    # Reaching the cheese on the last allowed step is a termination, not a truncation.
    env = CheeseMaze(1, size=7, max_steps=1, cheese="fixed", seed=0)
    env.reset()
    walls = env.walls(0)
    near = (0, 5) if not walls[0, 5] else (1, 6)
    env.set_mouse(0, near)
    _, rew, term, trunc, _ = env.step(np.array([first_move_toward(walls, near, (0, 6))]))
    assert term[0] and not trunc[0] and rew[0] == 1.0


def test_set_cheese_none_prevents_termination():
    env = CheeseMaze(64, size=5, cheese="top_right:5", max_steps=100_000, seed=2)
    env.reset()
    for i in range(64):
        env.set_cheese(i, None)
    np.testing.assert_array_equal(env.cheese_pos, -1)
    rng = np.random.default_rng(0)
    visited = np.zeros((64, 5, 5), dtype=bool)
    for _ in range(3000):
        obs, rew, term, trunc, _ = env.step(rng.integers(0, 4, size=64))
        assert not term.any() and not trunc.any() and not rew.any() and not obs[:, 2].any()
        p = env.mouse_pos
        visited[np.arange(64), p[:, 0], p[:, 1]] = True
    # The random walks covered the whole maze, old cheese squares included.
    assert all(visited[i].sum() == (~env.walls(i)).sum() for i in range(64))
    # Putting a cheese back makes it reachable again.
    walls = env.walls(0)
    target = (0, 4)
    env.set_mouse(0, (0, 3) if not walls[0, 3] else (1, 4))
    env.set_cheese(0, target)
    a = np.zeros(64, dtype=np.int64)
    a[0] = first_move_toward(walls, tuple(env.mouse_pos[0]), target)
    _, rew, term, _, _ = env.step(a)
    assert term[0] and rew[0] == 1.0 and not term[1:].any()


def test_at_top_right_flag():
    env = CheeseMaze(1, size=9, cheese="fixed:0,0", seed=5)
    env.reset()
    walls = env.walls(0)
    near = (0, 7) if not walls[0, 7] else (1, 8)
    env.set_mouse(0, near)
    _, _, term, _, info = env.step(np.array([first_move_toward(walls, near, (0, 8))]))
    assert info["at_top_right"][0] and not term[0]
    _, _, _, _, info = env.step(np.array([1 if near == (1, 8) else 2]))
    assert not info["at_top_right"][0]


# --------------------------------------------------------------------------------------------
# State: clone / restore, editing, observe


def test_clone_restore_round_trips_bit_for_bit():
    env = CheeseMaze(16, size=(5, 9), obs_size=11, cheese="top_right:3", max_steps=25, seed=9)
    env.reset()
    rng = np.random.default_rng(0)
    _rollout(env, rng.integers(0, 4, size=(30, 16)))
    state = env.clone_state()
    assert isinstance(state, MazeState)
    actions = rng.integers(0, 4, size=(200, 16))
    first = _rollout(env, actions)
    assert sum(int((s[2] | s[3]).sum()) for s in first) > 16  # autoresets drew from the streams
    env.restore_state(state)
    second = _rollout(env, actions)
    _assert_same(first, second)
    env.restore_state(state)  # the state is not consumed by a restore
    _assert_same(first, _rollout(env, actions))
    # A clone is a deep copy: editing the env after cloning leaves the clone alone.
    env.restore_state(state)
    snapshot = state.copy()
    env.set_cheese(0, None)
    env.step(actions[0])
    for name in MazeState.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(state, name), getattr(snapshot, name), err_msg=name)
    # Restoring into a fresh env of the same shape continues identically too.
    other = CheeseMaze(16, size=(5, 9), obs_size=11, cheese="top_right:3", max_steps=25)
    other.restore_state(state)
    _assert_same(first, _rollout(other, actions))


def test_set_mouse_and_cheese_edit_the_observation():
    env = CheeseMaze(2, size=7, obs_size=9, cheese="fixed", seed=1)
    env.reset()
    env.set_mouse(1, (0, 0))
    env.set_cheese(1, (6, 6))
    obs = env.step(np.array([1, 2]))[0]  # env 1 bumps into the left edge
    assert tuple(env.mouse_pos[1]) == (0, 0) and tuple(env.cheese_pos[1]) == (6, 6)
    assert obs[1, 1, 1, 1] == 1 and obs[1, 1].sum() == 1
    assert obs[1, 2, 7, 7] == 1 and obs[1, 2].sum() == 1
    assert tuple(env.mouse_pos[0]) == (6, 0)


def test_observe_puts_the_mouse_where_asked():
    env = CheeseMaze(3, size=(5, 9), obs_size=11, seed=8)
    env.reset()
    current = env.step(np.array([3, 0, 3]))[0][2]
    before = env.clone_state()
    i = 2
    n = env.maze_size(i)
    o = (11 - n) // 2
    frames = env.observe(i)
    squares = free_squares(env.walls(i))
    assert frames.shape == (len(squares), 3, 11, 11) and frames.dtype == np.uint8
    np.testing.assert_array_equal(_mouse_rc(frames), squares + o)
    np.testing.assert_array_equal(frames[:, 0], np.broadcast_to(current[0], frames[:, 0].shape))
    np.testing.assert_array_equal(frames[:, 2], np.broadcast_to(current[2], frames[:, 2].shape))
    picked = env.observe(i, [(n - 1, 0), (0, n - 1)])
    np.testing.assert_array_equal(_mouse_rc(picked), [[n - 1 + o, o], [o, n - 1 + o]])
    # Observing changes nothing.
    after = env.clone_state()
    for name in MazeState.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name))


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"size": 8}, "size=8"),
        ({"size": 27}, "size=27"),
        ({"size": 3}, "size=3"),
        ({"size": (9, 7)}, "(9, 7)"),
        ({"size": (5, 10)}, "size[1]=10"),
        ({"size": 9, "obs_size": 7}, "obs_size=7"),
        ({"size": 9, "obs_size": 12}, "obs_size=12"),
        ({"cheese": "corner"}, "cheese='corner'"),
        ({"size": 9, "cheese": "top_right:10"}, "K=10"),
        ({"size": (7, 11), "cheese": "top_right:9"}, "K=9"),
        ({"size": 9, "cheese": "fixed:1,2"}, "fixed:1,2"),
        ({"size": 9, "cheese": "fixed:10,0"}, "fixed:10,0"),
        ({"size": 9, "cheese": "fixed:8,0"}, "mouse start"),
        ({"num_envs": 0}, "num_envs=0"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"num_levels": -1}, "num_levels=-1"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        CheeseMaze(**kwargs)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    assert "valid" in str(err.value) or "larger" in str(err.value)


def test_bad_runtime_inputs_raise_value_error():
    env = CheeseMaze(2, size=9, cheese="fixed", seed=0)
    env.reset()
    walls = env.walls(0)
    wall = tuple(int(x) for x in np.argwhere(walls)[0])
    cases = [
        (lambda: env.step(np.array([0, 4])), "[4]"),
        (lambda: env.step(np.array([-1, 0])), "[-1]"),
        (lambda: env.step(np.array([0, 1, 2])), "(3,)"),
        (lambda: env.step(np.array([0.5, 1.0])), "float64"),
        (lambda: env.set_mouse(0, wall), f"mouse={wall}"),
        (lambda: env.set_mouse(0, (9, 0)), "mouse=(9, 0)"),
        (lambda: env.set_mouse(0, (0, 8)), "cheese square"),
        (lambda: env.set_cheese(0, wall), f"cheese={wall}"),
        (lambda: env.set_cheese(0, (8, 0)), "mouse is"),
        (lambda: env.set_cheese(2, None), "env index 2"),
        (lambda: env.observe(0, [wall]), f"position={wall}"),
        (lambda: env.reset(options={"level_seeds": [1]}), "1 entries"),
        (lambda: env.reset(options={"level_seeds": [1, -3]}), "level_seeds[1]=-3"),
        (lambda: env.reset(options={"levels": [1, 2]}), "'levels'"),
        (lambda: env.reset(seed=[1, 2, 3]), "seed=[1, 2, 3]"),
        (lambda: env.reset(seed=-5), "seed=-5"),
        (lambda: generate_level(1, 10), "size=10"),
        (lambda: generate_level(-1, 9), "level_seed=-1"),
        (lambda: generate_level(1, 9, "top_right:0"), "K=0"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert fragment in str(err.value), (fragment, str(err.value))
        assert "\n" not in str(err.value)
    # Failed edits left the state alone.
    assert tuple(env.mouse_pos[0]) == (8, 0) and tuple(env.cheese_pos[0]) == (0, 8)


def test_step_before_reset_is_an_error():
    with pytest.raises(RuntimeError, match="reset"):
        CheeseMaze(1).step(np.array([0]))
