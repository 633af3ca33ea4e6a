"""Activation steering: vectors, exact reproduction at coefficient 0, scans, errors, the CLI run.

Everything runs on a tiny agent (small CNN, 4-8-8 channels, hidden 16) on 5x5 mazes, so the whole
file takes seconds apart from one ``train.py test`` subprocess.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from innercritic.agents import ActorCritic, AddVector
from innercritic.agents.hooks import HookedModule, HookPoint
from innercritic.steering.scan import Steer
from innercritic.agents.checkpoint import AGENT_KIND
from innercritic.steering import (
    LevelVectors,
    SteeringVector,
    action_map,
    action_map_figure,
    activation_shape,
    averaged_vector,
    check_coefficients,
    contrast_observations,
    mean_difference,
    normal_interval,
    play_blocks,
    play_episodes,
    probe_direction,
    random_like,
    run_scan,
    run_scans,
    summarise_episodes,
    wilson_interval,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {"size": 5, "cheese": "anywhere"}
HOOK = "encoder.block1.hook_out"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_agent(seed: int = 0) -> ActorCritic:
    torch.manual_seed(seed)
    return ActorCritic((3, 5, 5), 4, arch="small", separate_critic=True, channels=(4, 8, 8), hidden=16).eval()


def write_agent_ckpt(agent: ActorCritic, path: Path) -> Path:
    """A checkpoint laid out as PPO.on_save_checkpoint writes it, which load_agent reads."""
    env = {"spec": "maze", "kwargs": {"size": 5, "cheese": "top_right:3"}, "obs_shape": list(agent.obs_shape),
           "num_actions": agent.num_actions, "obs_high": 1.0}
    torch.save({"state_dict": {f"agent.{k}": v for k, v in agent.state_dict().items()},
                "innercritic": {"kind": AGENT_KIND, "agent_config": agent.config, "env": env, "env_steps": 0, "gamma": 0.99}}, path)
    return path


@pytest.fixture(scope="module")
def agent() -> ActorCritic:
    return tiny_agent()


@pytest.fixture(scope="module")
def vector(agent) -> SteeringVector:
    return averaged_vector(agent, HOOK, "cheese", ENV, num_mazes=8, seed=0)


# --------------------------------------------------------------------------- exact reproduction


def assert_same_episodes(a: dict, b: dict) -> None:
    assert len(a["trace"]) == len(b["trace"]) > 0
    for sa, sb in zip(a["trace"], b["trace"]):
        assert np.array_equal(sa["env"], sb["env"])
        assert np.array_equal(sa["obs"], sb["obs"])
        assert np.array_equal(sa["action"], sb["action"])
    for key in ("return", "length", "success", "p_cheese", "p_top_right", "reached_decision", "decision_cheese", "decision_top_right"):
        assert np.array_equal(a[key], b[key]), key
    # nan marks mazes without a decision square; equal_nan compares the rest bit for bit.
    for key in ("pi_decision_cheese", "pi_decision_top_right"):
        assert np.array_equal(a[key], b[key], equal_nan=True), key


def test_coefficient_zero_reproduces_unsteered_episodes_bit_for_bit(agent, vector):
    # Two rounds of three envs: the reset seeds of the second round and the shared generator count too.
    plain = play_episodes(agent, "maze", ENV, episodes=6, seed=3, num_envs=3, trace=True)
    for positions in (None, [(1, 1), (2, 3)]):
        zero = {HOOK: AddVector(vector.tensor, coeff=0.0, positions=positions)}
        steered = play_episodes(agent, "maze", ENV, episodes=6, seed=3, interventions=zero, num_envs=3, trace=True)
        assert_same_episodes(plain, steered)
        assert np.all(steered["kl"] == 0) and np.all(steered["value_change"] == 0)
    # A per-level vector installed at coefficient 0 too, built anew after each reset.
    steered = play_episodes(agent, "maze", ENV, episodes=6, seed=3, interventions=Steer(LevelVectors(HOOK, "cheese"), 0.0), num_envs=3, trace=True)
    assert_same_episodes(plain, steered)
    # run_scan's coefficient-0 row is the unsteered summary, exactly, for either kind of vector.
    expected = summarise_episodes(plain)
    for v in (vector, LevelVectors(HOOK, "cheese"), LevelVectors(HOOK, "top_right").control(1)):
        row = run_scan(agent, "maze", ENV, v, [0.0], episodes=6, seed=3, num_envs=3)[0]
        for key, value in expected.items():
            assert row[key] == value or (isinstance(value, float) and math.isnan(value) and math.isnan(row[key])), key


def assert_same_results(got: dict, want: dict) -> None:
    """Every per-episode array bit for bit (nan where a maze has no decision square), and the trace."""
    assert set(got) == set(want)
    for key in want:
        if key == "trace":
            assert len(got[key]) == len(want[key]) > 0
            for sg, sw in zip(got[key], want[key]):
                assert all(np.array_equal(sg[f], sw[f]) for f in ("env", "obs", "action"))
        else:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key], equal_nan=True), key


def same_row(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (isinstance(b[k], float) and math.isnan(b[k]) and math.isnan(a[k])) for k in b)


def counting_forwards(agent) -> tuple[list, object]:
    """A list that records the agent's whole-network calls (trunk and head calls are not counted), and
    the handle that stops it."""
    calls = []
    return calls, agent.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))


@pytest.mark.parametrize("net", ["separate critic", "shared egocentric"])
def test_lockstep_blocks_play_exactly_the_episodes_of_separate_runs(net):
    # The real agents' layout (egocentric, the features at the mouse) and the plain one, on 2 rounds
    # of 4 envs (the second counts 2), the tails of which have blocks down to one pending env.
    torch.manual_seed(1)
    extra = {"separate_critic": True} if net == "separate critic" else {"separate_critic": False, "agent_channel": 1, "egocentric": True}
    agent = ActorCritic((3, 5, 5), 4, arch="small", channels=(4, 8, 8), hidden=16, **extra).eval()
    fixed = averaged_vector(agent, HOOK, "cheese", ENV, num_mazes=4, seed=0)
    coefficients = [-2.0, 0.0, 0.5, 3.0]
    cases = [(LevelVectors(HOOK, "cheese"), None), (fixed, None), (fixed, [(1, 1), (2, 3)]),
             (SteeringVector(torch.randn(8), HOOK, "test"), None),  # one value per channel, broadcast over the squares
             (SteeringVector(torch.randn(16), "encoder.hook_hidden", "test"), None)]  # a hook past the trunk
    if agent.separate_critic:
        cases.append((SteeringVector(torch.randn(8, 5, 5), "critic_encoder.block1.hook_out", "test"), None))  # the value moves
    for vector, positions in cases:
        blocks = [Steer(vector, c, positions) if c else None for c in coefficients] + [Steer(vector, 0.0, positions)]
        blocks.append({HOOK: AddVector(torch.ones(8), coeff=0.3)})  # a plain intervention mapping, installed as it is
        calls, counting = counting_forwards(agent)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the batched path must not fall back here
            batched = play_blocks(agent, "maze", ENV, episodes=6, seed=3, blocks=blocks, num_envs=4, trace=True)
        batched_calls = len(calls)
        for block, got in zip(blocks, batched):
            fresh = Steer(block.vector, block.coefficient, positions) if isinstance(block, Steer) else block
            alone = play_episodes(agent, "maze", ENV, episodes=6, seed=3, interventions=fresh, num_envs=4, trace=True, batched=False)
            assert_same_results(got, alone)
        assert batched_calls < (len(calls) - batched_calls) / 3, "the lockstep run should batch, not call the network per block"
        # run_scan's rows: the lockstep scan against one run per coefficient (batched=False), row for row.
        rows = run_scan(agent, "maze", ENV, vector, coefficients, episodes=7, seed=3, positions=positions, num_envs=3)
        alone = run_scan(agent, "maze", ENV, vector, coefficients, episodes=7, seed=3, positions=positions, num_envs=3, batched=False)
        assert [r["coefficient"] for r in rows] == coefficients
        assert all(same_row(a, b) for a, b in zip(rows, alone))
        counting.remove()


def test_run_scans_plays_a_vector_and_its_control_in_one_run(agent):
    vector = LevelVectors(HOOK, "top_right")
    rows = run_scans(agent, "maze", ENV, [vector, vector.control(2)], [-1.0, 0.0, 2.0], episodes=5, seed=1, num_envs=3)
    for v, vec in enumerate((vector, vector.control(2))):
        alone = run_scan(agent, "maze", ENV, vec, [-1.0, 0.0, 2.0], episodes=5, seed=1, num_envs=3, batched=False)
        assert [r["source"] for r in rows[v]] == [vec.source] * 3
        assert all(same_row(a, b) for a, b in zip(rows[v], alone))
    one_line_error(lambda: run_scans(agent, "maze", ENV, [], [1.0], episodes=2), "vectors is empty")


def test_a_full_trunk_cache_is_emptied_and_recomputed_without_changing_a_bit(agent, monkeypatch):
    from innercritic.steering import lockstep

    # Room for 2 unsteered trunk rows (4 steered, which keep only the policy tower's 200 floats): the
    # caches empty themselves nearly every step, and now and then grow for a step that needs more alone.
    monkeypatch.setattr(lockstep, "CACHE_BYTES", 2 * 4 * (200 + 200))
    vector = LevelVectors(HOOK, "cheese")
    blocks = [None, Steer(vector, -1.0), Steer(vector, 2.0)]
    got = play_blocks(agent, "maze", ENV, episodes=6, seed=4, blocks=blocks, num_envs=4)
    for block, result in zip(blocks, got):
        fresh = None if block is None else Steer(vector, block.coefficient)
        assert_same_results(result, play_episodes(agent, "maze", ENV, episodes=6, seed=4, interventions=fresh, num_envs=4, batched=False))


def test_the_lockstep_forward_falls_back_to_whole_network_calls_where_the_trunk_is_not_row_invariant(agent, monkeypatch):
    # Simulate a library whose trunk rounds a row by its batch: the first step's check must notice,
    # warn, and leave every block with whole-network calls of its own (the episodes stay exact).
    real = type(agent).trunk

    def batch_dependent(self, obs, critic=True):
        flat, critic_flat = real(self, obs, critic)
        return flat + len(obs) * 1e-3, critic_flat

    steer = Steer(LevelVectors(HOOK, "cheese"), -1.0)
    want = play_episodes(agent, "maze", ENV, episodes=6, seed=2, interventions=Steer(steer.vector, -1.0), num_envs=4, batched=False)
    monkeypatch.setattr(type(agent), "trunk", batch_dependent)
    with pytest.warns(RuntimeWarning, match="fall back to whole-network calls"):
        got = play_episodes(agent, "maze", ENV, episodes=6, seed=2, interventions=steer, num_envs=4)
    assert_same_results(got, want)


def test_a_large_vector_at_the_logits_takes_over_the_policy(agent):
    push_right = SteeringVector(torch.tensor([0.0, 0.0, 0.0, 50.0]), "hook_logits", "test")
    plain = play_episodes(agent, "maze", ENV, episodes=4, seed=0, trace=True)
    steered = play_episodes(agent, "maze", ENV, episodes=4, seed=0, interventions={"hook_logits": AddVector(push_right.tensor, coeff=1.0)},
                            trace=True)
    assert all((step["action"] == 3).all() for step in steered["trace"])
    assert not all((step["action"] == 3).all() for step in plain["trace"])
    assert steered["kl"].min() > 1.0  # from near-uniform to near-deterministic: KL ~ log 4
    assert np.all(steered["value_change"] == 0)  # the critic reads its own tower, untouched
    rows = run_scan(agent, "maze", ENV, push_right, [-1.0, 0.0, 1.0], episodes=4, seed=0)
    assert [r["coefficient"] for r in rows] == [-1.0, 0.0, 1.0]
    assert rows[1]["kl"] == 0.0 and rows[2]["kl"] > 1.0
    for row in rows:
        for name in ("return", "success", "p_cheese", "p_top_right", "kl", "value_change", "length"):
            assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"], name


# --------------------------------------------------------------------------- per-level vectors with known answers


class ObsAgent(HookedModule):
    """A one-layer agent whose hook point is its input: the cheese vector there is the cheese pixel itself.

    Its logits read the cheese channel along each action's direction from the mouse, so the agent heads
    for a visible cheese and, blind to it, prefers "up"; its value is the cheese channel's sum.
    """

    def __init__(self, size: int, cheese_scale: float = 1.0) -> None:
        super().__init__()
        self.obs_shape, self.num_actions = (3, size, size), 4
        self.cheese_scale = cheese_scale  # how the agent weighs the cheese channel (1: as observed)
        self.hook_obs = HookPoint()  # (3, S, S)
        self.bias = torch.nn.Parameter(torch.tensor([0.5, 0.0, 0.0, 0.0]))
        self.setup_hooks()

    def forward(self, obs):
        x = self.hook_obs(obs.float())
        if self.cheese_scale != 1.0:
            x = torch.cat([x[:, :2], x[:, 2:] * self.cheese_scale], 1)
        rows = torch.arange(x.shape[-1], dtype=x.dtype)
        mouse_r = (x[:, 1].sum(2) * rows).sum(1)
        mouse_c = (x[:, 1].sum(1) * rows).sum(1)
        cheese_r = (x[:, 2].sum(2) * rows).sum(1)
        cheese_c = (x[:, 2].sum(1) * rows).sum(1)
        seen = x[:, 2].sum((1, 2))
        pull = torch.stack([mouse_r - cheese_r, cheese_r - mouse_r, mouse_c - cheese_c, cheese_c - mouse_c], 1)
        return 4.0 * pull * seen[:, None] + self.bias, seen


def test_per_level_cheese_vector_at_the_input_is_the_cheese_pixel_and_subtracting_it_blinds_the_agent():
    from innercritic.envs.factory import make_env

    agent = ObsAgent(5).eval()
    env = make_env("maze", 3, seed=11, size=5, cheese="anywhere")
    obs, _ = env.reset(seed=11)
    vectors = LevelVectors("hook_obs", "cheese").build(agent, env, range(3))
    cheese = env.cheese_pos
    for i in range(3):
        expected = torch.zeros(3, 5, 5)
        expected[2, cheese[i][0], cheese[i][1]] = 1.0  # the cheese channel's pixel, nothing else
        assert torch.equal(vectors[i], expected)
    # The top-right vector is the corner's wall pixel, with the sign of "open minus walled".
    top_right = LevelVectors("hook_obs", "top_right").build(agent, env, range(3))
    for i in range(3):
        expected = torch.zeros(3, 5, 5)
        expected[0, 0, 4] = -1.0
        if tuple(cheese[i]) == (0, 4):
            expected[2, 0, 4] = 1.0
        assert torch.equal(top_right[i], expected)
    env.close()
    # Its effect, exactly: at coefficient -1 the agent plays as one blind to the cheese channel, at +1
    # as one that sees it twice, step for step (same observations, same sampled actions).
    maze = {"size": 5, "cheese": "anywhere"}
    for coeff, scale in ((-1.0, 0.0), (1.0, 2.0)):
        steered = play_episodes(agent, "maze", maze, episodes=6, seed=2, num_envs=3, trace=True,
                                interventions=Steer(LevelVectors("hook_obs", "cheese"), coeff))
        edited = play_episodes(ObsAgent(5, cheese_scale=scale).eval(), "maze", maze, episodes=6, seed=2, num_envs=3, trace=True)
        assert_same_episodes(steered, edited)
        assert np.allclose(steered["vector_norm"], 1.0)
    blind = play_episodes(agent, "maze", maze, episodes=12, seed=2, interventions=Steer(LevelVectors("hook_obs", "cheese"), -1.0))
    plain = play_episodes(agent, "maze", maze, episodes=12, seed=2)
    # A cheese-seeking agent made blind: its first move at the decision square stops following the cheese.
    assert plain["decision_cheese"][plain["reached_decision"]].mean() == 1.0
    assert blind["decision_cheese"][blind["reached_decision"]].mean() < 0.5
    assert blind["kl"].mean() > 0.1


def test_per_level_random_control_matches_each_levels_norm(agent):
    from innercritic.envs.factory import make_env

    env = make_env("maze", 4, seed=5, **ENV)
    env.reset(seed=5)
    main = LevelVectors(HOOK, "cheese").build(agent, env, range(4))
    control = LevelVectors(HOOK, "cheese").control(3).build(agent, env, range(4))
    again = LevelVectors(HOOK, "cheese").control(3).build(agent, env, [2, 3])
    env.close()
    assert control.shape == main.shape == (4, *activation_shape(agent, HOOK))
    assert torch.allclose(control.flatten(1).norm(dim=1), main.flatten(1).norm(dim=1), rtol=1e-5)
    assert torch.equal(again, control[2:])  # seeded by level, not by batch slot
    cosine = (control * main).flatten(1).sum(1) / (control.flatten(1).norm(dim=1) * main.flatten(1).norm(dim=1))
    assert cosine.abs().max() < 0.5


def test_contrast_observations_edit_only_the_observation():
    from innercritic.envs.factory import make_env

    env = make_env("maze", 2, seed=1, size=5, obs_size=7, cheese="anywhere")
    obs, _ = env.reset(seed=1)
    cheese = env.cheese_pos.copy()
    first, second = contrast_observations(env, [0, 1], "top_right")
    assert np.array_equal(first, obs)
    diff = np.argwhere(first != second)
    assert set(diff[:, 0]) == {0, 1} and all(tuple(d[2:]) == (1, 5) for d in diff)  # each maze: its corner, in a 7x7 frame
    first, second = contrast_observations(env, [1], "cheese")
    assert second[0, 2].sum() == 0 and first[0, 2].sum() == 1 and np.array_equal(first[0, :2], second[0, :2])
    # The env itself is untouched: a contrast can be built in the maze being played.
    assert np.array_equal(env.cheese_pos, cheese) and np.array_equal(env.observe(0, env.mouse_pos[0][None]), obs[:1])
    env.close()


# --------------------------------------------------------------------------- bad input: one-line ValueErrors


def one_line_error(fn, *match: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for m in match:
        assert m in message, (m, message)
    return message


def test_bad_input_gets_a_one_line_error_naming_the_valid_choices(agent, vector):
    wrong_shape = SteeringVector(torch.ones(5), HOOK, "test")
    one_line_error(lambda: run_scan(agent, "maze", ENV, wrong_shape, [1.0], episodes=2), "(5,)", "does not fit", HOOK, "(8, 5, 5)")
    unknown = SteeringVector(torch.ones(8), "encoder.block9.hook_out", "test")
    one_line_error(lambda: run_scan(agent, "maze", ENV, unknown, [1.0], episodes=2), "unknown hook", "encoder.block1.hook_out")
    one_line_error(lambda: run_scan(agent, "maze", ENV, vector, [], episodes=2), "coefficients is empty")
    one_line_error(lambda: check_coefficients([1.0, float("nan")]), "not finite")
    one_line_error(lambda: run_scan(agent, "maze", ENV, vector, [1.0], episodes=0), "episodes")
    one_line_error(lambda: run_scan(agent, "maze", ENV, vector, [1.0], episodes=2, positions=[(9, 0)]), "outside", "5x5")
    hidden = SteeringVector(torch.ones(16), "encoder.hook_hidden", "test")
    one_line_error(lambda: run_scan(agent, "maze", ENV, hidden, [1.0], episodes=2, positions=[(0, 0)]), "positions need a spatial")
    # Per-level vectors: only the maze has a cheese and a corner to contrast; positions need a conv hook.
    per_level = LevelVectors(HOOK, "cheese")
    one_line_error(lambda: run_scan(agent, "MiniGrid-Empty-5x5-v0", {}, per_level, [1.0], episodes=2), "needs the cheese maze", "file, probe")
    one_line_error(lambda: run_scan(agent, "maze", ENV, LevelVectors("encoder.hook_hidden", "cheese"), [1.0], episodes=2, positions=[(0, 0)]),
                   "positions need a spatial")
    one_line_error(lambda: run_scan(agent, "maze", ENV, LevelVectors("encoder.nope", "cheese"), [1.0], episodes=2), "unknown hook")
    one_line_error(lambda: LevelVectors(HOOK, "bottom_left"), "unknown contrast", "cheese, top_right")


def test_the_module_checks_its_arguments_before_scanning(agent, tmp_path):
    from lightning_modules.steering import SteeringScan

    ckpt = write_agent_ckpt(agent, tmp_path / "agent.ckpt")
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), coefficients=[]), "coefficients is empty")
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), vector_source="magic"), "unknown vector_source", "cheese", "top_right",
                   "cheese_averaged")
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), vector_source="cheese", vector_norm=2.0), "per level", "cheese_averaged")
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), vector_source="file"), "vector_path")
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), hook="encoder.blok1.hook_out", num_mazes=2).setup("test"),
                   "unknown hook", "encoder.block1.hook_out")
    other = SteeringVector(torch.ones(16), "encoder.hook_hidden", "test").save(tmp_path / "v.pt")
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), vector_source="file", vector_path=str(other)).setup("test"),
                   "encoder.hook_hidden", "model.hook")
    wrong = SteeringVector(torch.ones(3), HOOK, "test").save(tmp_path / "w.pt")
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), vector_source="file", vector_path=str(wrong)).setup("test"), "does not fit")
    # A probe file: weight in standardised space and std, read weights-only, mapped to raw space.
    shape = activation_shape(agent, HOOK)
    w, std = torch.randn(2, math.prod(shape)), torch.rand(math.prod(shape)) + 0.5
    torch.save({"weight": w, "std": std, "hook": HOOK}, tmp_path / "probe.pt")
    scan = SteeringScan(agent_ckpt=str(ckpt), vector_source="probe", vector_path=str(tmp_path / "probe.pt"), probe_head=1, random_control=True)
    scan.setup("test")
    main, control = scan.vectors
    assert main.source == "probe" and main.shape == shape and main.norm == pytest.approx(1.0)
    assert torch.allclose(main.tensor.reshape(-1), (w[1] / std) / (w[1] / std).norm(), atol=1e-6)
    assert control.source == "random" and control.norm == pytest.approx(main.norm, rel=1e-5)
    assert scan.env_kwargs == {"size": 5, "cheese": "top_right:3"}


# --------------------------------------------------------------------------- vectors


def test_averaged_cheese_vector_is_the_mean_contrast_at_the_start(agent):
    from innercritic.envs.factory import make_env
    from innercritic.steering.vectors import VECTOR_SEED_OFFSET

    v = averaged_vector(agent, HOOK, "cheese", ENV, num_mazes=3, seed=5)
    assert v.shape == activation_shape(agent, HOOK) == (8, 5, 5)
    assert v.source == "cheese_averaged" and v.metadata["num_mazes"] == 3 and len(v.metadata["level_seeds"]) == 3
    env = make_env("maze", 3, seed=VECTOR_SEED_OFFSET + 5, **ENV)
    obs, _ = env.reset(seed=VECTOR_SEED_OFFSET + 5)
    without = obs.copy()
    without[:, 2] = 0  # the cheese channel
    _, a = agent.run_with_cache(torch.from_numpy(obs), names=[HOOK])
    _, b = agent.run_with_cache(torch.from_numpy(without), names=[HOOK])
    assert torch.allclose(v.tensor, (a[HOOK] - b[HOOK]).mean(0), atol=1e-6)


def test_save_load_round_trip_with_weights_only(vector, tmp_path):
    path = vector.save(tmp_path / "sub" / "cheese.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors only: a user's file can run no code
    assert set(raw) == {"vector", "meta_json"}
    loaded = SteeringVector.load(path)
    assert torch.equal(loaded.tensor, vector.tensor)
    assert (loaded.hook, loaded.source, loaded.metadata) == (vector.hook, vector.source, vector.metadata)
    torch.save({"something": torch.ones(2)}, tmp_path / "other.pt")
    one_line_error(lambda: SteeringVector.load(tmp_path / "other.pt"), "not a steering vector file")
    with pytest.raises(FileNotFoundError):
        SteeringVector.load(tmp_path / "missing.pt")


def test_random_control_matches_the_norm_and_is_reproducible(vector):
    a, b, c = random_like(vector, 0), random_like(vector, 0), random_like(vector, 1)
    assert a.shape == vector.shape and a.hook == vector.hook and a.source == "random"
    assert a.norm == pytest.approx(vector.norm, rel=1e-6)
    assert torch.equal(a.tensor, b.tensor) and not torch.equal(a.tensor, c.tensor)
    cosine = float((a.tensor * vector.tensor).sum()) / (a.norm * vector.norm)
    assert abs(cosine) < 0.5  # random in 200 dimensions: nearly orthogonal to the vector


def test_probe_direction_is_w_over_std_in_raw_space():
    g = torch.Generator().manual_seed(0)
    w, std, mean = torch.randn(12, generator=g), torch.rand(12, generator=g) + 0.2, torch.randn(12, generator=g)
    d = probe_direction(w, std, "encoder.hook_hidden", shape=(3, 4))
    assert d.shape == (3, 4) and d.norm == pytest.approx(1.0)
    probe = lambda x: float(w @ ((x - mean) / std))  # noqa: E731 - the probe in raw space
    x = torch.randn(12, generator=g)
    # Along d the probe grows at |w / std| per unit, the most any unit direction achieves.
    rate = (probe(x + 0.1 * d.tensor.reshape(-1)) - probe(x)) / 0.1
    assert rate == pytest.approx(float((w / std).norm()), rel=1e-4)
    other = torch.randn(12, generator=g)
    assert (probe(x + 0.1 * other / other.norm()) - probe(x)) / 0.1 < rate
    one_line_error(lambda: probe_direction(w, std[:5], "h"), "12", "5")
    one_line_error(lambda: probe_direction(torch.zeros(12), std, "h"), "zero")


def test_mean_difference_of_two_sets():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 4.0]])
    v = mean_difference(a, b, "encoder.hook_hidden")
    assert torch.allclose(v.tensor, torch.tensor([2.0, 1.0]))
    assert v.metadata == {"n_a": 2, "n_b": 3}
    one_line_error(lambda: mean_difference(a, b[:, :1], "h"), "same per-state shape")


def test_mean_difference_source_from_a_trajectory_cache(agent, tmp_path):
    from innercritic.cache import TrajectoryCache, build_cache, make_request
    from lightning_modules.steering import SteeringScan

    request = make_request(agent, {"spec": "maze", "kwargs": {"size": 5, "cheese": "top_right:3"}, "gamma": 0.9}, versions=["policy"],
                           episodes_per_version=4, hook_points=[HOOK], num_envs=4, episodes_per_shard=4)
    build_cache(agent, request, tmp_path / "cache", progress=False)
    ckpt = write_agent_ckpt(agent, tmp_path / "agent.ckpt")
    scan = SteeringScan(agent_ckpt=str(ckpt), vector_source="mean_difference", cache_dir=str(tmp_path / "cache"), label_field="step",
                        label_split=2.0, random_control=False)
    scan.setup("test")
    cache = TrajectoryCache(tmp_path / "cache")
    step, last = cache.column("step"), cache.column("last")
    high, low = np.flatnonzero((step >= 2) & ~last), np.flatnonzero((step < 2) & ~last)
    acts = cache.column(f"act.{HOOK}").astype(np.float64)
    expected = torch.from_numpy(acts[high].mean(0) - acts[low].mean(0)).float()
    (vector,) = scan.vectors
    assert vector.source == "mean_difference" and vector.shape == (8, 5, 5)
    assert torch.allclose(vector.tensor, expected, atol=1e-6)
    one_line_error(lambda: SteeringScan(agent_ckpt=str(ckpt), vector_source="mean_difference", cache_dir=str(tmp_path / "cache"),
                                        label_field="nope").setup("test"), "label_field", "return")


def test_intervals():
    p, lo, hi = wilson_interval(5, 10)
    assert (p, round(lo, 4), round(hi, 4)) == (0.5, 0.2366, 0.7634)
    assert wilson_interval(0, 20)[1] == 0.0 and 0 < wilson_interval(0, 20)[2] < 0.2
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    mean, lo, hi = normal_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    half = 1.959963984540054 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert (mean, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half))


def test_action_maps(agent, vector):
    # A per-level vector is built in the maze the map draws.
    fig, data = action_map_figure(agent, LevelVectors(HOOK, "cheese"), -2.0, ENV, seed=0)
    assert data["mean_total_variation"] > 0
    from innercritic.envs.factory import make_env

    env = make_env("maze", 1, seed=0, **ENV)
    env.reset(seed=0)
    plain = action_map(agent, env, 0)
    free = int((~env.walls(0)).sum())
    assert plain.squares.shape == (free - 1, 2)  # every free square but the cheese
    assert np.allclose(plain.probs.sum(1), 1.0) and plain.arrows.shape == (free - 1, 2)
    fig, data = action_map_figure(agent, vector, 2.0, ENV, seed=0)
    assert len(fig.axes) >= 3 and data["total_variation"].shape == (len(data["unsteered"].squares),)
    push_up = SteeringVector(torch.tensor([50.0, 0.0, 0.0, 0.0]), "hook_logits", "test")
    steered = action_map(agent, env, 0, {"hook_logits": AddVector(push_up.tensor)})
    assert np.allclose(steered.arrows, [[-1.0, 0.0]] * len(steered.squares), atol=1e-6)  # every arrow points up


# --------------------------------------------------------------------------- the command line


def test_cli_scan_writes_summary_rows_figures_and_wandb(agent, tmp_path):
    ckpt = write_agent_ckpt(agent, tmp_path / "agent.ckpt")
    root = tmp_path / "runs"
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)  # the default (offline) is what is under test
    cmd = [sys.executable, "train.py", "test", "-c", "configs/steer/maze.yaml", "--model.agent_ckpt", str(ckpt),
           "--model.episodes", "6", "--model.num_mazes", "4", "--model.coefficients", "[-2, 0, 2]",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["scan"]
    assert [(r["source"], r["coefficient"]) for r in rows] == [(s, c) for s in ("cheese", "random") for c in (-2.0, 0.0, 2.0)]
    for row in rows:
        assert row["hook"] == HOOK and row["episodes"] == 6
        assert row["per_level"] is True
        for name in ("return", "success", "p_cheese", "p_top_right", "p_decision_cheese", "p_decision_top_right", "kl", "value_change", "length"):
            assert f"{name}_lo" in row and f"{name}_hi" in row, name
    zero = [r for r in rows if r["coefficient"] == 0.0]
    assert zero[0]["p_cheese"] == zero[1]["p_cheese"] and zero[0]["kl"] == 0.0
    assert summary["config"]["model"]["hook"] == HOOK
    # The control is matched level by level, so the mean norms over the same levels agree.
    for c in (-2.0, 2.0):
        pair = [r["vector_norm"] for r in rows if r["coefficient"] == c]
        assert pair[0] > 0 and pair[1] == pytest.approx(pair[0], rel=1e-5)
    assert [v["source"] for v in summary["vectors"]] == ["cheese", "random"] and summary["vectors"][0]["metadata"]["per_level"]
    for name in ("steer_scan.png", "action_map_0.png", "action_map_1.png", "config.yaml"):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert len(metrics) == 3 and "steer/p_decision_cheese" in metrics[0] and "steer/random/p_cheese" in metrics[0]
    offline = list((root / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run"
    assert list(offline[0].glob("files/media/images/steer/*.png")), "no images logged to W&B"
    assert list(offline[0].glob("files/media/table/steer/*.table.json")), "no table logged to W&B"
    assert list(offline[0].glob("files/media/table/steer/plot/*p_cheese*.table.json")), "no line chart of p_cheese logged to W&B"


def test_ddp_ranks_split_the_coefficients_and_gather_the_rows_one_device_gives(agent, tmp_path):
    # Two CPU ranks each play their chunk of coefficients (vector and control) in one lockstep run;
    # the gathered rows are exactly those of one device, in the same order.
    ckpt = write_agent_ckpt(agent, tmp_path / "agent.ckpt")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    summaries = {}
    for devices in ("1", "2"):
        root = tmp_path / f"runs{devices}"
        cmd = [sys.executable, "train.py", "test", "-c", "configs/steer/maze.yaml", "--model.agent_ckpt", str(ckpt),
               "--model.episodes", "5", "--model.num_envs", "3", "--model.coefficients", "[-2, -1, 0, 1, 2]",
               "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
               "--trainer.devices", devices] + (["--trainer.strategy", "ddp"] if devices == "2" else [])
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries[devices] = json.loads((root / "version_0" / "summary.json").read_text())
    assert summaries["2"]["config"]["trainer"]["world_size"] == 2
    one, two = summaries["1"]["scan"], summaries["2"]["scan"]
    assert [(r["source"], r["coefficient"]) for r in two] == [(s, c) for s in ("cheese", "random") for c in (-2.0, -1.0, 0.0, 1.0, 2.0)]
    assert len(one) == len(two) and all(same_row(a, b) for a, b in zip(two, one))


def test_retargeting_at_the_input_moves_the_cheese_pixel_to_the_target_and_the_mouse_follows():
    from innercritic.envs.factory import make_env
    from innercritic.steering.vectors import target_square

    agent = ObsAgent(5).eval()
    env = make_env("maze", 4, seed=21, size=5, cheese="anywhere")
    env.reset(seed=21)
    vectors = LevelVectors("hook_obs", "retarget").build(agent, env, range(4))
    for i in range(4):
        target, cheese = target_square(env, i), tuple(env.cheese_pos[i])
        assert target not in ((4, 0), (0, 4), cheese) and not env.walls(i)[target]
        expected = torch.zeros(3, 5, 5)
        expected[2, target[0], target[1]], expected[2, cheese[0], cheese[1]] = 1.0, -1.0
        assert torch.equal(vectors[i], expected), "the cheese pixel moved to the target, nothing else"
        assert target_square(env, i) == target, "the same level gives the same target"
    env.close()
    # At coefficient 1 the cheese-seeking agent sees the cheese on the target square and heads there (it
    # ignores walls, so it does not always arrive), and finds the real cheese less often.
    maze = {"size": 5, "cheese": "anywhere"}
    rows = run_scan(agent, "maze", maze, LevelVectors("hook_obs", "retarget"), [0.0, 1.0], episodes=40, seed=4)
    assert rows[1]["p_target_lo"] > rows[0]["p_target_hi"], rows
    assert rows[1]["p_cheese"] < rows[0]["p_cheese"]
