"""Loading trained agents from Lightning checkpoints without Lightning or the training config.

A PPO checkpoint carries an ``innercritic`` entry: the network's constructor arguments, the env it
was trained on (spec, kwargs, observation shape, number of actions) and the discount. That is enough
for collection, probing and steering to rebuild both sides. Checkpoints are read with
``weights_only=True``: a file handed in by a user can never run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from innercritic.agents.networks import ActorCritic
from innercritic.errors import InnerCriticError, MissingFileError

AGENT_KIND = "innercritic.ppo_agent"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` and a one-line error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise InnerCriticError(f"checkpoint {str(path)!r} cannot be read as a weights-only torch checkpoint: {str(err).splitlines()[0]}") from None


def describe_checkpoint(ckpt: Any) -> str:
    """What kind of checkpoint a loaded file is, in words: for error messages that name what they got."""
    if not isinstance(ckpt, dict):
        return f"not a checkpoint (a {type(ckpt).__name__})"
    for key in ("innercritic", "innercritic_probe"):
        meta = ckpt.get(key)
        if isinstance(meta, dict) and meta.get("kind"):
            return str(meta["kind"])
    if "state_dict" in ckpt:
        return "a Lightning checkpoint of no InnerCritic module"
    return "not a Lightning checkpoint (no state_dict)"


def load_agent(path: str | Path) -> tuple[ActorCritic, dict[str, Any]]:
    """The agent stored in a PPO checkpoint (eval mode, on the CPU) and its env description."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("innercritic")
    if not isinstance(meta, dict) or meta.get("kind") != AGENT_KIND:
        raise InnerCriticError(f"checkpoint {str(path)!r} is {describe_checkpoint(ckpt)}, not an InnerCritic agent checkpoint ({AGENT_KIND}); "
                               "pass a checkpoint written by `train.py fit` with a PPO model")
    agent = ActorCritic(**meta["agent_config"])
    prefix = "agent."
    agent.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    agent.eval()
    env = dict(meta["env"])
    env["gamma"] = meta.get("gamma")
    return agent, env


def check_env_compatible(stored: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Raise a one-line error when an agent built for ``stored`` cannot act in ``current``."""
    for key in ("spec", "obs_shape", "num_actions"):
        if _as_list(stored.get(key)) != _as_list(current.get(key)):
            raise InnerCriticError(
                f"{what} was trained on env {stored.get('spec')!r} (obs {stored.get('obs_shape')}, {stored.get('num_actions')} actions) "
                f"but this run uses {current.get('spec')!r} (obs {current.get('obs_shape')}, {current.get('num_actions')} actions)")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
