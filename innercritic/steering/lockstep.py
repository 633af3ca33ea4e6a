"""Forward passes for a scan's runs played in lockstep, every run's outputs bit for bit its own.

A steering scan plays the same held-out episodes once per (vector, coefficient). Played one run at a
time, every step of every run makes two whole-network calls (steered, and unsteered for the KL and
the value change) over that run's pending envs. Played in lockstep (``run_episodes(blocks=K)``), the
runs share their work, but only where sharing cannot change a bit of any run's results:

- the network is cut where its arithmetic changes kind (``ActorCritic.trunk`` / ``head``). The trunk
  (convolutions and row-wise ops) gives a row the same bits whatever else is in its batch, for batches
  of 2 or more (a batch of one takes another convolution kernel, so a run's lone pending env has its
  trunk computed alone, as its own run computed it). So the trunk is computed once per distinct input
  over all runs and steps (a mouse revisits the few dozen squares of its maze: the 17 runs of a
  200-episode scan make about a million row-forwards of some tens of thousands of distinct rows).
  The heads (dense layers: matrix products, whose rounding MKL picks by the number of rows) run per
  run on that run's own rows in its own order, as its own run did;
- a steered run's unsteered reference and its steered pass share the trunk towers the vector does not
  reach (the critic tower, for a vector in the policy tower);
- the first call checks, on the scan's own observations, that the trunk's rows do not depend on the
  batch; where they do (as they may on another CPU, another library build or a GPU), every run falls
  back to whole-network calls of its own, with a warning: what ``batched=False`` gives, the
  computation of a run played alone and the reference the tests compare the batched scan to.

Interventions that are not a :class:`Steer` (a mapping of hook name to intervention, installed as is)
may depend on the batch (a ``Patch`` with one source row per sample), so their runs always take
whole-network calls.
"""

from __future__ import annotations

import warnings
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from innercritic.agents.hooks import AddVector, HookedModule, Intervention
from innercritic.steering.vectors import LevelVectors, SteeringVector, activation_shape, check_steering

__all__ = ["CACHE_BYTES", "LockstepForward", "Steer"]

CHUNK_ROWS = 256  # rows per batched trunk call: larger batches cost more per row on the CPUs measured
CACHE_BYTES = 1 << 30  # trunk rows a cache holds before it is emptied (emptying costs recomputation, never bits)

# (logits_s, value_s, logits_u, value_u) for one run's rows; the unsteered pair is None when not asked for.
Outputs = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


class Steer:
    """What a scan adds at one hook: ``coefficient * vector``, the vector fixed or one per level.

    A :class:`SteeringVector` is added as it is in every maze; a :class:`LevelVectors` is built anew
    for each level after its reset (:meth:`start`), so every env of a batch gets its own maze's vector
    and :meth:`interventions` hands each forward pass the rows of the envs it runs on.
    """

    def __init__(self, vector: SteeringVector | LevelVectors, coefficient: float, positions: Sequence[Sequence[int]] | None = None) -> None:
        self.vector = vector
        self.coefficient = float(coefficient)
        self.positions = None if positions is None else [tuple(int(v) for v in p) for p in positions]
        self._fixed: Tensor | None = None
        self._per_env: Tensor | None = None
        self._shape: tuple[int, ...] | None = None

    @property
    def per_level(self) -> bool:
        return isinstance(self.vector, LevelVectors)

    @property
    def hook(self) -> str:
        return self.vector.hook

    def start(self, agent: HookedModule, env: Any, m: int, vectors: Tensor | None = None) -> np.ndarray:
        """Called after each reset of ``env``: builds the first ``m`` envs' vectors; returns their norms.

        ``vectors``: those envs' per-level vectors, when another run on the same levels built them
        already with the same ``LevelVectors`` (a scan builds each level's vector once, not once per run).
        """
        device = _device(agent)
        if not self.per_level:
            if self._fixed is None:
                self._fixed = self.vector.tensor.to(device)
            return np.full(m, self.vector.norm)
        if vectors is None:
            vectors = self.vector.build(agent, env, range(m))
        self._per_env = torch.zeros((env.num_envs, *vectors.shape[1:]), dtype=vectors.dtype)
        self._per_env[:m] = vectors
        self._per_env = self._per_env.to(device)
        return vectors.double().flatten(1).norm(dim=1).numpy()

    def interventions(self, rows: np.ndarray) -> dict[str, AddVector]:
        """The intervention for a forward pass over the envs ``rows``."""
        tensor = self._fixed if not self.per_level else self._per_env[torch.as_tensor(rows, device=self._per_env.device)]
        return {self.vector.hook: AddVector(tensor, coeff=self.coefficient, positions=self.positions)}

    def scaled_table(self, agent: HookedModule) -> Tensor:
        """``coefficient * vector`` in the hook's per-sample shape: one row per env (per level) or one row.

        Rows of it added by ``AddVector(rows, coeff=1.0)`` give the bits :meth:`interventions` gives:
        the same product, then the same sum (``1.0 * x`` is ``x``). Call after :meth:`start`.
        """
        if self.per_level:
            return self.coefficient * self._per_env
        if self._shape is None:
            self._shape = activation_shape(agent, self.hook)
        fixed = self._fixed
        if tuple(fixed.shape) == (1, *self._shape):
            fixed = fixed[0]
        elif tuple(fixed.shape) != self._shape:  # (C,) over a (C, H, W) activation: broadcast over space, as AddVector does
            fixed = fixed.view(-1, 1, 1)
        return (self.coefficient * fixed).expand(self._shape).unsqueeze(0).contiguous()


class _Fired(Intervention):
    """Leaves the activation as it is and records that its hook fired."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, activation: Tensor, name: str = "?") -> Tensor:
        self.fired = True
        return activation


class _TrunkCache:
    """Trunk output rows by key, in tensors allocated once at the cache's size (untouched pages cost
    no memory); emptied when full.

    Emptying never changes a result, it only means recomputing: a row's trunk has the same bits
    whenever it is computed (module docstring).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = int(limit_bytes)
        self.index: dict[Hashable, int] = {}
        self.store: list[Tensor] = []
        self.size = 0

    def clear(self) -> None:
        self.index = {}
        self.size = 0

    def lookup(self, keys: Sequence[Hashable]) -> np.ndarray:
        """Each key's row in the store, or -1."""
        get = self.index.get
        return np.fromiter((get(key, -1) for key in keys), np.int64, len(keys))

    def fits(self, rows: int) -> bool:
        return not self.store or self.size + rows <= len(self.store[0])

    def add(self, keys: Sequence[Hashable], parts: Sequence[Tensor]) -> None:
        """Store new keys' rows (call :meth:`fits` first: a full cache is emptied by its caller, who
        knows which rows it still needs)."""
        if not self.store or self.size + len(keys) > len(self.store[0]):
            # Allocated once, at the cache's size; grown only for a single step's rows beyond it.
            row_bytes = sum(p[0].numel() * p.element_size() for p in parts)
            capacity = max(self.limit_bytes // max(row_bytes, 1), self.size + len(keys))
            grown = [p.new_empty((capacity, *p.shape[1:])) for p in parts]
            for new, old in zip(grown, self.store):
                new[: self.size] = old[: self.size]
            self.store = grown
        for store, part in zip(self.store, parts):
            store[self.size: self.size + len(keys)] = part
        self.index.update(zip(keys, range(self.size, self.size + len(keys))))
        self.size += len(keys)

    def take(self, rows: np.ndarray) -> list[Tensor]:
        # index_select hands back a fresh tensor laid out as the trunk output a run's own call fed its
        # head: the same bits in, the same product out.
        index = torch.as_tensor(rows, device=self.store[0].device)
        return [store.index_select(0, index) for store in self.store]


class LockstepForward:
    """The forward passes of K runs stepping in lockstep, each run's outputs bit for bit its own.

    ``blocks[k]`` is run k's intervention: None (the unsteered agent), a :class:`Steer`, or a mapping
    of hook name to intervention installed as it is (an empty one: unsteered). Call :meth:`start`
    after each reset, then the object with each run's observation rows and env indices.
    ``batched=False`` gives every run whole-network calls of its own (module docstring);
    ``cache_bytes`` bounds each trunk cache (None: ``CACHE_BYTES``).
    """

    def __init__(self, agent: HookedModule, blocks: Sequence[Steer | Mapping[str, Any] | None], batched: bool = True,
                 cache_bytes: int | None = None) -> None:
        self.agent = agent
        self.blocks = list(blocks)
        self.device = _device(agent)
        self.steered = [bool(b) for b in self.blocks]  # as play_episodes always had it: an empty mapping installs nothing
        split = all(callable(getattr(agent, name, None)) for name in ("trunk", "head", "head_logits")) and hasattr(agent, "obs_shape")
        self.batched = bool(batched) and split  # a network without the trunk/head split takes whole-network calls
        self._checked = False
        self._validated = False
        self._cache_bytes = int(CACHE_BYTES if cache_bytes is None else cache_bytes)
        self._unsteered = _TrunkCache(self._cache_bytes)
        self._groups: dict[tuple, dict[str, Any]] = {}  # (hook, positions) -> its runs, where its hook acts, its vector table

    # ------------------------------------------------------------------ each round
    def start(self, envs: Sequence[Any], m: int) -> list[np.ndarray | None]:
        """After a reset: every run's vectors, a per-level vector built once in the first env (all runs
        play the same levels); returns each run's vector norms (None for a run without a Steer)."""
        built: dict[int, Tensor] = {}
        norms: list[np.ndarray | None] = []
        for k, block in enumerate(self.blocks):
            if not isinstance(block, Steer):
                norms.append(None)
                continue
            if not self._validated:
                # Once, here: a whole-network call's AddVector checks its vector on every pass, even at 0.
                check_steering(self.agent, block.vector, block.positions)
            if block.per_level and id(block.vector) not in built:
                built[id(block.vector)] = block.vector.build(self.agent, envs[0], range(m))
            norms.append(block.start(self.agent, envs[k], m, built.get(id(block.vector))))
        self._validated = True
        if self.batched:
            self._unsteered.clear()
            self._start_groups()
        return norms

    def _start_groups(self) -> None:
        """Group the steered runs by hook and positions (one batched trunk call per group and step) and
        stack their ``coefficient * vector`` rows into one table per group."""
        members: dict[tuple, list[int]] = {}
        for k, block in enumerate(self.blocks):
            if isinstance(block, Steer) and block.coefficient != 0:
                members.setdefault(_group_key(block), []).append(k)
        for key, ks in members.items():
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = {"hook": key[0], "positions": None if key[1] is None else [tuple(p) for p in key[1]],
                                             "cache": _TrunkCache(self._cache_bytes), **self._reach(key[0])}
            tables, offsets, total = [], {}, 0
            for k in ks:
                tables.append(self.blocks[k].scaled_table(self.agent))
                offsets[k] = total
                total += len(tables[-1])
            group.update(members=set(ks), table=torch.cat(tables), offset=offsets)
            group["cache"].clear()

    def _reach(self, hook: str) -> dict[str, Any]:
        """Whether ``hook`` fires in the trunk, and which trunk outputs (policy tower, critic tower) it
        can change: a separate tower's hooks reach only that tower's output."""
        fired = _Fired()
        x = torch.zeros((2, *self.agent.obs_shape), dtype=torch.uint8, device=self.device)
        with self.agent.intervene({hook: fired}):
            parts = self.agent.trunk(x)
        towers = [True, parts[1] is not None]
        if parts[1] is not None and callable(getattr(self.agent, "tower_hook_names", None)):
            towers = [hook not in self.agent.tower_hook_names("critic_encoder"), hook not in self.agent.tower_hook_names("encoder")]
        return {"in_trunk": fired.fired, "reaches": towers if fired.fired else [False, False], "critic": parts[1] is not None}

    # ------------------------------------------------------------------ each step
    def __call__(self, xs: Sequence[np.ndarray | None], rows: Sequence[np.ndarray | None], reference: bool = True) -> list[Outputs | None]:
        """Outputs for every run k whose ``xs[k]`` (observation rows, as uint8 numpy) is not None,
        ``rows[k]`` holding each row's env index (which per-level vector it gets); ``reference``: also
        the unsteered outputs of the steered runs (for the KL and the value change)."""
        out: list[Outputs | None] = [None] * len(self.blocks)
        live = [k for k in range(len(self.blocks)) if xs[k] is not None and len(xs[k])]
        if self.batched and not self._checked:
            self._check(xs, rows, live)
        if not self.batched:
            for k in live:
                out[k] = self._whole(k, xs[k], rows[k], reference)
            return out
        cached = []
        for k in live:
            if isinstance(self.blocks[k], Mapping) and self.steered[k]:
                out[k] = self._whole(k, xs[k], rows[k], reference)
            else:
                cached.append(k)
        moved = {k for k in cached if isinstance(self.blocks[k], Steer) and self.blocks[k].coefficient != 0}
        # The unsteered trunk: for the unsteered runs (and those at coefficient 0, where AddVector
        # returns the activation itself), the references, and the towers a steered run's hook misses.
        need_u = [k for k in cached if k not in moved or reference or not all(self._reached(k))]
        flat_u = self._trunk_rows(self._unsteered, need_u, xs, rows, None)
        flat_s: dict[int, list[Tensor]] = {}
        for group in self._groups.values():
            ks = [k for k in cached if k in moved and k in group["members"]]
            if ks and group["in_trunk"]:
                flat_s.update(self._trunk_rows(group["cache"], ks, xs, rows, group))
        for k in cached:
            unsteered = self.agent.head(*flat_u[k]) if k not in moved or reference else (None, None)
            if k not in moved:
                logits, value = unsteered
                keep = reference or not self.steered[k]
                out[k] = (logits, value, logits if keep else None, value if keep else None)
                continue
            group = self._groups[_group_key(self.blocks[k])]
            if group["in_trunk"] and reference and self._reached(k) == [True, False]:
                # The hook reaches the policy tower only: the steered value is the value head on the
                # very rows, in the very number, the reference's is computed on, so it is that value.
                logits_s, value_s = self.agent.head_logits(flat_s[k][0]), unsteered[1]
            elif group["in_trunk"]:
                steered = iter(flat_s[k])
                parts = [next(steered) if reached else flat_u[k][i] for i, reached in enumerate(self._reached(k))]
                logits_s, value_s = self.agent.head(*parts)
            else:
                # The hook acts in the head: the steered trunk is the unsteered one.
                table = group["table"][torch.as_tensor(self._table_rows(group, k, rows[k]), device=self.device)]
                with self.agent.intervene({group["hook"]: AddVector(table, coeff=1.0, positions=group["positions"])}):
                    logits_s, value_s = self.agent.head(*flat_u[k])
            out[k] = (logits_s, value_s, *unsteered)
        return out

    def _reached(self, k: int) -> list[bool]:
        """Which trunk outputs run k's hook changes (one entry per output the network has)."""
        group = self._groups[_group_key(self.blocks[k])]
        return group["reaches"][: 1 + int(group["critic"])]

    def _table_rows(self, group: dict[str, Any], k: int, env_rows: np.ndarray) -> np.ndarray:
        """Rows of the group's vector table for run k's envs ``env_rows``."""
        env_rows = np.asarray(env_rows, np.int64)
        return group["offset"][k] + (env_rows if self.blocks[k].per_level else np.zeros_like(env_rows))

    def _whole(self, k: int, x: np.ndarray, env_rows: np.ndarray, reference: bool) -> Outputs:
        """Run k's own whole-network calls: what a run played alone computes, call for call."""
        agent, block = self.agent, self.blocks[k]
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if not self.steered[k]:
            logits, value = agent(t)
            return logits, value, logits, value
        with agent.intervene(block.interventions(env_rows) if isinstance(block, Steer) else block):
            logits_s, value_s = agent(t)
        if not reference:
            return logits_s, value_s, None, None
        logits_u, value_u = agent(t)
        return logits_s, value_s, logits_u, value_u

    def _trunk_rows(self, cache: _TrunkCache, ks: Sequence[int], xs: Sequence[np.ndarray], rows: Sequence[np.ndarray],
                    group: dict[str, Any] | None) -> dict[int, list[Tensor]]:
        """Each run's trunk rows (in its own row order), computing those the cache lacks in batched calls.

        A row's key is its observation's bytes, after whether it is its run's only row (a batch of one
        has bits of its own) and, for a steered row, its row of the group's vector table.
        """
        keys: dict[int, list[bytes]] = {}
        table_rows: dict[int, np.ndarray] = {}
        for k in ks:
            x = np.ascontiguousarray(xs[k]).reshape(len(xs[k]), -1).view(np.uint8)
            prefix = np.full((len(x), 1), len(x) == 1, "<i8")
            if group is not None:
                table_rows[k] = self._table_rows(group, k, rows[k])
                prefix = np.concatenate([prefix, table_rows[k].astype("<i8")[:, None]], 1)
            raw = np.concatenate([prefix.view(np.uint8), x], 1)
            keys[k] = raw.view(np.dtype((np.void, raw.shape[1]))).ravel().tolist()
        found = {k: cache.lookup(keys[k]) for k in ks}
        missing: dict[bytes, tuple[int, int]] = {}  # key -> (run, row) of its first occurrence
        for k in ks:
            for i in np.flatnonzero(found[k] < 0).tolist():
                missing.setdefault(keys[k][i], (k, i))
        if missing and not cache.fits(len(missing)):
            # Full: start afresh with this step's rows (recomputing costs time, never bits).
            cache.clear()
            found = {k: np.full(len(keys[k]), -1, np.int64) for k in ks}
            missing = {}
            for k in ks:
                for i, key in enumerate(keys[k]):
                    missing.setdefault(key, (k, i))
        if missing:
            self._compute(cache, missing, xs, table_rows, group)
            index = cache.index
            for k in ks:
                lost = np.flatnonzero(found[k] < 0)
                found[k][lost] = [index[keys[k][i]] for i in lost.tolist()]
        return {k: cache.take(found[k]) for k in ks}

    def _compute(self, cache: _TrunkCache, missing: Mapping[bytes, tuple[int, int]], xs: Sequence[np.ndarray],
                 table_rows: Mapping[int, np.ndarray], group: dict[str, Any] | None) -> None:
        """Trunk rows of the missing keys: a run's lone row alone (the batch-of-one kernel its own run
        used), the others in batches of 2 to CHUNK_ROWS (a lone leftover row is computed in a pair)."""
        singles = [[key] for key, (k, _) in missing.items() if len(xs[k]) == 1]
        multis = [key for key, (k, _) in missing.items() if len(xs[k]) > 1]
        for batch in singles + [multis[i: i + CHUNK_ROWS] for i in range(0, len(multis), CHUNK_ROWS)]:
            where = [missing[key] for key in batch]
            if len(batch) == 1 and len(xs[where[0][0]]) > 1:
                where = where * 2
            x = torch.from_numpy(np.stack([xs[k][i] for k, i in where])).to(self.device)
            if group is None:
                parts = [p for p in self.agent.trunk(x) if p is not None]
            else:
                vectors = group["table"][torch.as_tensor([int(table_rows[k][i]) for k, i in where], device=self.device)]
                with self.agent.intervene({group["hook"]: AddVector(vectors, coeff=1.0, positions=group["positions"])}):
                    # A critic tower the hook cannot reach is left out: its rows come from the unsteered cache.
                    outputs = self.agent.trunk(x, critic=group["reaches"][1]) if group["critic"] else self.agent.trunk(x)
                    parts = [p for p, reached in zip(outputs, group["reaches"]) if p is not None and reached]
            cache.add(batch, [p[: len(batch)] for p in parts])

    def _check(self, xs: Sequence[np.ndarray | None], rows: Sequence[np.ndarray | None], live: Sequence[int]) -> None:
        """Check once, on the largest run's rows, that the trunk (unsteered, and with each group's
        vectors) gives every row the same bits in batches of several sizes; else fall back to
        whole-network calls per run, with a warning."""
        self._checked = True
        k0 = max(live, key=lambda k: len(xs[k]))
        n = len(xs[k0])
        if n < 3:
            return  # no two batches of 2 or more rows to compare
        x = torch.from_numpy(np.ascontiguousarray(xs[k0])).to(self.device)
        g = torch.Generator().manual_seed(0)
        subsets = [torch.randperm(n, generator=g)[:s].sort().values.to(self.device) for s in sorted({2, 3, min(17, n - 1), n // 2, n - 1} - {0, 1})]
        every = torch.arange(n, device=self.device)
        for group in [None, *(gr for gr in self._groups.values() if gr["in_trunk"] and gr["members"])]:
            if group is None:
                vectors = None
            else:
                k = min(group["members"])
                vectors = group["table"][torch.as_tensor(self._table_rows(group, k, rows[k0]), device=self.device)]
            full = self._checked_trunk(x, every, group, vectors)
            for idx in subsets:
                for whole, part in zip(full, self._checked_trunk(x, idx, group, vectors)):
                    if whole is not None and not torch.equal(whole[idx], part):
                        warnings.warn(f"{type(self.agent).__name__}.trunk gives a row other bits in a batch of {len(idx)} than in one of {n} "
                                      f"here ({self.device}): the scan's runs fall back to whole-network calls of their own (exact, slower)",
                                      RuntimeWarning, stacklevel=3)
                        self.batched = False
                        return

    def _checked_trunk(self, x: Tensor, idx: Tensor, group: dict[str, Any] | None, vectors: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if group is None:
            return self.agent.trunk(x[idx])
        with self.agent.intervene({group["hook"]: AddVector(vectors[idx], coeff=1.0, positions=group["positions"])}):
            return self.agent.trunk(x[idx])


def _group_key(block: Steer) -> tuple:
    return block.hook, None if block.positions is None else tuple(block.positions)


def _device(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")
