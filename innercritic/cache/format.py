"""The on-disk trajectory cache: manifest, atomic shard writer, verified memory-mapped reader.

A cache is one folder::

    D/
      request.json            what is being collected (written first; lets a resumed run check it asks the same)
      v00-s0000/              one shard: a fixed group of episodes of one policy version
        shard.json            the shard's entry (counts, per-file size and sha256), written inside the shard
        obs.npy  action.npy  reward.npy  ...  act.encoder.hook_fc.npy  ep_start.npy ...
      v00-s0001/ ...
      manifest.json           written last, once every shard is on disk: the cache is complete

Every array is a plain ``.npy`` file (``np.save(..., allow_pickle=False)``), read back with
``np.load(..., mmap_mode="r", allow_pickle=False)``: nothing in a cache can run code. A shard is
written into a hidden temporary folder (``.tmp-...``), its files hashed as they are written, then
the folder is renamed into place (one atomic ``rename``), so a shard folder either exists whole or
not at all; ``manifest.json`` and ``request.json`` are written to a temporary name and renamed too.
An interrupted collection therefore leaves complete shards plus at most one temporary folder, and
the next run (same request) keeps the shards and redoes only the rest.

Integrity: each file's sha256 (of the whole file, header included) is in its shard's entry and in
the manifest; :class:`TrajectoryCache` recomputes them on open (``verify=True``; about 1.5 GB/s on
a core with SHA extensions) and names the file whose bytes differ.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from innercritic.errors import InnerCriticError

__all__ = [
    "CHECKSUM",
    "FORMAT",
    "FORMAT_VERSION",
    "GatheredRows",
    "MANIFEST",
    "REQUEST",
    "SHARD_META",
    "CacheError",
    "CacheIntegrityError",
    "CacheMismatchError",
    "TrajectoryCache",
    "diff_requests",
    "file_sha256",
    "read_json",
    "shard_name",
    "write_json_atomic",
    "write_shard",
]

FORMAT = "innercritic.trajectory_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUEST = "request.json"
SHARD_META = "shard.json"
CHECKSUM = "sha256"
TMP_PREFIX = ".tmp-"
_CHUNK = 8 * 2**20


class CacheError(InnerCriticError):
    """A trajectory cache that cannot be used as asked (missing, incomplete, foreign, bad format)."""


class CacheMismatchError(CacheError):
    """The cache on disk holds something other than what the request asks for."""


class CacheIntegrityError(CacheError):
    """A file of the cache is missing or its bytes differ from the checksum recorded when it was written."""


# ---------------------------------------------------------------------------------------------
# Small helpers: hashing, JSON written atomically, shard names.


def shard_name(version_index: int, shard_index: int) -> str:
    """Folder name of shard ``shard_index`` of version ``version_index``: ``v00-s0000``."""
    return f"v{version_index:02d}-s{shard_index:04d}"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)  # one buffer, read into: no fresh 8 MiB object per chunk
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; a one-line :class:`CacheError` when it is unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(data, dict):
        raise CacheError(f"{str(path)!r} does not hold a JSON object")
    return data


def jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold made plain: nan and inf become None (read as "not measured"),
    numpy and torch scalars Python numbers, tuples lists, anything else unknown its ``str``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return jsonable(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json_atomic(path: str | Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as JSON to a temporary name beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class GatheredRows:
    """Rows ``source[index]`` of an array, gathered only as they are written (or by ``np.asarray``).

    ``source`` is one array, or a list of blocks of ``block_rows`` rows each (row r in block
    ``r // block_rows``). The collector keeps a shard's rows in the order they were played and stores
    them episode by episode: gathering in chunks straight into the file saves a full in-memory copy
    of the largest fields (observations, activations).
    """

    def __init__(self, source: np.ndarray | Sequence[np.ndarray], index: np.ndarray, block_rows: int | None = None) -> None:
        self.blocks = [source] if isinstance(source, np.ndarray) else list(source)
        if not self.blocks:
            raise InnerCriticError("GatheredRows needs at least one source block")
        self.block_rows = len(self.blocks[0]) if block_rows is None else int(block_rows)
        if len(self.blocks) > 1 and any(len(b) != self.block_rows for b in self.blocks[:-1]):
            raise InnerCriticError("every block but the last must hold block_rows rows")
        self.index = np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index), *self.blocks[0].shape[1:])
        self.dtype = self.blocks[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _gather(self, index: np.ndarray, out: np.ndarray) -> np.ndarray:
        if len(self.blocks) == 1:
            return np.take(self.blocks[0], index, axis=0, out=out)
        block, offset = np.divmod(index, self.block_rows)
        for b in np.unique(block).tolist():
            mask = block == b
            out[mask] = self.blocks[b][offset[mask]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._gather(self.index, np.empty(self.shape, dtype=self.dtype))
        return out if dtype is None else out.astype(dtype)

    def chunks(self, max_bytes: int = _CHUNK):
        """The gathered rows, in order, as contiguous arrays of at most ``max_bytes`` (one reused buffer)."""
        row_bytes = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)
        per_chunk = max(1, max_bytes // row_bytes)
        buffer = np.empty((min(per_chunk, len(self)), *self.shape[1:]), dtype=self.dtype)
        for start in range(0, len(self), per_chunk):
            part = self.index[start:start + per_chunk]
            yield self._gather(part, buffer[: len(part)])


def _save_array(path: Path, array: np.ndarray | GatheredRows) -> tuple[int, str]:
    """Write an ``.npy`` file (format 1.0 header, C order, no pickle); returns (bytes written, sha256).

    The bytes are those ``np.save`` writes; each is hashed as it is written, never read back.
    """
    if not isinstance(array, GatheredRows):
        array = np.ascontiguousarray(array)
    dtype = np.dtype(array.dtype)
    if dtype.hasobject:
        raise CacheError(f"refusing to store {path.name}: object arrays would need pickle")
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as f:
        head = io.BytesIO()
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(array.shape)}
        np.lib.format.write_array_header_1_0(head, header)
        parts = array.chunks() if isinstance(array, GatheredRows) else _byte_chunks(array)
        digest.update(head.getvalue())
        size += f.write(head.getvalue())
        for part in parts:
            view = memoryview(np.ascontiguousarray(part)).cast("B")
            digest.update(view)
            size += f.write(view)
    return size, digest.hexdigest()


def _byte_chunks(array: np.ndarray):
    flat = array.reshape(-1).view(np.uint8) if array.size else np.zeros(0, np.uint8)
    for start in range(0, flat.size, _CHUNK):
        yield flat[start:start + _CHUNK]


def write_shard(cache_dir: str | Path, name: str, arrays: Mapping[str, np.ndarray | GatheredRows], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write one shard atomically: every array of ``arrays`` as ``<field>.npy`` plus ``shard.json``.

    The files go to a hidden temporary folder first, then the folder is renamed to ``name``. A shard
    that already exists is never overwritten (:class:`CacheError`). Returns the shard's entry:
    ``meta`` plus ``name`` and ``files`` (field -> file path relative to the cache, bytes, sha256,
    dtype, shape).
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    if final.exists():
        raise CacheError(f"shard {str(final)!r} already exists; refusing to overwrite it (rebuild the cache to replace it)")
    tmp = cache_dir / f"{TMP_PREFIX}{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        files: dict[str, Any] = {}
        for field, array in arrays.items():
            size, sha = _save_array(tmp / f"{field}.npy", array)
            files[field] = {"file": f"{name}/{field}.npy", "bytes": size, CHECKSUM: sha,
                            "dtype": np.dtype(array.dtype).str, "shape": list(array.shape)}
        entry = {**meta, "name": name, "files": files}
        write_json_atomic(tmp / SHARD_META, entry)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def remove_stale_tmp(cache_dir: str | Path) -> list[str]:
    """Delete the temporary folders and files an interrupted writer left behind; returns their names."""
    removed = []
    for path in Path(cache_dir).glob(f"{TMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def diff_requests(stored: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key path, stored value, requested value) for every leaf where two request dicts differ."""
    out: list[tuple[str, Any, Any]] = []
    for key in list(stored) + [k for k in requested if k not in stored]:
        a, b = stored.get(key, "<absent>"), requested.get(key, "<absent>")
        path = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(diff_requests(a, b, path + "."))
        elif a != b:
            out.append((path, a, b))
    return out


def format_differences(cache_dir: str | Path, diffs: Sequence[tuple[str, Any, Any]]) -> str:
    """``cache at D holds gamma 0.99 ... ; the request asks for gamma 0.95 ...``, one line."""
    def short(v: Any) -> str:
        text = json.dumps(v) if not isinstance(v, str) else repr(v)
        return text if len(text) <= 200 else text[:197] + "..."

    held = ", ".join(f"{k} {short(a)}" for k, a, _ in diffs)
    asked = ", ".join(f"{k} {short(b)}" for k, _, b in diffs)
    return f"cache at {str(cache_dir)!r} holds {held}; the request asks for {asked}"


# ---------------------------------------------------------------------------------------------
# Reading.


class TrajectoryCache:
    """A complete cache, opened read-only: manifest, verified files, memory-mapped arrays.

    Rows are numbered across shards in manifest order (version, then shard): row ``r`` of the cache
    is row ``r - row_offset[s]`` of shard ``s``. Per-row fields of one shard are ``shard_array(s,
    field)``; :meth:`column` concatenates a per-row field over all shards (meant for the small
    fields: rewards, flags, ids), :meth:`gather` reads chosen rows of any field (activations,
    observations) straight from the memory maps, and :meth:`episodes` concatenates a per-episode
    field (``ep_*``).

    Memory maps are opened lazily and dropped when pickled, so the object can be sent to DataLoader
    worker processes without copying the arrays.

    Args:
        cache_dir: folder holding ``manifest.json``.
        verify: recompute every file's sha256 and compare with the manifest (reads the whole cache once).
    """

    def __init__(self, cache_dir: str | Path, verify: bool = True) -> None:
        self.path = Path(cache_dir)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = " (an interrupted collection: run it again to resume)" if (self.path / REQUEST).is_file() else ""
            raise CacheError(f"no trajectory cache at {str(self.path)!r}: {MANIFEST} is missing{hint}")
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise CacheError(f"{str(manifest_path)!r} is not an InnerCritic trajectory cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{str(manifest_path)!r} has format version {manifest.get('format_version')!r}; "
                             f"this code reads version {FORMAT_VERSION}: rebuild the cache")
        self.manifest = manifest
        self.shards: list[dict[str, Any]] = list(manifest["shards"])
        rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        eps = np.array([s["episodes"] for s in self.shards], dtype=np.int64)
        self.row_offset = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.episode_offset = np.concatenate([[0], np.cumsum(eps)]).astype(np.int64)
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        if verify:
            self.verify()

    # -- what the cache holds ------------------------------------------------------------------

    @property
    def request(self) -> dict[str, Any]:
        """The request the cache was collected for (compare with :func:`diff_requests`)."""
        return self.manifest["request"]

    @property
    def fields(self) -> dict[str, dict[str, Any]]:
        """Field name -> {"dtype", "shape" (per row / per episode), "per": "row" | "episode"}."""
        return self.manifest["fields"]

    @property
    def hook_points(self) -> list[str]:
        return list(self.request["hook_points"])

    @property
    def hook_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.manifest["hook_shapes"].items()}

    @property
    def versions(self) -> list[str]:
        return list(self.request["versions"])

    @property
    def gamma(self) -> float:
        return float(self.request["gamma"])

    @property
    def episodes_per_version(self) -> int:
        return int(self.request["episodes_per_version"])

    @property
    def num_rows(self) -> int:
        return int(self.row_offset[-1])

    @property
    def num_episodes(self) -> int:
        return int(self.episode_offset[-1])

    # -- integrity -------------------------------------------------------------------------------

    def files(self) -> Iterable[tuple[Path, dict[str, Any]]]:
        for shard in self.shards:
            for info in shard["files"].values():
                yield self.path / info["file"], info

    def verify(self) -> None:
        """Recompute every file's sha256; :class:`CacheIntegrityError` naming the first that differs."""
        for path, info in self.files():
            if not path.is_file():
                raise CacheIntegrityError(f"cache file {str(path)!r} is missing (listed in the manifest); rebuild the cache")
            size = path.stat().st_size
            if size != info["bytes"]:
                raise CacheIntegrityError(f"cache file {str(path)!r} has {size} bytes, the manifest records {info['bytes']}: "
                                          f"the file is truncated or was replaced; rebuild the cache")
            if file_sha256(path) != info[CHECKSUM]:
                raise CacheIntegrityError(f"cache file {str(path)!r} is corrupt: its sha256 differs from the one recorded "
                                          f"when it was written; rebuild the cache")

    # -- arrays ----------------------------------------------------------------------------------

    def _field_info(self, field: str) -> dict[str, Any]:
        if field not in self.fields:
            raise KeyError(f"the cache at {str(self.path)!r} has no field {field!r}; fields: {sorted(self.fields)}")
        return self.fields[field]

    def shard_array(self, shard: int, field: str) -> np.ndarray:
        """Field ``field`` of shard ``shard``, memory-mapped read-only (loaded without pickle)."""
        key = (shard, field)
        array = self._maps.get(key)
        if array is None:
            self._field_info(field)
            info = self.shards[shard]["files"][field]
            path = self.path / info["file"]
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise CacheIntegrityError(f"cache file {str(path)!r} cannot be read as .npy: {err}") from None
            if array.dtype.str != info["dtype"] or list(array.shape) != info["shape"]:
                raise CacheIntegrityError(f"cache file {str(path)!r} holds {array.dtype.str} {list(array.shape)}, "
                                          f"the manifest records {info['dtype']} {info['shape']}")
            self._maps[key] = array
        return array

    def column(self, field: str) -> np.ndarray:
        """A per-row field for every row of the cache, in memory (concatenated over shards)."""
        if self._field_info(field)["per"] != "row":
            raise KeyError(f"{field!r} is a per-episode field; use episodes({field!r})")
        return np.concatenate([np.asarray(self.shard_array(s, field)) for s in range(len(self.shards))])

    def episodes(self, field: str) -> np.ndarray:
        """A per-episode field (``ep_*``) for every episode, in memory; ``ep_start`` becomes a cache row."""
        if self._field_info(field)["per"] != "episode":
            raise KeyError(f"{field!r} is a per-row field; use column({field!r})")
        parts = [np.asarray(self.shard_array(s, field)) for s in range(len(self.shards))]
        if field == "ep_start":
            parts = [p + self.row_offset[s] for s, p in enumerate(parts)]
        return np.concatenate(parts)

    def gather(self, field: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (cache row numbers, any order) of a per-row field, read from the memory maps."""
        info = self._field_info(field)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row indices must be in [0, {self.num_rows}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, *info["shape"]), dtype=np.dtype(info["dtype"]))
        shard = np.searchsorted(self.row_offset, rows, side="right") - 1
        if rows.size < 2 or np.all(rows[1:] >= rows[:-1]):
            # Sorted rows (every batch the datamodule gathers): each shard's rows are one block of ``out``, which
            # np.take fills in place; a fancy index would build each block and then copy it.
            bounds = np.searchsorted(shard, np.arange(len(self.shards) + 1))
            for s in np.unique(shard).tolist():
                lo, hi = int(bounds[s]), int(bounds[s + 1])
                np.take(self.shard_array(s, field), rows[lo:hi] - self.row_offset[s], axis=0, out=out[lo:hi])
            return out
        for s in np.unique(shard).tolist():
            mask = shard == s
            out[mask] = self.shard_array(s, field)[rows[mask] - self.row_offset[s]]
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps would be pickled as full copies
        return state

    def __repr__(self) -> str:
        return (f"TrajectoryCache({str(self.path)!r}: {self.num_episodes} episodes, {self.num_rows} rows, "
                f"versions {self.versions}, hooks {self.hook_points})")
