"""The on-disk trajectory cache: collection from an agent and its noisy versions, the format, the reader.

- :mod:`innercritic.cache.collect` plays episodes with one forward pass per step and writes shards;
- :mod:`innercritic.cache.format` holds the manifest, the atomic shard writer and the verified,
  memory-mapped reader.
"""

from innercritic.cache.collect import (
    ACTIVATION_DTYPES,
    RowBuffers,
    agent_fingerprint,
    build_cache,
    build_cache_from_checkpoint,
    cache_status,
    discounted_returns,
    make_request,
    plan_shards,
    rollout_shard,
)
from innercritic.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    CacheError,
    GatheredRows,
    CacheIntegrityError,
    CacheMismatchError,
    TrajectoryCache,
    diff_requests,
    file_sha256,
)

__all__ = [
    "ACTIVATION_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "CacheError",
    "GatheredRows",
    "CacheIntegrityError",
    "CacheMismatchError",
    "RowBuffers",
    "TrajectoryCache",
    "agent_fingerprint",
    "build_cache",
    "build_cache_from_checkpoint",
    "cache_status",
    "diff_requests",
    "discounted_returns",
    "file_sha256",
    "make_request",
    "plan_shards",
    "rollout_shard",
]
