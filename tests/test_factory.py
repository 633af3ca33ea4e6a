"""make_env: one contract (uint8 channel-first obs, SAME_STEP autoreset, dense final_obs) for every family."""

import numpy as np
import pytest

from innercritic.envs.factory import env_family, make_env

SPECS = [
    ("maze", {"size": 7}, (3, 7, 7), 4),
    ("MiniGrid-DoorKey-5x5-v0", {"max_steps": 20}, (3, 7, 7), 7),
    ("ALE/Breakout-v5", {"max_num_frames_per_episode": 200}, (4, 84, 84), 4),
]


@pytest.mark.parametrize("spec,kwargs,shape,num_actions", SPECS)
def test_contract(spec, kwargs, shape, num_actions):
    env = make_env(spec, num_envs=3, seed=0, **kwargs)
    assert env.single_observation_space.shape == shape
    assert env.single_action_space.n == num_actions
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, *shape) and obs.dtype == np.uint8
    assert obs.max() <= env.single_observation_space.high.max()
    rng = np.random.default_rng(0)
    seen_done = False
    for _ in range(400):
        actions = rng.integers(0, num_actions, 3)
        obs, reward, terminated, truncated, info = env.step(actions)
        assert obs.shape == (3, *shape) and obs.dtype == np.uint8
        assert reward.dtype == np.float32 and terminated.dtype == bool and truncated.dtype == bool
        done = terminated | truncated
        assert np.array_equal(info["_final_obs"], done)
        assert info["final_obs"].shape == obs.shape and info["final_obs"].dtype == np.uint8
        if done.any():
            seen_done = True
            # SAME_STEP autoreset: the finished env's final obs is a real frame, distinct from the new start.
            i = int(np.flatnonzero(done)[0])
            assert info["final_obs"][i].any()
    env.close()
    assert seen_done, "no episode ended within 400 random steps; the time limit is not reaching the vector env"


def test_same_seed_same_observations_minigrid():
    a, b = (make_env("MiniGrid-DoorKey-5x5-v0", 2, seed=3) for _ in range(2))
    oa, _ = a.reset(seed=3)
    ob, _ = b.reset(seed=3)
    assert np.array_equal(oa, ob)
    for _ in range(10):
        act = np.array([2, 1])
        assert np.array_equal(a.step(act)[0], b.step(act)[0])


@pytest.mark.parametrize("spec", ["cartpole", "maze2", "MiniGrid-NoSuchEnv-v0", "ALE/NoSuchGame-v5", "minigrid"])
def test_unknown_spec_is_one_clear_line(spec):
    with pytest.raises(ValueError) as err:
        make_env(spec, 1)
    message = str(err.value)
    assert "\n" not in message and spec in message


def test_unknown_family_lists_families_with_examples():
    with pytest.raises(ValueError, match=r"maze .*MiniGrid-DoorKey-5x5-v0.*ALE/Breakout-v5"):
        env_family("procgen:maze")


def test_num_envs_must_be_positive():
    with pytest.raises(ValueError, match="num_envs"):
        make_env("maze", 0)
