"""One place for file integrity: checksums and atomic writes.

Checksums are ``"<algorithm>:<hex>"`` strings. New files use xxHash's XXH3-128 (about
10 GB/s on one core, so verifying data on every read costs little); a bare 64-digit hex
string is the SHA-256 written by older tnexp versions and still verifies.

Atomic writes go to a temporary file in the same directory, are fsynced, then renamed
over the target: a reader sees the old file or the complete new one, never a partial
write, even if the writer is killed half-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import xxhash

__all__ = [
    "CHECKSUM_ALGORITHM",
    "atomic_write_bytes",
    "atomic_write_json",
    "bytes_checksum",
    "canonical_json",
    "checksum_matches",
    "file_checksum",
    "fsync_dir",
    "sha256_file",
    "tensor_checksum",
]

CHECKSUM_ALGORITHM = "xxh3_128"
_CHUNK = 1 << 22


def canonical_json(data: Any) -> str:
    """Compact JSON with sorted keys: equal data gives equal text, hence equal hashes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def bytes_checksum(data: bytes | memoryview) -> str:
    """Checksum of an in-memory buffer."""
    return f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


def tensor_checksum(tensor: torch.Tensor) -> str:
    """Checksum of a tensor's raw bytes (any dtype: hashed through a uint8 view)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if not flat.numel():
        return bytes_checksum(b"")
    return bytes_checksum(memoryview(flat.view(torch.uint8).numpy()))


def file_checksum(path: str | Path) -> str:
    """Checksum of a file, read in chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (the format of checksums written before XXH3 was used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def checksum_matches(path: str | Path, recorded: str | None) -> bool:
    """Whether ``path`` has the recorded checksum (either format); ``None`` never matches."""
    if not recorded:
        return False
    if ":" not in recorded:  # legacy: bare SHA-256 hex
        return sha256_file(path) == recorded
    algorithm = recorded.split(":", 1)[0]
    if algorithm != CHECKSUM_ALGORITHM:
        return False
    return file_checksum(path) == recorded


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(str(directory), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """:func:`atomic_write_bytes` of ``data`` as indented JSON (``dumps``: json.dumps options)."""
    options = {"indent": 2, "default": str, **dumps}
    return atomic_write_bytes(path, (json.dumps(data, **options) + "\n").encode())
