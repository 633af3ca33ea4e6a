"""A steering scan as a LightningModule: build a vector, scan its coefficient, log and summarise.

Method: activation addition (Turner et al. 2023, "Steering GPT-2-XL by adding an activation
vector") on a PPO maze agent, with the cheese vector of Mini et al. 2023 ("Understanding and
Controlling a Maze-Solving Policy Network") as the default source and a random vector of matched
norm as the control. The work itself is ``innercritic.steering`` (framework-free); this module only
gives it the standard run folder: ``config.yaml``, ``metrics.csv`` and the offline W&B run (the
``steer/...`` scalars per coefficient), the vectors as files, and ``summary.json`` whose ``scan`` is
the list of rows (source, hook, coefficient, every metric with ``_lo`` / ``_hi`` bounds).

Run (``test``: nothing is trained; the test loop hands each rank its chunk of the coefficients as a
single step, which plays every coefficient of the chunk for the vector and its control in one lockstep
run, each run's episodes exactly those it would play alone (``innercritic.steering.run_scans``); under
DDP the ranks split the coefficients and gather the rows)::

    python train.py test -c configs/steer/maze.yaml --model.agent_ckpt runs/ppo_maze/version_0/checkpoints/last.ckpt

Vector sources (``vector_source``):

- ``cheese`` (the default): the contrast pair as Mini et al. build it, in the maze being played: for
  every level, that maze with its cheese minus the same maze without, at the start; the random control
  is a Gaussian vector per level of that level's norm;
- ``top_right``: the same per level, the maze minus the same maze with its top-right corner walled off;
- ``retarget``: per level, the maze with its cheese moved to a target square minus the maze as it is:
  added at coefficient 1 it moves the cheese's representation to the target; rows gain ``p_target``
  (the mouse reached its level's target square);
- ``cheese_averaged`` / ``top_right_averaged``: the contrast averaged over ``num_mazes`` other mazes of
  the scan's env distribution, one vector for every maze (the weaker variant);
- ``file``: a vector saved by ``SteeringVector.save`` (every scan saves its own as ``steering_vector.pt``);
- ``probe``: a probe's direction, from a weights-only file holding ``weight`` (flattened activation,
  standardised space; or (heads, D), head ``probe_head``) and ``std``; unit norm unless ``vector_norm``;
- ``mean_difference``: mean activation of the cached states whose ``label_field`` is at least
  ``label_split`` (default: its median) minus that of the others, from the cache in ``cache_dir``;
- ``random``: a Gaussian vector of norm ``vector_norm`` (a control on its own).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from innercritic.agents.checkpoint import check_env_compatible, load_agent, read_checkpoint
from innercritic.agents.networks import ActorCritic
from innercritic.envs.factory import env_family, make_env
from innercritic.steering import (
    MEAN_METRICS,
    PROPORTION_METRICS,
    CONTRASTS,
    LevelVectors,
    SteeringVector,
    activation_shape,
    averaged_vector,
    check_coefficients,
    check_steering,
    mean_difference_from_cache,
    probe_direction,
    random_like,
    run_scans,
)
from innercritic.errors import InnerCriticError

# Per-level contrasts (built in each maze played), their averages over other mazes, and fixed vectors.
# (An average of retargeting vectors would mix every maze's own target square: it has no meaning.)
VECTOR_SOURCES = (*CONTRASTS, "cheese_averaged", "top_right_averaged", "file", "probe", "mean_difference", "random")
DEFAULT_COEFFICIENTS = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0)


class SteeringScan(L.LightningModule):
    """Scan ``coefficients`` of a steering vector (and a matched random control) on held-out episodes.

    Args:
        agent_ckpt: PPO checkpoint of the agent to steer (written by ``train.py fit``).
        hook: hook point the vector is built at and added to (``model.hook_names`` lists them).
        vector_source: where the vector comes from: cheese, top_right, retarget (per level), cheese_averaged, top_right_averaged, file, probe, mean_difference or random.
        vector_path: the file for ``file`` (a SteeringVector) and ``probe`` (weight and std tensors).
        coefficients: coefficients to scan; 0 is the unsteered agent.
        episodes: episodes per coefficient (each env's first episode, held-out levels).
        seed: seed of the scan's levels and action sampling, the same at every coefficient.
        num_envs: envs stepped together (None: all episodes at once).
        positions: (h, w) squares of a conv hook to add the vector at (None: everywhere).
        env_overrides: env kwargs over the checkpoint's (held-out: num_levels is 0 unless set here).
        num_mazes: mazes an averaged vector is averaged over.
        vector_seed: seed of the mazes an averaged vector is built on (a range no scan plays).
        vector_norm: rescale the vector to this norm before scanning (None: keep its own; required for random; not for per-level vectors).
        random_control: also scan a random vector of the same norm (the control) at the same coefficients.
        control_seed: seed of the random control vector.
        probe_head: head of a multi-head probe whose direction is used (0: the policy's head).
        cache_dir: trajectory cache for ``mean_difference``.
        label_field: per-row cache field that labels states for ``mean_difference`` (e.g. return, value).
        label_split: states with label_field >= this form the first set (None: the median).
    """

    def __init__(
        self,
        agent_ckpt: str,
        hook: str = "encoder.block1.hook_out",
        vector_source: str = "cheese",
        vector_path: str | None = None,
        coefficients: list[float] = list(DEFAULT_COEFFICIENTS),
        episodes: int = 100,
        seed: int = 0,
        num_envs: int | None = None,
        positions: list[tuple[int, int]] | None = None,
        env_overrides: dict[str, Any] | None = None,
        num_mazes: int = 100,
        vector_seed: int = 0,
        vector_norm: float | None = None,
        random_control: bool = True,
        control_seed: int = 0,
        probe_head: int = 0,
        cache_dir: str | None = None,
        label_field: str = "return",
        label_split: float | None = None,
    ) -> None:
        super().__init__()
        # Every check that needs no agent happens here, before the trainer or the loggers exist.
        self.coefficients = check_coefficients(coefficients)
        if vector_source not in VECTOR_SOURCES:
            raise InnerCriticError(f"unknown vector_source {vector_source!r}; valid: {', '.join(VECTOR_SOURCES)}")
        if vector_source in ("file", "probe") and not vector_path:
            raise InnerCriticError(f"vector_source {vector_source!r} needs model.vector_path (the file to read the vector from)")
        if vector_source == "mean_difference" and not cache_dir:
            raise InnerCriticError("vector_source 'mean_difference' needs model.cache_dir (a trajectory cache with activations of the hook)")
        if vector_source == "random" and vector_norm is None:
            raise InnerCriticError("vector_source 'random' needs model.vector_norm (the norm of the random vector)")
        if vector_norm is not None and vector_source in CONTRASTS:
            raise InnerCriticError(f"model.vector_norm rescales one fixed vector; vector_source {vector_source!r} builds one per level with its own norm: "
                             f"drop vector_norm, or use {vector_source}_averaged")
        if vector_norm is not None and not (math.isfinite(vector_norm) and vector_norm > 0):
            raise InnerCriticError(f"model.vector_norm must be a positive number or null, got {vector_norm!r}")
        for name, value in (("episodes", episodes), ("num_mazes", num_mazes)) + ((("num_envs", num_envs),) if num_envs is not None else ()):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InnerCriticError(f"model.{name} must be an integer >= 1, got {value!r}")
        self.save_hyperparameters()
        self.agent: ActorCritic | None = None
        self.env_spec: str | None = None
        self.env_kwargs: dict[str, Any] = {}
        self.vectors: list[SteeringVector | LevelVectors] = []
        self.rows: dict[int, list[dict[str, Any]]] = {}
        self._results: list[tuple[int, int, dict[str, Any]]] = []
        self.figures: list[str] = []
        self._start = 0.0

    # ------------------------------------------------------------------ the agent, its env and the vectors
    def setup(self, stage: str) -> None:
        if self.agent is not None:
            return
        hp = self.hparams
        agent, env_info = load_agent(hp.agent_ckpt)
        for p in agent.parameters():
            p.requires_grad_(False)
        self.agent = agent
        self.env_spec = env_info["spec"]
        overrides = dict(hp.env_overrides or {})
        kwargs = {**dict(env_info.get("kwargs") or {}), **overrides}
        if kwargs.get("num_levels") and "num_levels" not in overrides:
            kwargs["num_levels"] = 0  # held-out: fresh levels, not the finite training set
        self.env_kwargs = kwargs
        probe = make_env(self.env_spec, 1, seed=0, **kwargs)
        current = {"spec": self.env_spec, "obs_shape": list(probe.single_observation_space.shape), "num_actions": int(probe.single_action_space.n)}
        probe.close()
        check_env_compatible({**env_info, "obs_shape": list(agent.obs_shape), "num_actions": agent.num_actions}, current, "the agent")
        activation_shape(agent, hp.hook)  # an unknown hook fails here, naming the valid ones
        vector = self._build_vector()
        if hp.vector_norm is not None:  # never set for a per-level source (refused in __init__)
            vector = vector.scaled_to(hp.vector_norm)
        check_steering(agent, vector, hp.positions)
        self.vectors = [vector]
        if hp.random_control:
            self.vectors.append(vector.control(hp.control_seed) if isinstance(vector, LevelVectors) else random_like(vector, hp.control_seed))

    def _build_vector(self) -> SteeringVector | LevelVectors:
        hp = self.hparams
        source = hp.vector_source
        contrast = source.removesuffix("_averaged")
        if contrast in CONTRASTS:
            if env_family(self.env_spec) != "maze":
                raise InnerCriticError(f"vector_source {source!r} needs a maze agent (a maze with cheese and a top-right corner); this one plays "
                                 f"{self.env_spec!r}: use file, probe, mean_difference or random")
            if source == contrast:
                return LevelVectors(hp.hook, contrast)
            return averaged_vector(self.agent, hp.hook, contrast, self.env_kwargs, hp.num_mazes, hp.vector_seed)
        if source == "file":
            vector = SteeringVector.load(hp.vector_path)
            if vector.hook != hp.hook:
                raise InnerCriticError(f"the vector in {hp.vector_path!r} was built at hook {vector.hook!r}, but model.hook is {hp.hook!r}; set model.hook to {vector.hook!r}")
            return vector
        if source == "probe":
            return _probe_vector(hp.vector_path, hp.hook, hp.probe_head, activation_shape(self.agent, hp.hook))
        if source == "mean_difference":
            return _cache_vector(hp.cache_dir, hp.hook, hp.label_field, hp.label_split)
        shape = activation_shape(self.agent, hp.hook)
        base = SteeringVector(torch.ones(shape), hp.hook, "none")
        # Offset from the control's seed range, so that a random "vector" and its random control differ.
        return random_like(base, 1_000_003 + hp.vector_seed)

    # ------------------------------------------------------------------ the scan: one chunk of coefficients per rank
    def test_dataloader(self) -> DataLoader:
        # One chunk per rank (the sampler deals the chunks out), so that every rank plays its
        # coefficients, for every vector, in one lockstep run: one test step per rank.
        world = max(1, int(self.trainer.world_size))
        chunks = [chunk.tolist() for chunk in np.array_split(np.arange(len(self.coefficients)), world) if len(chunk)]
        return DataLoader(chunks, batch_size=None)

    def on_test_start(self) -> None:
        self._start = time.perf_counter()
        self._results: list[tuple[int, int, dict[str, Any]]] = []
        self.rows = {}
        # trainer.log_dir broadcasts from rank 0, a collective: every rank must ask, not rank 0 alone.
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            # Per-level vectors exist only while their level is played: there is no one file to save.
            names = ["steering_vector.pt"] + [f"control_vector_{v.source}.pt" for v in self.vectors[1:]]
            for name, vector in zip(names, self.vectors):
                if isinstance(vector, SteeringVector):
                    vector.save(out / name)

    def test_step(self, tokens: list[int], batch_idx: int) -> None:
        hp = self.hparams
        tokens = [int(t) for t in (tokens if isinstance(tokens, (list, tuple)) else [tokens])]
        coefficients = [self.coefficients[t] for t in tokens]
        bar = "steering" if self.trainer.progress_bar_callback is not None and self.trainer.is_global_zero else None
        # Not offset by rank: every coefficient must play the same levels with the same dice.
        rows = run_scans(self.agent, self.env_spec, self.env_kwargs, self.vectors, coefficients, hp.episodes, hp.seed, hp.positions,
                         hp.num_envs, progress=bar)
        for i, (token, c) in enumerate(zip(tokens, coefficients)):
            for v, vector in enumerate(self.vectors):
                # At 0 no vector is added: every source's row is the one unsteered block's, under its own name.
                row = {**rows[0][i], "source": vector.source} if c == 0 else rows[v][i]
                self._results.append((v, token, row))

    def on_test_epoch_end(self) -> None:
        results = self._results
        world = self.trainer.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP the sampler deals coefficients out to ranks; every rank gets every row back.
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, results)
            results = [r for part in parts for r in part]
        unique = {(v, t): row for v, t, row in results}  # the sampler pads ranks with repeated tokens
        tokens = sorted({t for _, t in unique})
        self.rows = {v: [unique[(v, t)] for t in tokens if (v, t) in unique] for v in range(len(self.vectors))}
        for t in tokens:
            metrics: dict[str, float] = {"steer/coefficient": self.coefficients[t]}
            for v, vector in enumerate(self.vectors):
                prefix = "steer" if v == 0 else f"steer/{vector.source}"
                row = unique.get((v, t), {})
                for name in PROPORTION_METRICS + MEAN_METRICS:
                    value = row.get(name)
                    if isinstance(value, float) and math.isfinite(value):
                        metrics[f"{prefix}/{name}"] = value
            # Straight to the loggers, one step per coefficient: self.log would average over the test epoch.
            for logger in self.loggers:
                logger.log_metrics(metrics, step=t)

    @property
    def scan_rows(self) -> list[dict[str, Any]]:
        """All rows, vector by vector (the main vector first), coefficients in scan order."""
        return [row for v in sorted(self.rows) for row in self.rows[v]]

    def summary(self) -> dict[str, Any]:
        """The scan's figures, for ``summary.json``."""
        return {
            "scan": self.scan_rows,
            "vectors": [v.describe() for v in self.vectors],
            "hook": self.hparams.hook,
            "env": {"spec": self.env_spec, "kwargs": self.env_kwargs},
            "coefficients": self.coefficients,
            "episodes": self.hparams.episodes,
            "wall_s": time.perf_counter() - self._start if self._start else None,
            "figures": list(self.figures),
        }


def _probe_vector(path: str, hook: str, head: int, shape: tuple[int, ...]) -> SteeringVector:
    """The raw-space unit direction of a probe stored as plain tensors ``weight`` and ``std``."""
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or "weight" not in payload or "std" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise InnerCriticError(f"probe file {path!r} must hold tensors 'weight' (standardised space) and 'std'; it holds {keys}")
    stored_hook = payload.get("hook")
    if isinstance(stored_hook, str) and stored_hook != hook:
        raise InnerCriticError(f"the probe in {path!r} reads hook {stored_hook!r}, but model.hook is {hook!r}; set model.hook to {stored_hook!r}")
    weight = torch.as_tensor(payload["weight"])
    if weight.dim() == 2:
        if not 0 <= head < weight.shape[0]:
            raise InnerCriticError(f"probe_head {head} does not exist: the probe in {path!r} has {weight.shape[0]} heads (0..{weight.shape[0] - 1})")
        weight = weight[head]
    return probe_direction(weight, payload["std"], hook, shape=shape, metadata={"path": str(path), "head": int(head)})


def _cache_vector(cache_dir: str, hook: str, label_field: str, label_split: float | None) -> SteeringVector:
    """Mean activation of cached states with label >= split minus that of the others."""
    from innercritic.cache import TrajectoryCache

    cache = TrajectoryCache(cache_dir)
    if label_field not in cache.fields or cache.fields[label_field]["per"] != "row":
        per_row = sorted(k for k, f in cache.fields.items() if f["per"] == "row" and not k.startswith("act.") and k != "obs")
        raise InnerCriticError(f"label_field {label_field!r} is not a per-row field of the cache at {cache_dir!r}; valid: {', '.join(per_row)}")
    labels = cache.column(label_field).astype(np.float64)
    # The final row of each episode has no action: it is a state no policy acted in.
    keep = ~cache.column("last").astype(bool) if "last" in cache.fields else np.ones(len(labels), bool)
    split = float(np.median(labels[keep])) if label_split is None else float(label_split)
    rows = np.flatnonzero(keep)
    high, low = rows[labels[rows] >= split], rows[labels[rows] < split]
    if len(high) == 0 or len(low) == 0:
        raise InnerCriticError(f"label_split {split} puts all {len(rows)} states on one side of {label_field!r}; pick a value inside its range")
    return mean_difference_from_cache(cache, hook, high, low, metadata={"label_field": label_field, "label_split": split})
