"""Noisy policy versions: mixture probabilities, temperature, sampling, spec parsing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innercritic.agents import PolicyVersion, parse_version


def logits_batch(batch: int = 6, actions: int = 5, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(batch, actions, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eps,temp", [(0.0, 1.0), (0.25, 1.0), (0.0, 0.3), (0.1, 2.0), (1.0, 1.0)])
def test_probs_form_a_distribution_and_match_the_formula(eps, temp):
    version = PolicyVersion("v", eps, temp)
    logits = logits_batch()
    probs = version.probs(logits)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    expected = (1 - eps) * torch.softmax(logits / temp, -1) + eps / logits.shape[-1]
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(version.log_probs(logits), expected.log())


def test_plain_policy_is_exactly_softmax():
    logits = logits_batch()
    version = parse_version("policy")
    assert version.is_policy and version == PolicyVersion("policy")
    assert torch.equal(version.probs(logits), torch.softmax(logits, -1))
    assert torch.equal(version.log_probs(logits), torch.log_softmax(logits, -1))


def test_eps_one_is_uniform():
    logits = logits_batch(actions=4)
    version = parse_version("eps:1")
    torch.testing.assert_close(version.probs(logits), torch.full((6, 4), 0.25))
    torch.testing.assert_close(version.log_probs(logits), torch.full((6, 4), 0.25).log())


def test_temperature_flattens():
    logits = logits_batch()
    entropies = []
    for temp in (0.5, 1.0, 4.0, 1e6):
        probs = PolicyVersion("t", temperature=temp).probs(logits)
        entropies.append(-(probs * probs.log()).sum(-1))
    for low, high in zip(entropies, entropies[1:]):
        assert (high > low).all()
    torch.testing.assert_close(PolicyVersion("t", temperature=1e6).probs(logits), torch.full((6, 5), 0.2), atol=1e-4, rtol=0)


def test_log_probs_stay_finite_for_extreme_logits():
    logits = torch.tensor([[0.0, -1e4, 1e4]])
    assert torch.isfinite(PolicyVersion("e", 0.01).log_probs(logits)).all()


def test_sampling_frequencies_match_probs():
    version = parse_version("eps:0.2,temp:1.5")
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0])
    n = 40000
    gen = torch.Generator().manual_seed(123)
    actions = version.sample(logits.expand(n, 4), generator=gen)
    assert actions.shape == (n,) and actions.dtype == torch.int64
    freq = torch.bincount(actions, minlength=4).float() / n
    # 4.5 standard errors of a frequency around p <= 0.5 with n = 40000.
    torch.testing.assert_close(freq, version.probs(logits), atol=0.012, rtol=0)
    again = version.sample(logits.expand(n, 4), generator=torch.Generator().manual_seed(123))
    assert torch.equal(actions, again)


@pytest.mark.parametrize("spec,eps,temp,name", [
    ("policy", 0.0, 1.0, "policy"),
    ("eps:0.25", 0.25, 1.0, "eps:0.25"),
    ("temp:2.0", 0.0, 2.0, "temp:2.0"),
    ("eps:0.1,temp:0.5", 0.1, 0.5, "eps:0.1,temp:0.5"),
    (" temp:0.5 , eps:.1 ", 0.1, 0.5, "eps:0.1,temp:0.5"),
    ("eps:1", 1.0, 1.0, "eps:1.0"),
])
def test_parse_version(spec, eps, temp, name):
    version = parse_version(spec)
    assert (version.epsilon, version.temperature, version.name) == (eps, temp, name)
    assert parse_version(version.name) == version


@pytest.mark.parametrize("spec", ["", "eps", "eps:", "eps:abc", "eps:1.5", "eps:-0.1", "temp:0", "temp:-1",
                                  "temp:inf", "eps:nan", "noise:0.1", "eps:0.1,eps:0.2", "eps:0.1;temp:2", "policy,eps:0.1"])
def test_parse_version_errors(spec):
    with pytest.raises(ValueError) as info:
        parse_version(spec)
    message = str(info.value)
    assert "\n" not in message and "valid forms" in message and "'eps:E,temp:T'" in message


def test_version_validation_and_immutability():
    with pytest.raises(ValueError, match="epsilon"):
        PolicyVersion("bad", epsilon=1.5)
    with pytest.raises(ValueError, match="temperature"):
        PolicyVersion("bad", temperature=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_version("policy").epsilon = 0.5  # type: ignore[misc]
