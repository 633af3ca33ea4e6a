"""ActorCritic: architectures, hook points, shapes, initialisation, separate critic tower, config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from innercritic.agents import ARCHS, ActorCritic, HookPoint

OBS = {"impala": (3, 9, 9), "small": (3, 9, 9), "nature": (4, 84, 84)}
NUM_ACTIONS = 5
CONFIGS = [(arch, sep) for arch in ARCHS for sep in (False, True)]


def make(arch: str, sep: bool, seed: int = 0, **kwargs) -> ActorCritic:
    torch.manual_seed(seed)
    return ActorCritic(OBS[arch], NUM_ACTIONS, arch=arch, separate_critic=sep, **kwargs)


def observations(arch: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, *OBS[arch]), generator=gen, dtype=torch.uint8)


def manual_tower(model: ActorCritic, tower_name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation of one tower recomputed with functional ops from the parameters."""
    tower = getattr(model, tower_name)
    acts: dict[str, torch.Tensor] = {}
    for i in range(len(model.channels)):
        block = getattr(tower, f"block{i}")
        p = f"{tower_name}.block{i}"
        if model.arch == "impala":
            x = acts[f"{p}.hook_conv"] = F.conv2d(x, block.conv.weight, block.conv.bias, padding=1)
            x = acts[f"{p}.hook_pool"] = F.max_pool2d(x, 3, stride=2, padding=1)
            for j in range(2):
                res = getattr(block, f"res{j}")
                a = acts[f"{p}.res{j}.hook_conv0"] = F.conv2d(F.relu(x), res.conv0.weight, res.conv0.bias, padding=1)
                b = acts[f"{p}.res{j}.hook_conv1"] = F.conv2d(F.relu(a), res.conv1.weight, res.conv1.bias, padding=1)
                x = acts[f"{p}.res{j}.hook_out"] = x + b
        else:
            stride, padding = ((4, 2, 1)[i], 0) if model.arch == "nature" else (1, 1)
            c = acts[f"{p}.hook_conv"] = F.conv2d(x, block.conv.weight, block.conv.bias, stride=stride, padding=padding)
            x = acts[f"{p}.hook_out"] = F.relu(c)
    if model.arch == "impala":
        x = F.relu(x)
    flat = acts[f"{tower_name}.hook_flat"] = x.flatten(1)
    fc = acts[f"{tower_name}.hook_fc"] = F.linear(flat, tower.fc.weight, tower.fc.bias)
    acts[f"{tower_name}.hook_hidden"] = F.relu(fc)
    return acts


def manual_forward(model: ActorCritic, obs: torch.Tensor) -> dict[str, torch.Tensor]:
    x = obs.float() * model.obs_scale
    acts = manual_tower(model, "encoder", x)
    critic = "critic_encoder" if model.separate_critic else "encoder"
    if model.separate_critic:
        acts.update(manual_tower(model, critic, x))
    acts["hook_logits"] = F.linear(acts["encoder.hook_hidden"], model.policy_head.weight, model.policy_head.bias)
    value = F.linear(acts[f"{critic}.hook_hidden"], model.value_head.weight, model.value_head.bias)
    acts["hook_value"] = value.squeeze(-1)
    return acts


@pytest.mark.parametrize("arch,sep", CONFIGS)
def test_cache_matches_manual_forward_and_documented_shapes(arch, sep):
    model, obs = make(arch, sep), observations(arch)
    shapes = model.hook_shapes(obs)
    (logits, value), cache = model.run_with_cache(obs)
    expected = manual_forward(model, obs)
    assert list(cache) == model.hook_names == list(shapes)
    assert set(cache) == set(expected)
    for name, act in cache.items():
        assert tuple(act.shape) == (obs.shape[0], *shapes[name]), name
        torch.testing.assert_close(act, expected[name], msg=name)
    assert logits.shape == (4, NUM_ACTIONS) and value.shape == (4,)
    assert logits.dtype == torch.float32 and value.dtype == torch.float32
    assert torch.equal(cache["hook_logits"], logits) and torch.equal(cache["hook_value"], value)


@pytest.mark.parametrize("arch,sep", CONFIGS)
def test_hook_names_are_module_paths_in_forward_order(arch, sep):
    model = make(arch, sep)
    fired: list[str] = []
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: fired.append(name))
        for name, module in model.named_modules()
        if isinstance(module, HookPoint)
    ]
    model(observations(arch))
    for handle in handles:
        handle.remove()
    assert fired == model.hook_names
    for name in model.hook_names:
        assert model.get_submodule(name).name == name
    towers = ["encoder", "critic_encoder"] if sep else ["encoder"]
    for tower in towers:
        names = model.tower_hook_names(tower)
        assert names and all(n.startswith(tower + ".") for n in names)
        assert names == [n for n in model.hook_names if n.startswith(tower + ".")]
    assert model.hook_names[-2:] == ["hook_logits", "hook_value"]
    # Every conv and linear layer of a tower has a hook point on its output.
    for tower in towers:
        convs = [n for n, m in getattr(model, tower).named_modules() if isinstance(m, torch.nn.Conv2d)]
        hooked = set(model.tower_hook_names(tower))
        for conv in convs:
            parent, _, leaf = conv.rpartition(".")
            hook = f"{tower}.{parent}.hook_{leaf}" if leaf.startswith("conv") else None
            assert hook in hooked, conv
        assert f"{tower}.hook_fc" in hooked and f"{tower}.hook_hidden" in hooked


def test_small_separate_hook_names_listed():
    model = ActorCritic((3, 9, 9), 4, arch="small", separate_critic=True)
    tower = [f"block{i}.hook_{k}" for i in range(3) for k in ("conv", "out")] + ["hook_flat", "hook_fc", "hook_hidden"]
    expected = [f"encoder.{n}" for n in tower] + [f"critic_encoder.{n}" for n in tower] + ["hook_logits", "hook_value"]
    assert model.hook_names == expected


def test_tower_hook_names_rejects_missing_tower():
    with pytest.raises(ValueError, match="critic_encoder"):
        make("small", False).tower_hook_names("critic_encoder")


@pytest.mark.parametrize("arch", ["impala", "small"])
@pytest.mark.parametrize("size", [5, 7, 9, 25])
def test_small_and_odd_grids(arch, size):
    model = ActorCritic((3, size, size), 4, arch=arch)
    obs = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    logits, value = model(obs)
    assert logits.shape == (2, 4) and value.shape == (2,)
    if arch == "impala":
        # 'SAME' pooling: every stage maps H to ceil(H / 2).
        side = size
        for _ in range(3):
            side = math.ceil(side / 2)
        assert model.encoder.conv_out_shape == (32, side, side)


def test_nature_needs_large_input():
    with pytest.raises(ValueError, match="at least 36x36"):
        ActorCritic((4, 9, 9), 4, arch="nature")
    model = ActorCritic((4, 84, 84), 4, arch="nature")
    assert model.hidden == 512 and model.encoder.conv_out_shape == (64, 7, 7)
    assert ActorCritic((4, 84, 84), 4, arch="nature", hidden=128).hidden == 128
    assert ActorCritic((3, 9, 9), 4, arch="impala").hidden == 256


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        ActorCritic((3, 9, 9), 4, arch="resnet")
    message = str(info.value)
    assert "\n" not in message and "'resnet'" in message
    assert all(repr(a) in message for a in ARCHS)


def test_wrong_observation_shape_is_a_clear_error():
    model = make("small", False)
    with pytest.raises(ValueError, match=r"expected obs of shape \(B, 3, 9, 9\), got \(3, 9, 9\)"):
        model(torch.zeros(3, 9, 9))
    with pytest.raises(ValueError, match="got"):
        model(torch.zeros(2, 3, 7, 7))


def test_obs_scale_and_dtypes():
    a = make("small", False, obs_scale=1 / 255)
    b = make("small", False)
    obs = torch.randint(0, 256, (4, 3, 9, 9), dtype=torch.uint8)
    la, va = a(obs)
    lb, vb = b(obs.float() / 255)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(va, vb)
    lc, vc = b(obs.double())
    assert lc.dtype == torch.float32 and vc.dtype == torch.float32


def test_config_round_trip():
    model = make("impala", True, obs_scale=0.5, channels=(8, 16), hidden=64)
    config = json.loads(json.dumps(model.config))
    rebuilt = ActorCritic(**config)
    rebuilt.load_state_dict(model.state_dict())
    obs = observations("impala")
    for x, y in zip(model(obs), rebuilt(obs)):
        assert torch.equal(x, y)
    assert rebuilt.config == model.config
    assert config == {
        "obs_shape": [3, 9, 9], "num_actions": NUM_ACTIONS, "arch": "impala", "separate_critic": True,
        "obs_scale": 0.5, "channels": [8, 16], "hidden": 64, "agent_channel": None, "egocentric": False,
        "critic_channels": [8, 16], "critic_hidden": 64,
    }
    assert make("impala", False).config["critic_channels"] is None  # a shared tower has no critic widths


def test_critic_tower_can_be_smaller_than_the_policy_tower():
    model = ActorCritic((3, 9, 9), NUM_ACTIONS, arch="small", separate_critic=True, channels=(8, 16, 8), hidden=16,
                        agent_channel=1, egocentric=True, critic_channels=(4, 2), critic_hidden=5)
    shapes = model.hook_shapes(observations("small"))
    assert shapes["encoder.block1.hook_out"] == (16, 9, 9) and shapes["encoder.hook_hidden"] == (16,)
    assert shapes["critic_encoder.block1.hook_out"] == (2, 9, 9) and shapes["critic_encoder.hook_hidden"] == (5,)
    assert "critic_encoder.block2.hook_out" not in shapes
    assert model.value_head.in_features == 5
    rebuilt = ActorCritic(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())  # strict: every parameter has the same shape
    obs = observations("small")
    for x, y in zip(model(obs), rebuilt(obs)):
        assert torch.equal(x, y)
    torch.testing.assert_close(model.value(obs), model(obs)[1])
    with pytest.raises(ValueError, match="separate_critic=True"):
        ActorCritic((3, 9, 9), NUM_ACTIONS, arch="small", separate_critic=False, critic_channels=(4,))
    with pytest.raises(ValueError, match="critic_hidden must be at least 1"):
        ActorCritic((3, 9, 9), NUM_ACTIONS, arch="small", separate_critic=True, critic_hidden=0)


def test_agent_channel_reads_the_last_conv_output_at_the_marked_square():
    model = ActorCritic((3, 9, 9), NUM_ACTIONS, arch="small", channels=(4, 6), hidden=8, agent_channel=1)
    obs = torch.zeros(3, 3, 9, 9, dtype=torch.uint8)
    squares = [(8, 0), (0, 8), (4, 5)]
    for i, (r, c) in enumerate(squares):
        obs[i, 1, r, c] = 1
        obs[i, 0, (r + 1) % 9, c] = 1
    _, cache = model.run_with_cache(obs, names=["encoder.block1.hook_out", "encoder.hook_agent"])
    for i, (r, c) in enumerate(squares):
        assert torch.equal(cache["encoder.hook_agent"][i], cache["encoder.block1.hook_out"][i, :, r, c])
    assert model.encoder.fc.in_features == 6 * 81 + 6, "the flattened map and the agent's features side by side"
    assert model.representation_hook_names() == ["encoder.block0.hook_out", "encoder.block1.hook_out",
                                                 "encoder.hook_agent", "encoder.hook_hidden"]
    with pytest.raises(ValueError, match="agent_channel needs arch 'small'"):
        ActorCritic((3, 9, 9), NUM_ACTIONS, arch="impala", agent_channel=1)
    with pytest.raises(ValueError, match="agent_channel must index one of the 3 observation channels, got 3"):
        ActorCritic((3, 9, 9), NUM_ACTIONS, arch="small", agent_channel=3)


def test_orthogonal_init_as_cleanrl():
    model = make("small", True)

    def gram(weight):
        w = weight.reshape(weight.shape[0], -1)
        return w @ w.T

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.count_nonzero(module.bias) == 0, name
            rows, cols = module.weight.reshape(module.weight.shape[0], -1).shape
            if rows > cols:
                continue
            gain = {"policy_head": 0.01, "value_head": 1.0}.get(name, math.sqrt(2))
            torch.testing.assert_close(gram(module.weight) / gain**2, torch.eye(rows), atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("sep", [False, True])
def test_separate_critic_shares_nothing_with_the_policy(sep):
    model = make("small", sep)
    obs = observations("small")
    logits, _ = model(obs)
    logits.sum().backward()
    assert all(p.grad is None for p in model.value_head.parameters())
    if sep:
        assert all(p.grad is None for p in model.critic_encoder.parameters())
    model.zero_grad(set_to_none=True)
    _, value = model(obs)
    value.sum().backward()
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(p.grad is None for p in model.policy_head.parameters())
    if sep:
        assert all(g is None for g in encoder_grads)
    else:
        assert all(g is not None for g in encoder_grads)


def test_policy_logits_matches_forward_and_skips_critic():
    model = make("impala", True)
    obs = observations("impala")
    logits, _ = model(obs)
    calls = []
    handle = model.critic_encoder.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(model.policy_logits(obs), logits)
    handle.remove()
    assert calls == []


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_do_not_interact(arch):
    model, obs = make(arch, False), observations(arch, batch=3)
    logits, value = model(obs)
    single_logits, single_value = model(obs[1:2])
    torch.testing.assert_close(single_logits[0], logits[1])
    torch.testing.assert_close(single_value[0], value[1])


def test_agents_import_without_lightning():
    code = "import sys, innercritic.agents; assert not [m for m in sys.modules if m.startswith('lightning')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_egocentric_moves_the_last_conv_output_so_the_agent_sits_at_the_centre():
    model = ActorCritic((3, 9, 9), NUM_ACTIONS, arch="small", channels=(4, 6), hidden=8, agent_channel=1, egocentric=True)
    obs = observations("small", batch=3)
    obs[:, 1] = 0
    squares = [(8, 0), (0, 8), (4, 5)]
    for i, (r, c) in enumerate(squares):
        obs[i, 1, r, c] = 1
    _, cache = model.run_with_cache(obs, names=["encoder.block1.hook_out", "encoder.hook_flat"])
    conv, frame = cache["encoder.block1.hook_out"], cache["encoder.hook_flat"].view(3, 6, 17, 17)
    for i, (r, c) in enumerate(squares):
        # square (y, x) of the maze lands at (8 + y - r, 8 + x - c); everything else is padding
        inside = frame[i, :, 8 - r:17 - r, 8 - c:17 - c]
        assert torch.equal(inside, conv[i])
        padding = frame[i].clone()
        padding[:, 8 - r:17 - r, 8 - c:17 - c] = 0
        assert not padding.any()
    assert model.encoder.fc.in_features == 6 * 17 * 17 + 6
    (logits, value), _ = model.run_with_cache(obs)
    assert logits.shape == (3, NUM_ACTIONS) and value.shape == (3,)
    rebuilt = ActorCritic(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(obs)[0], logits)
    with pytest.raises(ValueError, match="egocentric needs agent_channel"):
        ActorCritic((3, 9, 9), NUM_ACTIONS, arch="small", egocentric=True)
