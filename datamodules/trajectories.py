"""Cached trajectories with activations, served to value probes as a LightningDataModule.

The data are the episodes of an agent and of noisy versions of it (``innercritic.cache``): one
collection per (agent, env, versions, hook points, discount, seeds), kept in ``cache_dir`` as
memory-mapped ``.npy`` shards with a manifest (see ``innercritic/cache/format.py``).

- ``prepare_data`` (Lightning runs it on one process per node) builds the cache when ``cache_dir``
  holds none, resumes an interrupted one, reuses a complete one whose manifest matches the request,
  and stops with an error naming the differing fields otherwise (``rebuild=True`` replaces it).
- ``setup`` opens the cache (verifying every file's sha256), splits its episodes into train /
  calibration / test from ``split_seed`` (episode ``u`` of every version goes to the same split: the
  versions play the same levels), and computes the standardisation statistics of the served hook
  point on the train split only.
- ``batch_size=0`` serves each split as one batch, gathered once and held in memory: full-batch
  steps, whose exact gradients let a TD probe converge along directions where minibatch noise stalls
  Adam (BENCHMARKS.md, "TD probe against LSTD").
- Batches are dicts of tensors, one row per transition ``s_t -> s_{t+1}`` (a stored episode's final
  state is served only as ``x_next``):

      x, x_next      {hook: float32 (B, D_hook)}  activations of each served hook point at s_t and
                                     s_{t+1}, flattened and standardised with ``stats`` (the train
                                     split's); a probe keeps ``stats`` with its weights to apply them to
                                     live activations when planning or steering
      reward         float32 (B,)    r_t
      terminal       float32 (B,)    1.0 when the episode terminated right after action t (no bootstrap)
      truncated      float32 (B,)    1.0 when it was cut by the time limit right after action t
      ret            float32 (B,)    discounted return G_t with the cache's gamma
      bootstrapped   float32 (B,)    1.0 when G_t contains the critic's value at a truncation
      value          float32 (B,)    the agent's critic at s_t (a ceiling for probes)
      version        int64 (B,)      index into ``version_names`` (0 = the first, by default the policy)
      state_index    int64 (B,)      the cache row of s_t: stable, in [0, num_states); s_{t+1} is row + 1
      episode, step  int64 (B,)      global episode id and time step t

Run (the probe configs put this class under ``data:``)::

    python train.py fit -c configs/probe/maze.yaml --data.agent_ckpt A.ckpt --data.cache_dir D

builds the cache in D on first use. To collect without training a probe::

    python -m datamodules.trajectories -c configs/probe/collect_maze.yaml --agent_ckpt A.ckpt --cache_dir D

where ``collect_maze.yaml`` holds this class's arguments at its top level (no ``data:`` nesting).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from innercritic.agents.checkpoint import load_agent
from innercritic.cache import (
    ACTIVATION_DTYPES,
    CacheMismatchError,
    TrajectoryCache,
    build_cache,
    cache_status,
    diff_requests,
    file_sha256,
    make_request,
)
from innercritic.cache.format import format_differences
from innercritic.probing.evaluate import Split, maze_exact_values
from innercritic.errors import InnerCriticError

__all__ = ["TrajectoryDataModule", "TransitionDataset"]

_STATS_CHUNK = 4096

# Caches opened by earlier runs in this process (``train.py runs``: the seeds of a probe sweep), with the
# per-row columns and exact values computed from them: {(cache folder, manifest sha256, verified): state}.
# The manifest's hash names the cache's contents (every file's sha256 is in it), so a rebuilt cache is a
# new entry. One entry is kept: a sweep reads one cache, and an entry holds its exact values.
_OPENED: dict[tuple[str, str, bool], dict[str, Any]] = {}


def _identity(batch: Any) -> Any:
    """collate_fn: the dataset's ``__getitems__`` already returns a whole batch."""
    return batch


class TransitionDataset(Dataset):
    """Transitions ``rows[i] -> rows[i] + 1`` of a cache, read a whole batch at a time.

    ``__getitems__`` (which torch's DataLoader calls with a batch of indices when it exists) gathers
    the batch with a handful of numpy fancy-indexing calls on the memory maps: no per-row Python.
    """

    def __init__(self, cache: TrajectoryCache, rows: np.ndarray, stats: dict[str, dict[str, torch.Tensor]],
                 columns: dict[str, np.ndarray]) -> None:
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.hooks = list(stats)
        self.stats = {h: (s["mean"].numpy(), s["std"].numpy()) for h, s in stats.items()}
        self.columns = columns

    def standardised(self, hook: str, rows: np.ndarray) -> np.ndarray:
        """Activations of ``hook`` at cache ``rows``, flattened and standardised: float32 (len(rows), D)."""
        mean, std = self.stats[hook]
        # In place on the gathered copy: a split's activations are gigabytes, and each temporary a pass over them.
        out = self.cache.gather(f"act.{hook}", rows).reshape(len(rows), len(mean)).astype(np.float32, copy=False)
        out -= mean
        out /= std
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def _successors(self, x: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """The activations at ``rows + 1`` (sorted ``rows``): copied from ``x`` where that row is among ``rows``
        (in a split of whole episodes, every transition's but an episode's last), read from the cache for the rest.

        The same standardised values as reading them all (the same arithmetic on the same stored numbers), at
        the cost of an in-memory copy rather than a second gather of a split's activations."""
        succ = np.searchsorted(rows, rows + 1).clip(max=max(len(rows) - 1, 0))
        missing = np.flatnonzero(rows[succ] != rows + 1) if len(rows) else rows
        out = {}
        for h, a in x.items():
            nxt = np.take(a, succ, axis=0)
            if len(missing):
                nxt[missing] = self.standardised(h, rows[missing] + 1)
            out[h] = nxt
        return out

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = np.sort(self.rows[np.asarray(indices, dtype=np.int64)])  # sorted: sequential reads from the maps
        c = self.columns
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        i64 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        x = {h: self.standardised(h, rows) for h in self.hooks}
        return {
            "x": {h: torch.from_numpy(a) for h, a in x.items()},
            "x_next": {h: torch.from_numpy(a) for h, a in self._successors(x, rows).items()},
            "reward": f32(c["reward"][rows]),
            "terminal": f32(c["terminal"][rows]),
            "truncated": f32(c["truncated"][rows]),
            "ret": f32(c["return"][rows]),
            "bootstrapped": f32(c["bootstrapped"][rows]),
            "value": f32(c["value"][rows]),
            "version": i64(c["version"][rows]),
            "state_index": i64(rows),
            "episode": i64(c["episode"][rows]),
            "step": i64(c["step"][rows]),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        one = lambda v: {h: a[0] for h, a in v.items()} if isinstance(v, dict) else v[0]  # noqa: E731
        return {k: one(v) for k, v in self.__getitems__([index]).items()}


class TrajectoryDataModule(L.LightningDataModule):
    """Trajectories of an agent and its noisy versions with activations, cached on disk, split by episode.

    Exposed after ``setup``: ``stats`` ({hook: {"mean", "std"}} float32 (D_hook,) over the train
    split's states; std of a constant feature is 1), ``feature_dims`` ({hook: D_hook}), ``num_versions`` and
    ``version_names``, ``num_states`` (rows of the cache: the range of ``state_index``), ``gamma``,
    ``train_episodes`` / ``calib_episodes`` / ``test_episodes`` (sorted global episode ids) and
    ``cache`` (the opened :class:`~innercritic.cache.TrajectoryCache`, for exact values and plots).
    """

    def __init__(
        self,
        agent_ckpt: str,  # PPO agent checkpoint (train.py fit output) whose policy is collected
        cache_dir: str,  # folder of the trajectory cache; built there when it holds none
        hook_points: list[str] | None = None,  # hook points whose activations are stored; None: those of `towers`
        towers: str | list[str] = "encoder",  # with hook_points None: "encoder" (the policy's), "critic_encoder", a list, or "all"
        hooks: list[str] | None = None,  # hook points the batches serve (a subset of hook_points); None: all of them
        versions: tuple[str, ...] = ("policy", "eps:0.25", "eps:0.5"),  # policy versions: "policy", "eps:E", "temp:T", "eps:E,temp:T"
        episodes_per_version: int = 200,  # episodes collected for each version
        env_overrides: dict[str, Any] | None = None,  # merged into the checkpoint's env kwargs, e.g. {"cheese": "anywhere"}
        gamma: float | None = None,  # discount of the stored returns; None: the checkpoint's
        activation_dtype: str = "float32",  # storage dtype of the activations: "float32" or "float16"
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),  # train / calibration / test shares of the episodes
        split_seed: int = 0,  # seed of the episode split (and of the train shuffling)
        collect_seed: int = 0,  # seed of the collection (levels and action sampling)
        num_envs: int = 64,  # envs stepped together while collecting
        episodes_per_shard: int = 128,  # episodes per cache shard (the unit of resuming and of memory use)
        batch_size: int = 256,  # transitions per batch; 0: a whole split per batch, gathered once and kept in memory (full-batch steps)
        num_workers: int = 0,  # DataLoader worker processes
        rebuild: bool = False,  # replace a cache that does not match this request (or fails its checksums)
        verify_checksums: bool = True,  # recompute every cache file's sha256 when opening it
        progress: bool = True,  # show a progress bar while collecting
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # recorded with the probe's checkpoints and runs: which agent and data it saw
        versions = [versions] if isinstance(versions, str) else list(versions)
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6) or fractions[0] == 0:
            raise InnerCriticError(f"data.split_fractions must be three non-negative shares (train, calibration, test) summing to 1 "
                             f"with a non-empty train share, got {split_fractions}")
        if activation_dtype not in ACTIVATION_DTYPES:
            raise InnerCriticError(f"data.activation_dtype must be one of {list(ACTIVATION_DTYPES)}, got {activation_dtype!r}")
        if episodes_per_version < 1:
            raise InnerCriticError(f"data.episodes_per_version must be >= 1, got {episodes_per_version}")
        if batch_size < 0:
            raise InnerCriticError(f"data.batch_size must be >= 1 (transitions per batch) or 0 (the whole split), got {batch_size}")
        self.agent_ckpt = str(agent_ckpt)
        self.cache_dir = Path(cache_dir)
        self.split_fractions = fractions
        self.split_seed = int(split_seed)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.rebuild = bool(rebuild)
        self.rebuild_flag = "--data.rebuild true"  # how the command that built this module spells rebuild (train.py's)
        self.verify_checksums = bool(verify_checksums)
        self.progress = bool(progress)
        # The agent is loaded now so that a typo in a hook point or a version fails before any training starts.
        self.agent, self.env_info = load_agent(self.agent_ckpt)
        self.request = make_request(
            self.agent, self.env_info, versions=versions, episodes_per_version=episodes_per_version,
            hook_points=hook_points, gamma=gamma, activation_dtype=activation_dtype, env_overrides=env_overrides,
            seed=collect_seed, num_envs=num_envs, episodes_per_shard=episodes_per_shard, towers=towers)
        self.hook_points: list[str] = list(self.request["hook_points"])
        hooks = [hooks] if isinstance(hooks, str) else hooks
        self.hooks: list[str] = list(self.hook_points if hooks is None else hooks)
        missing = [h for h in self.hooks if h not in self.hook_points]
        if missing or not self.hooks:
            raise InnerCriticError(f"data.hooks {missing or self.hooks} must be a non-empty subset of the collected hook points {self.hook_points}")
        self.version_names: list[str] = list(self.request["versions"])
        self.gamma: float = float(self.request["gamma"])
        self.feature_dims: dict[str, int] = {h: int(math.prod(self.request["hook_shapes"][h])) for h in self.hooks}
        self.cache: TrajectoryCache | None = None
        self.stats: dict[str, dict[str, torch.Tensor]] | None = None
        self.num_states: int | None = None
        self.train_episodes = self.calib_episodes = self.test_episodes = None
        self._datasets: dict[str, TransitionDataset] = {}
        self._whole: dict[str, dict[str, Any]] = {}
        self._columns: dict[str, np.ndarray] = {}
        self._shared: dict[str, Any] = {}

    @property
    def num_versions(self) -> int:
        return len(self.version_names)

    # ------------------------------------------------------------------ building and opening the cache
    def prepare_data(self) -> None:
        """Build the cache when missing (or resume it); reuse it when it matches; a clear error otherwise."""
        source = {"agent_ckpt": self.agent_ckpt, "checkpoint_sha256": file_sha256(self.agent_ckpt)}
        try:
            build_cache(self.agent, self.request, self.cache_dir, rebuild=self.rebuild, progress=self.progress, source=source)
        except CacheMismatchError as err:
            raise CacheMismatchError(f"{err} (to replace it: {self.rebuild_flag})") from None

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        if cache_status(self.cache_dir, self.request) != "complete":
            if self.trainer is None:  # used outside a Trainer: nobody else will build it
                self.prepare_data()
            else:
                raise RuntimeError(f"no complete trajectory cache at {str(self.cache_dir)!r}: prepare_data() did not run "
                                   f"on this node (set prepare_data_per_node or share cache_dir)")
        opened = self._open()
        cache = opened["cache"]
        diffs = diff_requests(cache.request, self.request)
        if diffs:  # cache_status checked the same manifest; kept in case it changed in between
            raise CacheMismatchError(format_differences(self.cache_dir, diffs))
        self.cache = cache
        self.num_states = cache.num_rows
        columns = opened["columns"]
        self._columns = columns
        self._shared = opened
        self.train_episodes, self.calib_episodes, self.test_episodes = self.split_episodes()
        splits = {"train": self.train_episodes, "calib": self.calib_episodes, "test": self.test_episodes}
        train_states = np.flatnonzero(np.isin(columns["episode"], self.train_episodes))
        self.stats = {h: self._standardisation(cache, h, train_states) for h in self.hooks}
        transition = ~columns["last"]
        for name, episodes in splits.items():
            rows = np.flatnonzero(transition & np.isin(columns["episode"], episodes))
            self._datasets[name] = TransitionDataset(cache, rows, self.stats, columns)

    def _open(self) -> dict[str, Any]:
        """The opened cache and its per-row columns: from an earlier run of this process when it opened the
        same cache (same manifest, same checksum policy), else opened (and verified) now."""
        key = (str(self.cache_dir.resolve()), file_sha256(self.cache_dir / "manifest.json"), self.verify_checksums)
        if key not in _OPENED:
            _OPENED.clear()
            cache = TrajectoryCache(self.cache_dir, verify=self.verify_checksums)
            columns = {k: cache.column(k) for k in ("reward", "terminal", "truncated", "return", "bootstrapped", "value",
                                                     "version", "episode", "step", "last")}
            _OPENED[key] = {"cache": cache, "columns": columns, "exact": {}}
        return _OPENED[key]

    def split_episodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, calibration, test) global episode ids: a permutation of the episode indices from split_seed.

        Episode ``u`` of every version lands in the same split (the versions play the same levels).
        """
        per_version = int(self.request["episodes_per_version"])
        perm = np.random.default_rng(self.split_seed).permutation(per_version)
        n_train = max(1, int(round(self.split_fractions[0] * per_version)))
        n_calib = min(per_version - n_train, int(round(self.split_fractions[1] * per_version)))
        parts = (perm[:n_train], perm[n_train:n_train + n_calib], perm[n_train + n_calib:])
        offsets = np.arange(self.num_versions, dtype=np.int64) * per_version
        return tuple(np.sort((offsets[:, None] + np.asarray(p, dtype=np.int64)[None, :]).reshape(-1)) for p in parts)

    def _standardisation(self, cache: TrajectoryCache, hook: str, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Mean and std per feature of one hook point over ``rows`` (float64 accumulation, Chan's merge)."""
        field, dim = f"act.{hook}", self.feature_dims[hook]
        count, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
        for start in range(0, len(rows), _STATS_CHUNK):
            chunk = cache.gather(field, rows[start:start + _STATS_CHUNK]).reshape(-1, dim).astype(np.float64)
            n = len(chunk)
            c_mean = chunk.mean(0)
            c_m2 = ((chunk - c_mean) ** 2).sum(0)
            delta = c_mean - mean
            total = count + n
            mean = mean + delta * n / total
            m2 = m2 + c_m2 + delta**2 * count * n / total
            count = total
        std = np.sqrt(m2 / max(count, 1))
        std[std < 1e-8] = 1.0  # a constant feature standardises to 0, not to nan
        return {"mean": torch.from_numpy(mean.astype(np.float32)), "std": torch.from_numpy(std.astype(np.float32))}

    # ------------------------------------------------------------------ dataloaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._datasets:
            raise RuntimeError("call setup() before asking for dataloaders")
        dataset = self._datasets[split]
        if self.batch_size == 0:
            # Every step sees the same batch, so it is read from the maps once; batch_size=None: no collation.
            return DataLoader([self._whole_batch(split)], batch_size=None)
        generator = torch.Generator().manual_seed(self.split_seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator, collate_fn=_identity,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _whole_batch(self, split: str) -> dict[str, Any]:
        """Every transition of ``split`` as one batch, gathered on first use and kept (full-batch mode)."""
        if split not in self._whole:
            dataset = self._datasets[split]
            self._whole[split] = dataset.__getitems__(list(range(len(dataset))))
        return self._whole[split]

    def teardown(self, stage: str) -> None:
        """Free the full-batch splits (gigabytes at the default size) once the run's evaluation is done: with
        ``train.py runs`` the next seed gathers its own in the same process."""
        self._whole.clear()

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The calibration split (unsupervised probes fit their scale and offset here)."""
        return self._loader("calib", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def split_rows(self, split: str) -> np.ndarray:
        """Cache rows of the transitions of ``split`` ("train", "calib" or "test")."""
        return self._datasets[split].rows

    @property
    def is_maze(self) -> bool:
        return self.request["env"]["spec"] == "maze"

    def exact_values(self) -> np.ndarray | None:
        """Exact value of each cache row's state under its policy version (maze only; else None), computed once."""
        if not self.is_maze:
            return None
        # Solved once per cache and process (the opened cache's entry keeps them), keyed by what they depend on
        # beyond the cache, whose request already fixes the agent's weights.
        key = (tuple(self.version_names), self.gamma)
        shared = self._shared["exact"]
        if key not in shared:
            c = self.cache
            shared[key] = maze_exact_values(c.column("obs"), c.column("episode"), c.column("version"), self.version_names,
                                            self.agent, self.gamma)
        return shared[key]

    def split_arrays(self, split: str) -> Split:
        """Every transition of ``split`` in memory, activations standardised with the train statistics."""
        dataset = self._datasets[split]
        rows, n, c = dataset.rows, len(dataset.rows), self.cache
        if self.batch_size == 0:
            # The full batch the loader serves holds these same standardised rows (in the same, sorted
            # order): share its memory rather than gather the activations a second time.
            whole = self._whole_batch(split)
            x = {h: whole["x"][h].numpy() for h in self.hooks}
            x_next = {h: whole["x_next"][h].numpy() for h in self.hooks}
        else:
            x = {h: dataset.standardised(h, rows) for h in self.hooks}
            x_next = dataset._successors(x, rows)
        col = lambda name, r=rows: np.asarray(self._columns[name][r])  # noqa: E731
        exact = self.exact_values()
        obs_dim = int(np.prod(self.agent.obs_shape))
        return Split(
            x=x, x_next=x_next, reward=col("reward"), terminal=col("terminal").astype(np.float32), ret=col("return"),
            value=col("value"), value_next=col("value", rows + 1), version=col("version").astype(np.int64),
            step=col("step").astype(np.int64), episode=col("episode").astype(np.int64),
            exact=None if exact is None else exact[rows],
            obs=c.gather("obs", rows).reshape(n, obs_dim), obs_next=c.gather("obs", rows + 1).reshape(n, obs_dim))


def main(args: list[str] | None = None) -> None:
    """Collect (or check) a cache from the command line: the datamodule's arguments, no training."""
    from jsonargparse import ArgumentParser, ActionConfigFile

    parser = ArgumentParser(description="Build a trajectory cache (innercritic) without training a probe.")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML with TrajectoryDataModule's arguments at the top level")
    parser.add_class_arguments(TrajectoryDataModule, nested_key=None)
    kwargs = parser.parse_args(args).as_dict()
    kwargs.pop("config", None)
    dm = TrajectoryDataModule(**kwargs)
    dm.rebuild_flag = "--rebuild true"
    dm.prepare_data()
    dm.setup("fit")
    print(f"{dm.cache}; train/calib/test episodes {len(dm.train_episodes)}/{len(dm.calib_episodes)}/{len(dm.test_episodes)}")


if __name__ == "__main__":
    from innercritic.errors import exit_on_user_error

    exit_on_user_error(main)
