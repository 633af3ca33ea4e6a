"""Hook machinery: caching, interventions (add / replace / patch), cleanup, nesting and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from innercritic.agents import ActorCritic, AddVector, HookedModule, HookNameError, HookPoint, Patch, Replace

OBS = {"impala": (3, 9, 9), "small": (3, 9, 9), "nature": (4, 84, 84)}


def make(arch: str = "small", sep: bool = False) -> ActorCritic:
    torch.manual_seed(0)
    return ActorCritic(OBS[arch], 5, arch=arch, separate_critic=sep)


def observations(arch: str = "small", batch: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, *OBS[arch]), generator=gen, dtype=torch.uint8)


def random_like_sample(model: ActorCritic, obs: torch.Tensor, name: str, seed: int = 2) -> torch.Tensor:
    shape = model.hook_shapes(obs[:1])[name]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def last_conv_hook(model: ActorCritic, tower: str = "encoder") -> str:
    shapes = model.hook_shapes(observations(model.arch, batch=1))
    return [n for n in model.tower_hook_names(tower) if len(shapes[n]) == 3][-1]


class _Toy(HookedModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(3, 4)
        self.hook_a = HookPoint()  # (4,)
        self.inner = nn.Module()
        self.inner.hook_b = HookPoint()  # (4,)
        self.hook_skipped = HookPoint()  # (4,), only reached when skip=False
        self.setup_hooks()

    def forward(self, x: torch.Tensor, skip: bool = True) -> torch.Tensor:
        x = self.inner.hook_b(torch.relu(self.hook_a(self.lin0(x))))
        return x if skip else self.hook_skipped(x * 2)


def test_generic_hooked_module():
    toy = _Toy()
    assert toy.hook_names == ["hook_a", "inner.hook_b", "hook_skipped"]
    assert toy.inner.hook_b.name == "inner.hook_b" and toy.hook_point("hook_a") is toy.hook_a
    x = torch.randn(2, 3)
    out, cache = toy.run_with_cache(x, names="inner.hook_b")  # a bare string is one name
    assert list(cache) == ["inner.hook_b"] and torch.equal(cache["inner.hook_b"], out)
    _, cache = toy.run_with_cache(x)  # None: what the pass reaches
    assert list(cache) == ["hook_a", "inner.hook_b"]
    _, cache = toy.run_with_cache(x, skip=False, names=["hook_skipped", "hook_a"])  # kwargs reach forward
    assert list(cache) == ["hook_skipped", "hook_a"]
    with pytest.raises(RuntimeError, match="did not reach"):
        toy.run_with_cache(x, names=["hook_skipped"])
    assert no_hooks_left(toy)


def test_missing_setup_hooks_is_explained():
    class Forgot(HookedModule):
        def __init__(self) -> None:
            super().__init__()
            self.hook_x = HookPoint()

    with pytest.raises(RuntimeError, match="setup_hooks"):
        Forgot().hook_names


def test_detach_flag():
    model, obs = make(), observations()
    _, cache = model.run_with_cache(obs, names=["encoder.block0.hook_out"])
    assert not cache["encoder.block0.hook_out"].requires_grad
    _, cache = model.run_with_cache(obs, names=["encoder.block0.hook_out"], detach=False)
    assert cache["encoder.block0.hook_out"].grad_fn is not None


@pytest.mark.parametrize("arch,sep", [("small", False), ("impala", True), ("nature", False)])
def test_coeff_zero_is_bit_for_bit_identity(arch, sep):
    model = make(arch, sep)
    obs = observations(arch, batch=2)
    base_logits, base_value = model(obs)
    shapes = model.hook_shapes(obs)
    # inf/nan entries: 0 * inf would be nan, so a 0-coefficient addition must not be performed at all.
    interventions = {}
    for name, shape in shapes.items():
        vector = torch.randn(shape)
        if vector.numel() > 1:
            vector.view(-1)[0] = float("inf")
            vector.view(-1)[1] = float("nan")
        interventions[name] = AddVector(vector, coeff=0.0)
    with model.intervene(interventions):
        logits, value = model(obs)
    assert torch.equal(logits, base_logits) and torch.equal(value, base_value)
    # A signed zero survives a 0-coefficient add untouched (x + 0.0 * v would turn -0.0 into +0.0).
    act = torch.tensor([[-0.0, 1.0]])
    out = AddVector(torch.ones(2), coeff=0.0)(act)
    assert out is act and torch.signbit(out[0, 0])


def test_hooks_removed_after_exception():
    model, obs = make("small", True), observations()
    base = model(obs)
    name = "encoder.block1.hook_out"
    with pytest.raises(RuntimeError, match="boom"):
        with model.intervene({name: AddVector(random_like_sample(model, obs, name), coeff=5.0)}):
            assert not no_hooks_left(model)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    after = model(obs)
    assert torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])
    # An error raised inside the forward pass (a bad vector) cleans up too.
    with pytest.raises(ValueError):
        with model.intervene({name: AddVector(torch.ones(7))}):
            model(obs)
    assert no_hooks_left(model)


@pytest.mark.parametrize("arch,sep,name", [
    ("small", False, "encoder.block1.hook_out"),
    ("small", True, "encoder.block1.hook_conv"),
    ("impala", False, "encoder.block1.res0.hook_out"),
    ("impala", True, "critic_encoder.block0.hook_pool"),
    ("nature", True, "encoder.block1.hook_out"),
])
def test_addition_changes_downstream_only(arch, sep, name):
    model = make(arch, sep)
    obs = observations(arch, batch=2)
    (base_logits, base_value), base = model.run_with_cache(obs)
    vector = random_like_sample(model, obs, name)
    with model.intervene({name: AddVector(vector, coeff=3.0)}):
        (logits, value), steered = model.run_with_cache(obs)
    names = model.hook_names
    tower = name.split(".")[0]
    at = names.index(name)
    for other in names:
        unchanged = torch.equal(steered[other], base[other])
        if names.index(other) < at or (other.split(".")[0] not in (tower, "hook_logits", "hook_value")):
            assert unchanged, f"{other} is upstream of {name} or in another tower but changed"
        elif other.startswith(tower + "."):
            assert not unchanged, f"{other} is downstream of {name} but did not change"
    torch.testing.assert_close(steered[name], base[name] + 3.0 * vector)
    policy_side = tower == "encoder"
    critic_side = tower == "critic_encoder" or not sep
    assert torch.equal(logits, base_logits) != policy_side
    assert torch.equal(value, base_value) != critic_side


@pytest.mark.parametrize("arch", ["small", "impala"])
def test_positions_restrict_the_change(arch):
    model = make(arch)
    obs = observations(arch)
    name = "encoder.block1.hook_conv"
    _, base = model.run_with_cache(obs, names=[name])
    channels, height, width = base[name].shape[1:]
    squares = [(0, 0), (height - 1, width - 2)]
    expected = torch.zeros(height, width, dtype=torch.bool)
    for h, w in squares:
        expected[h, w] = True
    for vector in (torch.randn(channels, height, width), torch.randn(channels)):
        with model.intervene({name: AddVector(vector, coeff=2.0, positions=squares)}):
            _, steered = model.run_with_cache(obs, names=[name])
        changed = steered[name] != base[name]
        assert torch.equal(changed.all(dim=(0, 1)), expected) and torch.equal(changed.any(dim=(0, 1)), expected)
        full = vector if vector.dim() == 3 else vector[:, None, None].expand(channels, height, width)
        torch.testing.assert_close(steered[name], torch.where(expected, base[name] + 2.0 * full, base[name]))
    with pytest.raises(ValueError, match="outside"):
        with model.intervene({name: AddVector(torch.randn(channels), positions=[(height, 0)])}):
            model(obs)
    with pytest.raises(ValueError, match="positions need a"):
        with model.intervene({"encoder.hook_hidden": AddVector(torch.randn(model.hidden), positions=[(0, 0)])}):
            model(obs)


@pytest.mark.parametrize("arch,sep", [("small", False), ("impala", True), ("nature", False)])
def test_patching_last_encoder_layer_gives_source_logits(arch, sep):
    model = make(arch, sep)
    obs_a, obs_b = observations(arch, seed=1), observations(arch, seed=2)
    layer = last_conv_hook(model)
    (logits_a, value_a) = model(obs_a)
    (logits_b, value_b), cache_b = model.run_with_cache(obs_b, names=[layer])
    assert not torch.allclose(logits_a, logits_b)
    with model.intervene({layer: Patch(cache_b[layer])}):
        logits, value = model(obs_a)
    torch.testing.assert_close(logits, logits_b, rtol=0, atol=0)
    torch.testing.assert_close(value, value_a if sep else value_b, rtol=0, atol=0)
    # Patching every square is patching the whole activation.
    height, width = cache_b[layer].shape[-2:]
    everywhere = [(h, w) for h in range(height) for w in range(width)]
    with model.intervene({layer: Patch(cache_b[layer], positions=everywhere)}):
        assert torch.equal(model(obs_a)[0], logits)


def test_patch_at_positions_and_from_one_sample():
    model = make("small")
    obs_a, obs_b = observations(seed=1), observations(seed=2)
    name = "encoder.block0.hook_out"
    _, cache_a = model.run_with_cache(obs_a, names=[name])
    _, cache_b = model.run_with_cache(obs_b, names=[name])
    squares = [(2, 3), (8, 8)]
    with model.intervene({name: Patch(cache_b[name], positions=squares)}):
        _, patched = model.run_with_cache(obs_a, names=[name])
    mask = torch.zeros(9, 9, dtype=torch.bool)
    for h, w in squares:
        mask[h, w] = True
    assert torch.equal(patched[name], torch.where(mask, cache_b[name], cache_a[name]))
    # A (1, ...) source broadcasts over the batch.
    with model.intervene({name: Patch(cache_b[name][:1])}):
        _, patched = model.run_with_cache(obs_a, names=[name])
    assert torch.equal(patched[name], cache_b[name][:1].expand_as(cache_a[name]))
    with pytest.raises(ValueError, match=r"\(3, 16, 9, 9\).*\(4, 16, 9, 9\)"):
        with model.intervene({name: Patch(cache_b[name][:3])}):
            model(obs_a)


def test_replace_per_sample_and_full_batch():
    model = make("small", True)
    obs_a, obs_b = observations(seed=1), observations(seed=2)
    name = "encoder.hook_hidden"
    (logits_b, _), cache_b = model.run_with_cache(obs_b, names=[name])
    _, value_a = model(obs_a)
    with model.intervene({name: Replace(cache_b[name])}):
        logits, value = model(obs_a)
    assert torch.equal(logits, logits_b) and torch.equal(value, value_a)
    features = cache_b[name][2].clone()
    with model.intervene({name: Replace(features)}):
        logits, _ = model(obs_a)
    assert torch.equal(logits, logits_b[2:3].expand_as(logits))
    assert torch.equal(features, cache_b[name][2])  # the caller's tensor is not modified or aliased
    with model.intervene({"hook_value": Replace(torch.tensor(7.0))}):
        assert torch.equal(model(obs_a)[1], torch.full((4,), 7.0))


def test_nested_interventions():
    model, obs = make("small"), observations()
    name = "encoder.block2.hook_out"
    _, base = model.run_with_cache(obs, names=[name])
    u, v = random_like_sample(model, obs, name, 3), random_like_sample(model, obs, name, 4)
    with model.intervene({name: AddVector(u)}):
        with model.intervene({name: AddVector(v, coeff=2.0)}):
            assert len(model.hook_point(name)._forward_hooks) == 2
            _, both = model.run_with_cache(obs, names=[name])
        assert len(model.hook_point(name)._forward_hooks) == 1
        _, outer = model.run_with_cache(obs, names=[name])
    assert no_hooks_left(model)
    torch.testing.assert_close(both[name], base[name] + u + 2.0 * v)
    torch.testing.assert_close(outer[name], base[name] + u)


def test_typo_names_close_matches():
    model, obs = make("impala", True), observations("impala")
    for call in (
        lambda: model.run_with_cache(obs, names=["encoder.block1.res0.hook_otu"]),
        lambda: model.intervene({"encoder.block1.res0.hook_otu": AddVector(torch.ones(32))}).__enter__(),
    ):
        with pytest.raises(KeyError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert "'encoder.block1.res0.hook_otu'" in message
        assert "'encoder.block1.res0.hook_out'" in message
        assert "model.hook_names" in message
    assert no_hooks_left(model)
    # Also a ValueError, and checked before anything is installed.
    good = "encoder.block0.hook_conv"
    with pytest.raises(ValueError, match="no close match"):
        with model.intervene({good: AddVector(torch.ones(16)), "zzzz": AddVector(torch.ones(16))}):
            pass
    assert no_hooks_left(model)
    assert issubclass(HookNameError, KeyError) and issubclass(HookNameError, ValueError)


def test_shape_mismatch_names_both_shapes():
    model, obs = make("small"), observations()
    name = "encoder.block1.hook_out"
    with pytest.raises(ValueError) as info:
        with model.intervene({name: AddVector(torch.ones(16, 9, 9))}):
            model(obs)
    message = str(info.value)
    assert "\n" not in message
    assert "(16, 9, 9)" in message and "(32, 9, 9)" in message and name in message
    # Validated even at coefficient 0, so that a scan fails at its first point.
    with pytest.raises(ValueError, match=r"\(7,\)"):
        with model.intervene({"encoder.hook_hidden": AddVector(torch.ones(7), coeff=0.0)}):
            model(obs)
    with pytest.raises(TypeError, match="AddVector, Replace or Patch"):
        with model.intervene({name: torch.ones(32)}):
            pass
    assert no_hooks_left(model)
