"""Read an offline W&B run (``offline-run-*/run-*.wandb``) without uploading anything.

Recent wandb versions keep an offline run's config and summary only in this transaction
log (a LevelDB-style log of protobuf records), not in ``files/``; ``wandb sync`` replays it.
"""

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768  # LevelDB log block size
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""  # ":W&B", a 2-byte magic number and a version byte
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block ends in padding when no record header fits
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """``group``, ``tags``, ``name``, ``config`` and final ``summary`` of an offline run."""
    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "summary": {}}
    for data in _records(log_file):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(
                group=record.run.run_group,
                tags=list(record.run.tags),
                name=record.run.display_name,
            )
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                if item.key:
                    out["summary"][item.key] = json.loads(item.value_json)
    return out
