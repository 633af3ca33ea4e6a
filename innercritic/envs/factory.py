"""One door to every environment family: ``make_env(spec, num_envs, seed)``.

Every env it returns is a gymnasium ``VectorEnv`` with the same contract, so training, collection,
planning and steering code never branches on the family:

- observations are ``uint8`` and channel-first, ``(num_envs, C, H, W)``; the observation space's
  ``high`` is the largest value an observation can take, so a network scales by ``1 / high``;
- autoreset is SAME_STEP: the obs returned for a finished env is the first obs of its next episode,
  and ``info["final_obs"]`` is a dense array holding the last obs where ``info["_final_obs"]`` is set
  (TD targets bootstrap through time-limit truncations from it);
- an episode *succeeds* when it terminates with a positive reward (maze: the cheese; MiniGrid: the
  goal); Breakout has no success, only return.

Families and their spec strings:

- ``maze`` - the cheese maze written here (``innercritic.envs.maze``); keyword arguments go to
  ``CheeseMaze`` (``size``, ``cheese``, ``obs_size``, ``max_steps``, ``num_levels``).
- ``MiniGrid-...`` / ``BabyAI-...`` - any registered MiniGrid id, image observations (partial 7x7 view
  unless ``fully_observable=True``), stepped by gymnasium's ``SyncVectorEnv``.
- ``ALE/<Game>-v5`` - ale-py's own C++ vector env with the standard Atari preprocessing (84x84 grey,
  frame skip 4 with max-pooling, frame stack 4, no-op starts, FIRE on reset); the ROMs ship in the
  ale-py wheel, so nothing is downloaded. It is about 2x faster here than gymnasium's vector wrappers
  and needs no OpenCV.
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

from innercritic.errors import InnerCriticError

FAMILIES = {
    "maze": "maze",
    "minigrid": "MiniGrid-DoorKey-5x5-v0",
    "atari": "ALE/Breakout-v5",
}

# MiniGrid's image encodes (object index, colour index, state); the largest value any channel takes is
# the object index of the last object type. Declaring it as `high` lets a network scale inputs to [0, 1].
_MINIGRID_HIGH = 10


def env_family(spec: str) -> str:
    """The family of a spec string (``maze``, ``minigrid`` or ``atari``); a clear error otherwise."""
    if not isinstance(spec, str):
        raise InnerCriticError(f"env spec must be a string, got {spec!r}; valid families: {_families()}")
    if spec == "maze":
        return "maze"
    if spec.startswith(("MiniGrid-", "BabyAI-")):
        return "minigrid"
    if spec.startswith("ALE/"):
        return "atari"
    raise InnerCriticError(f"unknown env spec {spec!r}; valid families: {_families()}")


def _families() -> str:
    return ", ".join(f"{family} (e.g. {example!r})" for family, example in FAMILIES.items())


def check_env_id(spec: str) -> str:
    """The family of ``spec`` once the id itself is known to exist (a registered MiniGrid id, a game
    ale-py ships); a one-line error naming the valid families otherwise. No env is built."""
    family = env_family(spec)
    if family == "minigrid":
        import minigrid  # noqa: F401  (registers the MiniGrid ids with gymnasium)

        if spec not in gym.registry:
            known = sorted((k for k in gym.registry if k.startswith(("MiniGrid-", "BabyAI-"))), key=lambda k: (k.startswith("BabyAI-"), k))
            raise InnerCriticError(f"unknown env id {spec!r}: not a registered MiniGrid id (registered: {', '.join(known[:5])}, ... "
                                   f"{len(known)} in all); valid families: {_families()}")
    elif family == "atari":
        from ale_py import roms

        if _atari_game(spec) not in roms.get_all_rom_ids():
            raise InnerCriticError(f"unknown env id {spec!r}: expected 'ALE/<Game>-v5' for a game ale-py ships; valid families: {_families()}")
    return family


def _atari_game(spec: str) -> str:
    match = re.fullmatch(r"ALE/([A-Za-z0-9]+)-v5", spec)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", match.group(1)).lower() if match else ""


def _check_kwargs(spec: str, builder: Any, kwargs: dict[str, Any], skip: int) -> None:
    """A one-line error for keyword arguments the family's builder does not take (e.g. a maze's
    ``size`` given to a MiniGrid id), naming the ones it does."""
    import inspect

    params = list(inspect.signature(builder).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.name != "seed"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise InnerCriticError(f"env {spec!r} takes no keyword argument(s) {unknown} (env_kwargs); valid: {', '.join(valid) or 'none'}")


def make_env(spec: str, num_envs: int = 1, seed: int | None = None, **kwargs: Any) -> VectorEnv:
    """Build ``num_envs`` copies of the env named by ``spec`` as one vector env (see module docstring).

    ``seed`` seeds the first ``reset``; env ``i`` gets a stream of its own derived from ``(seed, i)``.
    """
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise InnerCriticError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    family = check_env_id(spec)  # the id first: an unknown env is named before any argument is passed on
    if family == "maze":
        from innercritic.envs.maze import CheeseMaze

        _check_kwargs(spec, CheeseMaze.__init__, kwargs, skip=2)
        env: VectorEnv = CheeseMaze(num_envs=num_envs, seed=seed, **kwargs)
    elif family == "minigrid":
        _check_kwargs(spec, _make_minigrid, kwargs, skip=2)
        env = _make_minigrid(spec, num_envs, **kwargs)
    else:
        env = _make_atari(spec, num_envs, **kwargs)
    if seed is not None and family != "maze":
        env.reset(seed=seed)
    return env


def _make_minigrid(spec: str, num_envs: int, fully_observable: bool = False, max_steps: int | None = None) -> VectorEnv:
    from minigrid.wrappers import FullyObsWrapper, ImgObsWrapper

    def one() -> gym.Env:
        env = gym.make(spec, **({} if max_steps is None else {"max_steps": max_steps}))
        if fully_observable:
            env = FullyObsWrapper(env)
        env = ImgObsWrapper(env)
        h, w, c = env.observation_space.shape
        space = gym.spaces.Box(0, _MINIGRID_HIGH, (c, h, w), np.uint8)
        return gym.wrappers.TransformObservation(env, lambda o: np.ascontiguousarray(o.transpose(2, 0, 1)), space)

    vec = gym.vector.SyncVectorEnv([one for _ in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP)
    return DenseFinalObs(vec)


def _make_atari(spec: str, num_envs: int, **kwargs: Any) -> VectorEnv:
    from ale_py.vector_env import AtariVectorEnv

    game = _atari_game(spec)
    kwargs.setdefault("repeat_action_probability", 0.25)  # v5's sticky actions (Machado et al. 2018)
    kwargs.setdefault("num_threads", 0)
    env = AtariVectorEnv(game=game, num_envs=num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **kwargs)
    return DenseFinalObs(env)


class DenseFinalObs(VectorWrapper):
    """Presents ``info["final_obs"]`` as one dense uint8 array with its ``_final_obs`` mask.

    gymnasium's SyncVectorEnv stores final observations as an object array and ale-py's vector env
    omits the mask; one layout keeps TD bootstrapping code free of per-family branches.
    """

    def step(self, actions):  # type: ignore[override]
        obs, reward, terminated, truncated, info = self.env.step(actions)
        done = np.logical_or(terminated, truncated)
        final = info.get("final_obs")
        if final is not None and final.dtype == object:
            dense = np.zeros_like(obs)
            for i in np.flatnonzero(done):
                dense[i] = final[i]
            final = dense
        if final is None:
            final = np.zeros_like(obs)
        info["final_obs"] = final
        info["_final_obs"] = done
        return obs, reward.astype(np.float32, copy=False), terminated, truncated, info
