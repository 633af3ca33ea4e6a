"""One-step lookahead planning: known answers on the maze, exact env copies, value sources, rows."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from innercritic.agents.networks import ActorCritic
from innercritic.envs.factory import make_env
from innercritic.envs.maze import generate_level, level_size
from innercritic.envs.maze_values import ACTION_DELTAS, bfs_distances, optimal_value, shortest_path
from innercritic.probing.closed_form import LinearValue, Standardiser
from innercritic.probing.planning import (
    agreement_on_policy_states,
    compare_planners,
    critic_value_fn,
    evaluate_planner,
    exact_value_fn as policy_exact_value_fn,
    greedy_actions,
    linear_value_fn,
    lookahead_q,
    plan_actions,
    probe_value_fn,
)
from innercritic.stats import wilson_interval

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAMMA = 0.9
DOORKEY = "MiniGrid-DoorKey-5x5-v0"


def exact_value_fn(gamma: float):
    """The optimal value read off each observation: walls, mouse and cheese are channels 0, 1, 2
    (the padding is drawn as wall, so the frame itself is a valid maze)."""
    cache: dict = {}

    def value(obs: torch.Tensor) -> torch.Tensor:
        o = obs.numpy()
        out = np.zeros(len(o))
        for j in range(len(o)):
            cheese = np.argwhere(o[j, 2])
            if len(cheese) == 0:
                continue
            key = (o[j, 0].tobytes(), tuple(cheese[0]))
            if key not in cache:
                cache[key] = optimal_value(o[j, 0].astype(bool), tuple(cheese[0]), gamma)
            r, c = np.argwhere(o[j, 1])[0]
            out[j] = cache[key][r, c]
        return torch.from_numpy(out)

    return value


def constant_value_fn(c: float):
    return lambda obs: torch.full((obs.shape[0],), float(c))


def free_neighbour_action(walls: np.ndarray, square) -> int:
    n = walls.shape[0]
    for a, (dr, dc) in enumerate(ACTION_DELTAS.tolist()):
        r, c = square[0] + dr, square[1] + dc
        if 0 <= r < n and 0 <= c < n and not walls[r, c]:
            return a
    raise AssertionError("no free neighbour")


def assert_same_maze_state(a, b):
    for name in vars(a):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------------------------
# Maze: known answers.


def test_exact_value_planner_follows_the_shortest_path():
    # Mixed sizes in a 9x9 frame: smaller mazes are padded with wall, which the decoder reads as maze.
    kwargs = {"size": (5, 9), "obs_size": 9, "cheese": "anywhere"}
    res = evaluate_planner("maze", kwargs, exact_value_fn(GAMMA), GAMMA, episodes=12, seed=123, num_envs=8)
    per = res["per_episode"]
    expected = []
    for seed in per["level_seed"].tolist():
        n = level_size(seed, (5, 9))
        walls, cheese = generate_level(seed, n, "anywhere")
        expected.append(len(shortest_path(walls, (n - 1, 0), cheese)) - 1)
    assert res["success"] == 1.0 and res["p_cheese"] == 1.0
    assert per["length"].tolist() == expected
    assert res["length"] == pytest.approx(np.mean(expected))
    assert res["return"] == 1.0
    assert len({level_size(s, (5, 9)) for s in per["level_seed"].tolist()}) > 1  # several sizes, not one lucky maze


def test_constant_value_ties_go_to_the_lowest_action_or_the_policy_preference():
    env = make_env("maze", 3, seed=5, size=9, cheese="fixed")
    env.reset(seed=5)
    actions, q = plan_actions(env, constant_value_fn(0.5), GAMMA)
    assert np.allclose(q, GAMMA * 0.5)  # no move from the start reaches the top-right cheese
    assert actions.tolist() == [0, 0, 0]
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    actions, _ = plan_actions(env, constant_value_fn(0.5), GAMMA, tie_logits=logits)
    assert actions.tolist() == [1, 3, 0]
    # A reward breaks the tie whatever the logits say.
    walls = env.walls(0)
    cheese = tuple(env.cheese_pos[0])
    a_in = free_neighbour_action(walls, cheese)  # cheese -> neighbour; the mouse goes back the other way
    neighbour = (cheese[0] + ACTION_DELTAS[a_in][0], cheese[1] + ACTION_DELTAS[a_in][1])
    env.set_mouse(0, neighbour)
    into_cheese = {0: 1, 1: 0, 2: 3, 3: 2}[a_in]
    actions, q = plan_actions(env, constant_value_fn(0.5), GAMMA, tie_logits=logits)
    assert actions[0] == into_cheese and q[0, into_cheese] == 1.0


def test_greedy_actions_tolerance_and_inactive_rows():
    q = np.array([[0.5, 0.5 + 1e-9, 0.2, 0.1], [np.nan] * 4, [0.1, 0.2, 0.3, 0.3]])
    assert greedy_actions(q).tolist() == [0, 0, 2]
    assert greedy_actions(q, tie_tol=0.0).tolist() == [1, 0, 2]


def test_terminal_ignores_the_value_and_truncation_bootstraps():
    env = make_env("maze", 2, seed=7, size=9, cheese="anywhere", max_steps=1)
    env.reset(seed=7)
    # Env 0 next to its cheese; a value of 100 everywhere would beat the reward if it were read there.
    walls, cheese = env.walls(0), tuple(env.cheese_pos[0])
    a_in = free_neighbour_action(walls, cheese)
    env.set_mouse(0, (cheese[0] + ACTION_DELTAS[a_in][0], cheese[1] + ACTION_DELTAS[a_in][1]))
    into_cheese = {0: 1, 1: 0, 2: 3, 3: 2}[a_in]
    q = lookahead_q(env, constant_value_fn(100.0), GAMMA)
    assert q[0, into_cheese] == 1.0
    assert np.all(np.delete(q[0], into_cheese) == GAMMA * 100.0)  # max_steps=1: truncated, bootstrapped
    # Every move truncates; with the exact value, q(a) = gamma * V*(square after a).
    q = lookahead_q(env, exact_value_fn(GAMMA), GAMMA)
    walls, cheese, mouse = env.walls(1), tuple(env.cheese_pos[1]), tuple(env.mouse_pos[1])
    v = optimal_value(walls, cheese, GAMMA)
    d = bfs_distances(walls, cheese)
    for a, (dr, dc) in enumerate(ACTION_DELTAS.tolist()):
        r, c = mouse[0] + dr, mouse[1] + dc
        if not (0 <= r < 9 and 0 <= c < 9) or walls[r, c]:
            r, c = mouse
        expected = 1.0 if (r, c) == cheese else GAMMA * v[r, c]
        assert q[1, a] == pytest.approx(expected, abs=1e-12)
    assert greedy_actions(q)[1] == next(
        a for a, (dr, dc) in enumerate(ACTION_DELTAS.tolist())
        if 0 <= mouse[0] + dr < 9 and 0 <= mouse[1] + dc < 9 and d[mouse[0] + dr, mouse[1] + dc] == d[mouse] - 1
    )


def test_maze_lookahead_restores_the_state_exactly():
    kwargs = {"size": 9, "cheese": "anywhere", "max_steps": 6}
    env, twin = (make_env("maze", 4, seed=11, **kwargs) for _ in range(2))
    for e in (env, twin):
        e.reset(seed=11)
        e.step(np.array([3, 0, 1, 2]))
    # Env 0 one move from its cheese, so the lookahead ends an episode and draws a new level.
    walls, cheese = env.walls(0), tuple(env.cheese_pos[0])
    a_in = free_neighbour_action(walls, cheese)
    for e in (env, twin):
        e.set_mouse(0, (cheese[0] + ACTION_DELTAS[a_in][0], cheese[1] + ACTION_DELTAS[a_in][1]))
    before = env.clone_state()
    plan_actions(env, exact_value_fn(GAMMA), GAMMA)
    assert_same_maze_state(env.clone_state(), before)
    rng = np.random.default_rng(0)
    for _ in range(8):  # through autoresets (max_steps=6): the random streams must match too
        a = rng.integers(0, 4, 4)
        out_env, out_twin = env.step(a), twin.step(a)
        for x, y in zip(out_env[:4], out_twin[:4]):
            assert np.array_equal(x, y)
        assert np.array_equal(out_env[4]["final_obs"], out_twin[4]["final_obs"])


# ---------------------------------------------------------------------------------------------
# MiniGrid: copies step like the original.


def test_minigrid_copy_steps_and_resets_like_the_original():
    env = make_env(DOORKEY, 2, seed=3, max_steps=4)
    obs, _ = env.reset(seed=3)
    clones = [copy.deepcopy(sub) for sub in env.unwrapped.envs]
    rng = np.random.default_rng(1)
    saw_reset = False
    for _ in range(10):
        a = rng.integers(0, 7, 2)
        obs, reward, term, trunc, info = env.step(a)
        for i, clone in enumerate(clones):
            o, r, te, tr, _ = clone.step(int(a[i]))
            assert (r, te, tr) == (reward[i], term[i], trunc[i])
            if te or tr:
                assert np.array_equal(o, info["final_obs"][i])
                # A reset without a seed draws the next layout from the copied RNG.
                o, _ = clone.reset()
                saw_reset = True
            assert np.array_equal(o, obs[i])
    assert saw_reset


def test_minigrid_lookahead_leaves_the_env_unchanged():
    kwargs = {"max_steps": 5}
    env, twin = (make_env(DOORKEY, 2, seed=4, **kwargs) for _ in range(2))
    env.reset(seed=4)
    twin.reset(seed=4)
    value = lambda obs: obs.reshape(obs.shape[0], -1).float().mean(1)  # noqa: E731
    rng = np.random.default_rng(2)
    for _ in range(7):
        actions, q = plan_actions(env, value, GAMMA)
        assert q.shape == (2, 7) and np.isfinite(q).all()
        a = rng.integers(0, 7, 2)
        out_env, out_twin = env.step(a), twin.step(a)
        for x, y in zip(out_env[:4], out_twin[:4]):
            assert np.array_equal(x, y)


def test_minigrid_q_matches_manual_copies_and_a_terminal_pays_its_reward():
    env = make_env(DOORKEY, 2, seed=8, max_steps=3)
    env.reset(seed=8)
    env.step(np.array([2, 2]))
    env.step(np.array([0, 1]))  # step 3 of 3 truncates everything in the lookahead
    value = lambda obs: obs.reshape(obs.shape[0], -1).float().sum(1) / 100.0  # noqa: E731
    q = lookahead_q(env, value, GAMMA)
    for i, sub in enumerate(env.unwrapped.envs):
        for a in range(7):
            o, r, te, tr, _ = copy.deepcopy(sub).step(a)
            assert tr and not te
            assert q[i, a] == pytest.approx(r + GAMMA * value(torch.from_numpy(o[None])).item())
    # Put env 1's agent in front of the goal (DoorKey-5x5: goal at (3, 3), the split wall at x = 2).
    base = env.unwrapped.envs[1].unwrapped
    base.agent_pos, base.agent_dir, base.step_count = np.array([3, 2]), 1, 0
    q = lookahead_q(env, constant_value_fn(100.0), GAMMA, active=np.array([False, True]))
    assert np.isnan(q[0]).all()
    assert q[1, 2] == pytest.approx(1 - 0.9 / base.max_steps)  # MiniGrid's success reward after 1 step
    assert np.all(np.delete(q[1], 2) == GAMMA * 100.0)


def test_minigrid_evaluate_with_constant_value_turns_left_until_the_time_limit():
    res = evaluate_planner(DOORKEY, {"max_steps": 6}, constant_value_fn(0.0), GAMMA, episodes=2, seed=0)
    assert res["success"] == 0.0 and res["length"] == 6.0 and res["return"] == 0.0
    assert "p_cheese" not in res


# ---------------------------------------------------------------------------------------------
# Value sources.


@pytest.fixture(scope="module")
def small_agent():
    torch.manual_seed(0)
    return ActorCritic((3, 5, 5), 4, arch="small", channels=(8, 8), hidden=32, separate_critic=True)


def test_critic_value_fn_is_the_critic_head(small_agent):
    obs = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (6, 3, 5, 5)).astype(np.uint8))
    assert torch.equal(critic_value_fn(small_agent)(obs), small_agent(obs)[1])


def test_exact_value_fn_is_the_bellman_solution_of_the_agents_own_policy(small_agent):
    """A policy head of zeros is the uniform random walk: its exact value, solved independently with
    probabilities of 1/4, must be what the planner's ``exact`` source reads at every square, and the
    eps:1 version of any agent is that same walk."""
    from innercritic.envs.maze_values import policy_value

    agent = copy.deepcopy(small_agent)
    with torch.no_grad():
        agent.policy_head.weight.zero_()
        agent.policy_head.bias.zero_()
    env = make_env("maze", 4, seed=3, size=5, cheese="anywhere")
    obs, _ = env.reset(seed=3)
    value = policy_exact_value_fn(agent, GAMMA)
    noisy = policy_exact_value_fn(small_agent, GAMMA, version="eps:1")
    for frame in obs:
        walls, cheese = frame[0] > 0, tuple(np.argwhere(frame[2])[0])
        truth = policy_value(walls, cheese, np.full((5, 5, 4), 0.25), GAMMA)
        free = [sq for sq in np.argwhere(~walls).tolist() if tuple(sq) != cheese]
        frames = np.repeat(frame[None], len(free), 0)
        frames[:, 1] = 0
        for k, (r, c) in enumerate(free):
            frames[k, 1, r, c] = 1
        expect = np.array([truth[r, c] for r, c in free])
        assert np.allclose(value(torch.from_numpy(frames)).numpy(), expect, atol=1e-12)
        assert np.allclose(noisy(torch.from_numpy(frames)).numpy(), expect, atol=1e-12)
        assert expect.min() > 0 and np.ptp(expect) > 0.05, "a value that varies over the maze"
    no_cheese = obs.copy()
    no_cheese[:, 2] = 0
    assert value(torch.from_numpy(no_cheese)).abs().max() == 0
    # The cache's exact values (one episode per first observation here) are the same solution.
    from innercritic.probing.evaluate import maze_exact_values

    cached = maze_exact_values(obs, np.arange(len(obs)), np.zeros(len(obs), int), ["policy"], agent, GAMMA)
    assert np.allclose(cached, value(torch.from_numpy(obs)).numpy(), atol=1e-12) and cached.min() > 0


def test_probe_value_fn_one_hot_reads_the_standardised_feature(small_agent):
    obs = torch.from_numpy(np.random.default_rng(1).integers(0, 2, (6, 3, 5, 5)).astype(np.uint8))
    hook = "encoder.block1.hook_out"  # a conv activation: flattened (C, H, W) features
    _, cache = small_agent.run_with_cache(obs, names=[hook])
    acts = cache[hook].reshape(6, -1).double()
    d = acts.shape[1]
    mean, std = torch.linspace(-1, 1, d, dtype=torch.float64), torch.linspace(0.5, 2, d, dtype=torch.float64)
    k = 37
    w = torch.zeros(d, dtype=torch.float64)
    w[k] = 1.0
    got = probe_value_fn(small_agent, hook, mean, std, w, 0.0)(obs)
    assert torch.allclose(got, (acts[:, k] - mean[k]) / std[k], atol=1e-12)
    with pytest.raises(KeyError, match="encoder.block1.hook_out"):
        probe_value_fn(small_agent, "encoder.block1.hook_outt", mean, std, w, 0.0)
    with pytest.raises(ValueError, match="std"):
        probe_value_fn(small_agent, hook, mean, torch.zeros(d), w, 0.0)


def test_linear_value_fn_matches_the_closed_form_probe(small_agent):
    rng = np.random.default_rng(2)
    obs = torch.from_numpy(rng.integers(0, 2, (20, 3, 5, 5)).astype(np.uint8))
    _, cache = small_agent.run_with_cache(obs, names=["encoder.hook_hidden"])
    x = cache["encoder.hook_hidden"].double().numpy()
    standardiser = Standardiser.fit(x)
    probe = LinearValue(w=rng.normal(size=x.shape[1]), b=0.3, alpha=1.0)
    got = linear_value_fn(small_agent, "encoder.hook_hidden", standardiser, probe)(obs).numpy()
    assert np.allclose(got, probe.predict(standardiser.transform(x)), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Agreement and the comparison table.


def biased_agent(action: int) -> ActorCritic:
    """An agent whose policy all but always picks ``action`` (a huge policy-head bias)."""
    torch.manual_seed(1)
    agent = ActorCritic((3, 5, 5), 4, arch="small", channels=(4,), hidden=8)
    with torch.no_grad():
        agent.policy_head.bias.zero_()
        agent.policy_head.bias[action] = 50.0
    return agent


def test_agreement_known_answers_with_a_biased_policy():
    # Cheese fixed top-right of a 5x5 maze: a mouse moving up from the bottom-left never gets next to it.
    kwargs = {"size": 5, "cheese": "fixed", "max_steps": 6}
    up, right = biased_agent(0), biased_agent(3)
    const = constant_value_fn(0.0)
    res = agreement_on_policy_states(up, "maze", kwargs, const, GAMMA, episodes=4, seed=3)
    assert res["agree_policy_states"] == 1.0 and res["decisions"] == 24
    assert res["agree_policy_states_lo"] < 1.0 == res["agree_policy_states_hi"]
    res = agreement_on_policy_states(right, "maze", {**kwargs, "cheese": "fixed:0,0"}, const, GAMMA, episodes=4, seed=3)
    assert res["agree_policy_states"] == 0.0  # ties -> up, the policy says right
    res = agreement_on_policy_states(right, "maze", {**kwargs, "cheese": "fixed:0,0"}, const, GAMMA, episodes=4, seed=3, tie_break="policy")
    assert res["agree_policy_states"] == 1.0
    own = evaluate_planner("maze", kwargs, const, GAMMA, episodes=4, seed=3, policy=up)
    assert own["agree_own_states"] == 1.0


def test_compare_planners_rows_are_complete_and_deterministic():
    torch.manual_seed(2)
    agent = ActorCritic((3, 5, 5), 4, arch="small", channels=(4,), hidden=8)
    kwargs = {"size": 5, "cheese": "anywhere"}
    sources = {"critic": critic_value_fn(agent), "exact": exact_value_fn(GAMMA)}
    rows = compare_planners(agent, "maze", kwargs, sources, GAMMA, episodes=6, seed=21, num_envs=4)
    assert [r["source"] for r in rows] == ["critic", "exact", "policy", "random"]
    for row in rows:
        for key in ("success", "return", "length", "agree_policy_states", "agree_own_states", "p_cheese", "p_top_right"):
            assert key in row and f"{key}_lo" in row and f"{key}_hi" in row, (row["source"], key)
            assert row[f"{key}_lo"] <= row[key] <= row[f"{key}_hi"], (row["source"], key)
        assert row["episodes"] == 6
    assert rows[1]["success"] == 1.0  # the exact value plans optimally whatever the agent
    again = compare_planners(agent, "maze", kwargs, sources, GAMMA, episodes=6, seed=21, num_envs=4)
    assert again == rows
    # The policy row's own episodes are those of agreement_on_policy_states (the same seeded rollout).
    agree = agreement_on_policy_states(agent, "maze", kwargs, sources["critic"], GAMMA, episodes=6, seed=21, num_envs=4)
    assert agree["agree_policy_states"] == rows[0]["agree_policy_states"]
    with pytest.raises(ValueError, match="reserved"):
        compare_planners(agent, "maze", kwargs, {"policy": sources["critic"]}, GAMMA, episodes=2, seed=0)


def test_wilson_interval_known_values():
    _, lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    _, lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.slow
def test_policy_row_reproduces_rolloutdatamodule_evaluate():
    from datamodules.rollout import EVAL_SEED_OFFSET, RolloutDataModule

    torch.manual_seed(3)
    agent = ActorCritic((3, 5, 5), 4, arch="small", channels=(4,), hidden=8)
    kwargs = {"size": 5, "cheese": "anywhere"}
    dm = RolloutDataModule(env="maze", env_kwargs=kwargs, eval_episodes=10, eval_dists={"d": {}}, eval_num_envs=4)
    expected = dm.evaluate(agent)["d"]
    rows = compare_planners(agent, "maze", kwargs, {}, GAMMA, episodes=10, seed=EVAL_SEED_OFFSET, num_envs=4)
    policy = next(r for r in rows if r["source"] == "policy")
    for key in ("return", "length", "success", "p_cheese", "p_top_right"):
        assert policy[key] == pytest.approx(expected[key]), key
