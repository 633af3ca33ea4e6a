"""Steering vectors: where they come from, how they are checked against a network, how they are stored.

Activation addition (Turner et al. 2023, "Steering GPT-2-XL by adding an activation vector",
arXiv:2308.10248) adds ``coefficient * vector`` to one layer's activations on every forward pass. The
sources here are the ones of the steering protocol in DESIGN.md:

- :func:`cheese_vector`: the contrast pair of Mini et al. 2023 ("Understanding and Controlling a
  Maze-Solving Policy Network", arXiv:2310.08043): the activation on a maze with its cheese minus the
  activation on the same maze without it, at the mouse's start, averaged over ``num_mazes`` mazes;
- :func:`mean_difference` / :func:`mean_difference_from_cache`: the difference of the mean
  activations of two labelled sets of states (e.g. cached states with high and with low return);
- :func:`probe_direction`: a linear probe's weight direction, mapped from the standardised space the
  probe was trained in back to raw activations;
- :func:`random_like`: a Gaussian vector of the same shape and norm, the control every scan needs.

A :class:`SteeringVector` is saved as a dict of plain tensors (the vector and its metadata as a
UTF-8 JSON string in a uint8 tensor), so :meth:`SteeringVector.load` reads it with
``torch.load(..., weights_only=True)``: a vector file handed in by a user can never run code.

Run a scan with one of them (see ``lightning_modules/steering.py``)::

    python train.py test -c configs/steer/maze.yaml --model.agent_ckpt A.ckpt
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from innercritic.agents.hooks import HookedModule
from innercritic.envs.factory import make_env

__all__ = [
    "FILE_KIND",
    "SteeringVector",
    "activation_shape",
    "cheese_vector",
    "check_vector",
    "mean_difference",
    "mean_difference_from_cache",
    "probe_direction",
    "random_like",
]

FILE_KIND = "innercritic.steering_vector"
FILE_VERSION = 1
# Mazes for vectors are drawn from their own seed range, so a vector is never built on the very mazes
# a scan then evaluates it on (scan.HELDOUT_SEED_OFFSET is another range).
VECTOR_SEED_OFFSET = 3_000_000_019


@dataclass(eq=False)
class SteeringVector:
    """A vector to add at one hook point, with where it came from."""

    tensor: Tensor  # per-sample activation shape of ``hook`` (or (C,) for a conv activation)
    hook: str  # hook-point name the vector was built for and is added at
    source: str  # what made it: "cheese", "mean_difference", "probe", "random", "file" ...
    metadata: dict[str, Any] = field(default_factory=dict)  # plain-JSON details (mazes, seeds, base vector ...)

    def __post_init__(self) -> None:
        if not isinstance(self.tensor, Tensor):
            raise ValueError(f"SteeringVector.tensor must be a torch.Tensor, got {type(self.tensor).__name__}")
        self.tensor = self.tensor.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(self.tensor).all():
            raise ValueError(f"steering vector from {self.source!r} at {self.hook!r} has non-finite entries")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError):
            raise ValueError(f"SteeringVector.metadata must hold plain JSON values, got {self.metadata!r}") from None

    @property
    def norm(self) -> float:
        """Euclidean norm of the whole vector."""
        return float(self.tensor.norm())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description for summaries and tables (no tensor)."""
        return {"source": self.source, "hook": self.hook, "shape": list(self.shape), "norm": self.norm, "metadata": self.metadata}

    def save(self, path: str | Path) -> Path:
        """Write the vector as plain tensors (readable with ``weights_only=True``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"kind": FILE_KIND, "version": FILE_VERSION, "hook": self.hook, "source": self.source, "metadata": self.metadata})
        payload = {"vector": self.tensor, "meta_json": torch.tensor(list(meta.encode("utf-8")), dtype=torch.uint8)}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)  # atomic: a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        """Read a file written by :meth:`save` (``weights_only=True``), with a one-line error otherwise."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"steering vector file {str(path)!r} does not exist")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(bytes(payload["meta_json"].tolist()).decode("utf-8"))
            vector = payload["vector"]
        except Exception as err:  # noqa: BLE001 - any failure means "not one of our files"
            raise ValueError(f"{str(path)!r} is not a steering vector file written by SteeringVector.save ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if meta.get("kind") != FILE_KIND:
            raise ValueError(f"{str(path)!r} is not a steering vector file (kind {meta.get('kind')!r}, expected {FILE_KIND!r})")
        return cls(vector, meta["hook"], meta["source"], dict(meta.get("metadata") or {}))

    def scaled_to(self, norm: float) -> "SteeringVector":
        """The same direction with Euclidean norm ``norm``."""
        current = self.norm
        if current == 0:
            raise ValueError(f"cannot rescale the zero vector from {self.source!r} at {self.hook!r}")
        return SteeringVector(self.tensor * (float(norm) / current), self.hook, self.source, {**self.metadata, "rescaled_to": float(norm)})


def activation_shape(agent: HookedModule, hook: str) -> tuple[int, ...]:
    """Per-sample shape of ``hook``'s activation; a one-line ValueError naming the valid hooks otherwise."""
    names = agent.hook_names
    if hook not in names:
        raise ValueError(f"unknown hook {hook!r}; valid hooks of this {type(agent).__name__}: {', '.join(names)}")
    obs_shape = getattr(agent, "obs_shape")
    with torch.no_grad():
        _, cache = agent.run_with_cache(torch.zeros(1, *obs_shape, dtype=torch.uint8, device=_device(agent)), names=[hook])
    return tuple(cache[hook].shape[1:])


def check_vector(agent: HookedModule, vector: Tensor, hook: str, positions: Sequence[Sequence[int]] | None = None) -> tuple[int, ...]:
    """Check that ``vector`` can be added at ``hook`` (and at ``positions``); returns the activation shape.

    Raises a one-line ValueError that names what was wrong and what would be valid.
    """
    shape = activation_shape(agent, hook)
    got = tuple(vector.shape)
    valid = [shape, (1, *shape)] + ([(shape[0],)] if len(shape) == 3 else [])
    if got not in valid:
        raise ValueError(f"vector shape {got} does not fit hook {hook!r}, whose activation has shape {shape}; valid vector shapes: {valid}")
    if positions is not None:
        if len(shape) != 3:
            raise ValueError(f"positions need a spatial (C, H, W) hook, but {hook!r} has shape {shape}; use positions=None or a conv hook")
        height, width = shape[1:]
        for p in positions:
            h, w = (int(v) for v in p)
            if not (0 <= h < height and 0 <= w < width):
                raise ValueError(f"position {(h, w)} is outside hook {hook!r}'s {height}x{width} grid; valid: 0 <= h < {height}, 0 <= w < {width}")
    return shape


@torch.no_grad()
def cheese_vector(
    agent: HookedModule,
    hook: str,
    env_kwargs: Mapping[str, Any] | None = None,
    num_mazes: int = 100,
    seed: int = 0,
) -> SteeringVector:
    """Mean over ``num_mazes`` mazes of act(maze with cheese) - act(same maze, cheese removed), at the start.

    Mazes come from ``CheeseMaze(**env_kwargs)`` seeded from ``VECTOR_SEED_OFFSET + seed``, a range no
    scan plays. Following Mini et al. (2023), both observations show the mouse on its start square;
    adding the vector with a positive coefficient should make the agent act more as if there were a
    cheese (where there was one when the vector was built), a negative one as if there were none.
    """
    activation_shape(agent, hook)
    if isinstance(num_mazes, bool) or not isinstance(num_mazes, (int, np.integer)) or num_mazes < 1:
        raise ValueError(f"num_mazes must be an integer >= 1, got {num_mazes!r}")
    kwargs = dict(env_kwargs or {})
    base = VECTOR_SEED_OFFSET + int(seed)
    env = make_env("maze", int(num_mazes), seed=base, **kwargs)
    with_cheese, _ = env.reset(seed=base)
    mouse = env.mouse_pos
    for i in range(env.num_envs):
        env.set_cheese(i, None)
    without = np.concatenate([env.observe(i, mouse[i][None]) for i in range(env.num_envs)])
    level_seeds = env.level_seeds.tolist()
    env.close()
    device = _device(agent)
    _, a = agent.run_with_cache(torch.from_numpy(with_cheese).to(device), names=[hook])
    _, b = agent.run_with_cache(torch.from_numpy(without).to(device), names=[hook])
    vector = (a[hook].double() - b[hook].double()).mean(0).float()
    meta = {"num_mazes": int(num_mazes), "seed": int(seed), "env_kwargs": _plain(kwargs), "level_seeds": level_seeds}
    return SteeringVector(vector, hook, "cheese", meta)


def mean_difference(acts_a: Tensor | np.ndarray, acts_b: Tensor | np.ndarray, hook: str, metadata: Mapping[str, Any] | None = None) -> SteeringVector:
    """mean(acts_a) - mean(acts_b) over the leading (state) axis, accumulated in float64."""
    a, b = _as_tensor(acts_a), _as_tensor(acts_b)
    if a.dim() < 2 or b.dim() < 2 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"acts_a and acts_b must be (N, *shape) with the same per-state shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"mean_difference needs at least one state in each set, got {len(a)} and {len(b)}")
    vector = (a.double().mean(0) - b.double().mean(0)).float()
    meta = {"n_a": int(len(a)), "n_b": int(len(b)), **dict(metadata or {})}
    return SteeringVector(vector, hook, "mean_difference", meta)


def mean_difference_from_cache(cache: Any, hook: str, rows_a: np.ndarray, rows_b: np.ndarray, shape: Sequence[int] | None = None,
                               metadata: Mapping[str, Any] | None = None) -> SteeringVector:
    """:func:`mean_difference` of the cached activations (field ``act.<hook>``) of two sets of cache rows.

    ``cache`` is an ``innercritic.cache.TrajectoryCache``; ``shape`` reshapes flattened activations
    back to the hook's shape (default: the shape the cache's manifest records).
    """
    field_name = f"act.{hook}"
    if field_name not in cache.fields:
        raise ValueError(f"the cache holds no activations of hook {hook!r}; cached hooks: {', '.join(cache.hook_points)}")
    shape = tuple(shape) if shape is not None else tuple(cache.hook_shapes.get(hook, ()))
    acts_a = cache.gather(field_name, np.asarray(rows_a, dtype=np.int64)).astype(np.float64)
    acts_b = cache.gather(field_name, np.asarray(rows_b, dtype=np.int64)).astype(np.float64)
    vector = mean_difference(acts_a, acts_b, hook, {"cache": str(getattr(cache, "path", "")), **dict(metadata or {})})
    if shape and tuple(vector.shape) != shape:
        vector = SteeringVector(vector.tensor.reshape(shape), hook, vector.source, vector.metadata)
    return vector


def probe_direction(w_standardised: Tensor | np.ndarray, std: Tensor | np.ndarray, hook: str, shape: Sequence[int] | None = None,
                    eps: float = 1e-8, metadata: Mapping[str, Any] | None = None) -> SteeringVector:
    """A probe's direction in raw activation space, unit norm.

    A probe v = w . x' + b on standardised activations x' = (x - mean) / std reads v = (w / std) . x + const
    in raw space, so the direction along which raw activations move the probe's output fastest is
    w / std (elementwise), normalised here to unit length (the scan's coefficients set the size).
    ``eps`` guards constant features, whose std the standardiser may have clamped.
    """
    w = _as_tensor(w_standardised).double().reshape(-1)
    s = _as_tensor(std).double().reshape(-1)
    if w.shape != s.shape:
        raise ValueError(f"probe weight has {w.numel()} entries but std has {s.numel()}; they must both be the flattened activation of {hook!r}")
    raw = w / s.clamp_min(eps)
    n = float(raw.norm())
    if n == 0 or not math.isfinite(n):
        raise ValueError(f"the probe direction at {hook!r} is zero or not finite (norm {n}); is the probe trained?")
    raw = raw / n
    if shape is not None:
        if math.prod(shape) != raw.numel():
            raise ValueError(f"shape {tuple(shape)} has {math.prod(shape)} entries; the probe has {raw.numel()}")
        raw = raw.reshape(tuple(int(d) for d in shape))
    return SteeringVector(raw.float(), hook, "probe", dict(metadata or {}))


def random_like(vector: SteeringVector, seed: int = 0) -> SteeringVector:
    """A Gaussian random vector with the same shape, hook and norm as ``vector`` (the control)."""
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
    noise = noise * (vector.norm / float(noise.norm()))
    meta = {"seed": int(seed), "matched_to": vector.source, "matched_norm": vector.norm}
    return SteeringVector(noise.float(), vector.hook, "random", meta)


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    return x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _device(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _plain(value: Any) -> Any:
    # numpy scalars become numbers; anything else JSON cannot hold is recorded by its text.
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
