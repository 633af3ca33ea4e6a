"""Steering vectors: where they come from, how they are checked against a network, how they are stored.

Activation addition (Turner et al. 2023, "Steering GPT-2-XL by adding an activation vector",
arXiv:2308.10248) adds ``coefficient * vector`` to one layer's activations on every forward pass. The
sources here are the ones of the steering protocol in DESIGN.md:

- :class:`LevelVectors`: the contrast pairs of Mini et al. 2023 ("Understanding and Controlling a
  Maze-Solving Policy Network", arXiv:2310.08043), built in the maze being played: the activation on
  the maze with its cheese minus the activation on the same maze without it (the cheese vector), or
  on the maze against the same maze with its top-right corner walled off (the top-right vector), at
  the mouse's start; with a per-level random control of matched norm;
- :func:`averaged_vector`: the same contrast averaged over ``num_mazes`` other mazes, one vector for
  every maze (a weaker variant: the vectors transfer poorly between mazes);
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
from innercritic.errors import InnerCriticError, MissingFileError

__all__ = [
    "FILE_KIND",
    "SteeringVector",
    "activation_shape",
    "CONTRASTS",
    "LevelVectors",
    "averaged_vector",
    "check_steering",
    "check_vector",
    "contrast_observations",
    "target_square",
    "mean_difference",
    "mean_difference_from_cache",
    "probe_direction",
    "random_like",
]

FILE_KIND = "innercritic.steering_vector"
CONTRASTS = ("cheese", "top_right", "retarget")  # the contrast pairs a per-level vector can be built from
_TARGET_SALT = 0x7A7A_0003
_WALLS, _CHEESE = 0, 2  # CheeseMaze observation channels (walls, mouse, cheese)
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
            raise InnerCriticError(f"SteeringVector.tensor must be a torch.Tensor, got {type(self.tensor).__name__}")
        self.tensor = self.tensor.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(self.tensor).all():
            raise InnerCriticError(f"steering vector from {self.source!r} at {self.hook!r} has non-finite entries")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError):
            raise InnerCriticError(f"SteeringVector.metadata must hold plain JSON values, got {self.metadata!r}") from None

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
            raise MissingFileError(f"steering vector file {str(path)!r} does not exist")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(bytes(payload["meta_json"].tolist()).decode("utf-8"))
            vector = payload["vector"]
        except Exception as err:  # noqa: BLE001 - any failure means "not one of our files"
            raise InnerCriticError(f"{str(path)!r} is not a steering vector file written by SteeringVector.save ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if meta.get("kind") != FILE_KIND:
            raise InnerCriticError(f"{str(path)!r} is not a steering vector file (kind {meta.get('kind')!r}, expected {FILE_KIND!r})")
        return cls(vector, meta["hook"], meta["source"], dict(meta.get("metadata") or {}))

    def scaled_to(self, norm: float) -> "SteeringVector":
        """The same direction with Euclidean norm ``norm``."""
        current = self.norm
        if current == 0:
            raise InnerCriticError(f"cannot rescale the zero vector from {self.source!r} at {self.hook!r}")
        return SteeringVector(self.tensor * (float(norm) / current), self.hook, self.source, {**self.metadata, "rescaled_to": float(norm)})


def activation_shape(agent: HookedModule, hook: str) -> tuple[int, ...]:
    """Per-sample shape of ``hook``'s activation; a one-line ValueError naming the valid hooks otherwise."""
    names = agent.hook_names
    if hook not in names:
        raise InnerCriticError(f"unknown hook {hook!r}; valid hooks of this {type(agent).__name__}: {', '.join(names)}")
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
        raise InnerCriticError(f"vector shape {got} does not fit hook {hook!r}, whose activation has shape {shape}; valid vector shapes: {valid}")
    if positions is not None:
        if len(shape) != 3:
            raise InnerCriticError(f"positions need a spatial (C, H, W) hook, but {hook!r} has shape {shape}; use positions=None or a conv hook")
        height, width = shape[1:]
        for p in positions:
            h, w = (int(v) for v in p)
            if not (0 <= h < height and 0 <= w < width):
                raise InnerCriticError(f"position {(h, w)} is outside hook {hook!r}'s {height}x{width} grid; valid: 0 <= h < {height}, 0 <= w < {width}")
    return shape


def contrast_observations(env: Any, rows: Sequence[int], contrast: str) -> tuple[np.ndarray, np.ndarray]:
    """The two observations of a contrast pair for each maze in ``rows`` of a ``CheeseMaze``, as it stands now.

    - ``cheese``: the maze as observed against the same maze with its cheese removed (Mini et al. 2023's
      cheese vector);
    - ``top_right``: the maze as observed against the same maze with its top-right corner square walled
      off (their top-right vector: the corner's path present against absent; in a perfect maze walling
      the corner square turns the path into a dead end and changes no other square);
    - ``retarget``: the maze with its cheese moved to the level's target square (:func:`target_square`)
      against the maze as observed. Added, it moves the cheese's representation at the hook from where
      the cheese is to the target (exactly so at the input; Mini et al. retarget by moving one
      channel's activation, this moves every channel's response to the cheese).

    Only the observation is edited, never the env, so a contrast can be built in the maze being played.
    Returns two uint8 arrays (len(rows), 3, S, S): (first, second).
    """
    if contrast not in CONTRASTS:
        raise InnerCriticError(f"unknown contrast {contrast!r}; valid: {', '.join(CONTRASTS)}")
    if not all(hasattr(env, name) for name in ("walls", "cheese_pos", "mouse_pos", "observe")):
        raise InnerCriticError(f"the {contrast!r} contrast needs a cheese maze (env 'maze'); got {type(env).__name__}, which has no cheese or corner to edit")
    rows = [int(i) for i in rows]
    mouse = env.mouse_pos
    first = np.concatenate([env.observe(i, mouse[i][None]) for i in rows]) if rows else np.zeros((0, *env.single_observation_space.shape), np.uint8)
    second = first.copy()
    size = env.obs_size
    for k, i in enumerate(rows):
        if contrast == "cheese":
            second[k, _CHEESE] = 0
        elif contrast == "retarget":
            o = (size - env.maze_size(i)) // 2
            r, c = target_square(env, i)
            first[k, _CHEESE] = 0
            first[k, _CHEESE, r + o, c + o] = 1
        else:
            n = env.maze_size(i)
            o = (size - n) // 2
            second[k, _WALLS, o, o + n - 1] = 1
            second[k, _CHEESE, o, o + n - 1] = 0  # a wall holds no cheese
    return first, second


def target_square(env: Any, i: int) -> tuple[int, int]:
    """The retargeting square of env ``i``'s current level: a free square, neither the start, the cheese
    nor the top-right corner, drawn from the level seed (the same square in every scan of that level)."""
    walls = env.walls(i)
    n = walls.shape[0]
    banned = {(n - 1, 0), (0, n - 1), tuple(int(v) for v in env.cheese_pos[i])}
    squares = [(int(r), int(c)) for r, c in np.argwhere(~walls) if (int(r), int(c)) not in banned]
    rng = np.random.default_rng([int(env.level_seeds[i]) % 2**63, _TARGET_SALT])
    return squares[int(rng.integers(len(squares)))]


@dataclass(eq=False)
class LevelVectors:
    """A steering vector per level, built in the maze being played (Mini et al. 2023's construction).

    For every level of a scan, :meth:`build` takes the maze's first observation and its contrast
    (:func:`contrast_observations`) and returns act(first) - act(second) at ``hook``: the vector of that
    maze, which Mini et al. found transfers poorly to other mazes (an average over mazes is
    :func:`averaged_vector`, a separate, weaker variant). With ``control_seed`` set, each level gets
    instead a Gaussian vector of the same norm as its own contrast vector: the matched random control.
    """

    hook: str  # hook point the vectors are built at and added to
    contrast: str  # "cheese", "top_right" or "retarget" (CONTRASTS)
    control_seed: int | None = None  # None: the contrast vectors; an int: per-level random vectors of matched norm

    def __post_init__(self) -> None:
        if self.contrast not in CONTRASTS:
            raise InnerCriticError(f"unknown contrast {self.contrast!r}; valid: {', '.join(CONTRASTS)}")

    @property
    def source(self) -> str:
        return self.contrast if self.control_seed is None else "random"

    def control(self, seed: int = 0) -> "LevelVectors":
        """The matched random control of these vectors."""
        return LevelVectors(self.hook, self.contrast, int(seed))

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description for summaries and tables."""
        meta = {"per_level": True, "contrast": self.contrast}
        if self.control_seed is not None:
            meta.update(seed=int(self.control_seed), matched_to=self.contrast)
        return {"source": self.source, "hook": self.hook, "metadata": meta}

    @torch.no_grad()
    def build(self, agent: HookedModule, env: Any, rows: Sequence[int]) -> Tensor:
        """float32 (len(rows), *activation shape): the vector of each maze in ``rows`` as it stands now."""
        first, second = contrast_observations(env, rows, self.contrast)
        device = _device(agent)
        _, a = agent.run_with_cache(torch.from_numpy(first).to(device), names=[self.hook])
        _, b = agent.run_with_cache(torch.from_numpy(second).to(device), names=[self.hook])
        vectors = (a[self.hook].double() - b[self.hook].double()).cpu()
        if self.control_seed is not None:
            seeds = env.level_seeds
            for k, i in enumerate(int(r) for r in rows):
                # Seeded by the level, not the batch slot: a level's control is the same in any scan.
                generator = torch.Generator().manual_seed((int(self.control_seed) * 1_000_003 + int(seeds[i])) % 2**63)
                noise = torch.randn(vectors.shape[1:], generator=generator, dtype=torch.float64)
                vectors[k] = noise * (float(vectors[k].norm()) / float(noise.norm()))
        return vectors.float()


def check_steering(agent: HookedModule, vector: "SteeringVector | LevelVectors", positions: Sequence[Sequence[int]] | None = None) -> tuple[int, ...]:
    """:func:`check_vector` for either kind of vector; a per-level vector has its hook's shape by
    construction, so only its hook and ``positions`` are checked. Returns the activation shape."""
    tensor = torch.zeros(activation_shape(agent, vector.hook)) if isinstance(vector, LevelVectors) else vector.tensor
    return check_vector(agent, tensor, vector.hook, positions)


def averaged_vector(
    agent: HookedModule,
    hook: str,
    contrast: str = "cheese",
    env_kwargs: Mapping[str, Any] | None = None,
    num_mazes: int = 100,
    seed: int = 0,
) -> SteeringVector:
    """Mean over ``num_mazes`` mazes of their :class:`LevelVectors` at the start: one vector for every maze.

    Mazes come from ``CheeseMaze(**env_kwargs)`` seeded from ``VECTOR_SEED_OFFSET + seed``, a range no
    scan plays. The source is named ``<contrast>_averaged``; averaging washes out where in the maze the
    contrast was (the cheese's square differs from maze to maze), which is why the per-level vector is
    the default.
    """
    activation_shape(agent, hook)
    if isinstance(num_mazes, bool) or not isinstance(num_mazes, (int, np.integer)) or num_mazes < 1:
        raise InnerCriticError(f"num_mazes must be an integer >= 1, got {num_mazes!r}")
    kwargs = dict(env_kwargs or {})
    base = VECTOR_SEED_OFFSET + int(seed)
    env = make_env("maze", int(num_mazes), seed=base, **kwargs)
    try:
        env.reset(seed=base)
        per_level = LevelVectors(hook, contrast).build(agent, env, range(env.num_envs)).double()
        level_seeds = env.level_seeds.tolist()
    finally:
        env.close()
    meta = {"num_mazes": int(num_mazes), "seed": int(seed), "contrast": contrast, "env_kwargs": _plain(kwargs), "level_seeds": level_seeds}
    return SteeringVector(per_level.mean(0).float(), hook, f"{contrast}_averaged", meta)


def mean_difference(acts_a: Tensor | np.ndarray, acts_b: Tensor | np.ndarray, hook: str, metadata: Mapping[str, Any] | None = None) -> SteeringVector:
    """mean(acts_a) - mean(acts_b) over the leading (state) axis, accumulated in float64."""
    a, b = _as_tensor(acts_a), _as_tensor(acts_b)
    if a.dim() < 2 or b.dim() < 2 or a.shape[1:] != b.shape[1:]:
        raise InnerCriticError(f"acts_a and acts_b must be (N, *shape) with the same per-state shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) == 0 or len(b) == 0:
        raise InnerCriticError(f"mean_difference needs at least one state in each set, got {len(a)} and {len(b)}")
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
        raise InnerCriticError(f"the cache holds no activations of hook {hook!r}; cached hooks: {', '.join(cache.hook_points)}")
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
        raise InnerCriticError(f"probe weight has {w.numel()} entries but std has {s.numel()}; they must both be the flattened activation of {hook!r}")
    raw = w / s.clamp_min(eps)
    n = float(raw.norm())
    if n == 0 or not math.isfinite(n):
        raise InnerCriticError(f"the probe direction at {hook!r} is zero or not finite (norm {n}); is the probe trained?")
    raw = raw / n
    if shape is not None:
        if math.prod(shape) != raw.numel():
            raise InnerCriticError(f"shape {tuple(shape)} has {math.prod(shape)} entries; the probe has {raw.numel()}")
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
