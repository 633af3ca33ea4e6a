"""Agents: actor-critic networks with named hook points, hook/intervention machinery, noisy policies,
and loading trained agents from checkpoints."""

from innercritic.agents.checkpoint import check_env_compatible, load_agent, read_checkpoint
from innercritic.agents.hooks import AddVector, HookedModule, HookNameError, HookPoint, Intervention, Patch, Replace
from innercritic.agents.networks import ARCHS, ActorCritic
from innercritic.agents.noisy import PolicyVersion, parse_version

__all__ = [
    "ARCHS",
    "ActorCritic",
    "AddVector",
    "HookNameError",
    "HookPoint",
    "HookedModule",
    "Intervention",
    "Patch",
    "PolicyVersion",
    "Replace",
    "check_env_compatible",
    "load_agent",
    "parse_version",
    "read_checkpoint",
]
