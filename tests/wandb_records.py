"""Read an offline W&B run file (``run-<id>.wandb``) back, for tests that check what a run logged.

wandb (0.31) ships no Python reader for its transaction log, so this decodes the format directly: a
7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log framing (32 KiB blocks; each
chunk has a crc32c, a length and a type FULL / FIRST / MIDDLE / LAST), each record one serialised
``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file (header {ident!r} {magic:#x})")
    pos, parts = 7, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block  # zero padding to the end of the block
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            parts = chunk
        elif kind == _FIRST:
            parts = chunk
            continue
        elif kind == _MIDDLE:
            parts += chunk
            continue
        elif kind == _LAST:
            parts += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(parts)
        yield record


def history_keys(path: str | Path) -> set[str]:
    """Every key that appears in the run's logged history."""
    keys: set[str] = set()
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                keys.add(item.key or "/".join(item.nested_key))
    return keys


def run_file(wandb_dir: str | Path) -> Path:
    """The single ``run-*.wandb`` file under a run's ``wandb/`` folder."""
    found = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
    if len(found) != 1:
        raise AssertionError(f"expected one offline W&B run under {wandb_dir}, found {[str(f) for f in found]}")
    return found[0]
