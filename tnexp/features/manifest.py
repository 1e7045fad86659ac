"""The feature cache's on-disk format: manifest, shard records, errors, unfinished captures."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tnexp.errors import IntegrityError, TnexpError
from tnexp.integrity import canonical_json
from tnexp.rundir import pid_alive
from tnexp.slicing import SlicePlan

__all__ = [
    "CACHE_DTYPES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MASK_KEY",
    "READABLE_VERSIONS",
    "FeatureCacheError",
    "FeatureCacheIntegrityError",
    "FeatureCacheManifest",
    "ShardInfo",
    "cache_remedy",
    "clean_partials",
    "normalize_identity",
    "partial_dir_name",
    "partial_dirs",
    "read_manifest",
]

# 2: text batches' attention masks are stored (``MASK_KEY`` in every shard) and the manifest
# records whether the capture had them; version-1 caches are read, their masks unknown.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
MASK_KEY = "attention_mask"
CACHE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def cache_remedy(directory: Path) -> str:
    """The fix for a cache that cannot be used: options that exist, and the exact path."""
    return (
        f"recapture it with method.cache.overwrite=true (overwrite=True in Python), or delete "
        f"it: rm -rf {directory}"
    )


class FeatureCacheError(TnexpError, RuntimeError):
    """A feature cache that is missing, incomplete, corrupt, or does not match the request."""


class FeatureCacheIntegrityError(FeatureCacheError, IntegrityError):
    """Cached data that fails its checksum, or non-finite features refused at capture."""


@dataclass
class ShardInfo:
    file: str
    num_samples: int
    bytes: int
    sha256: str  # of the whole file (verify_checksums=true re-hashes it)
    # Per-tensor checksums (tnexp.integrity), verified when a tensor is first read; None in
    # caches written before they existed (the whole file is verified instead).
    checksums: dict[str, str] | None = None


@dataclass
class FeatureCacheManifest:
    """What a feature cache holds and what produced it (``manifest.json``)."""

    format_version: int
    teacher_fingerprint: str
    dataset_identity: dict[str, Any]
    plan: dict[str, Any]
    dtype: str
    num_samples: int
    shards: list[ShardInfo]
    features: dict[str, dict[str, list[int]]]  # slice -> per-sample input/output shapes
    labels: dict[str, Any] | None  # {"dtype", "shape"} per sample, None without labels
    created: str
    tnexp_version: str
    # {"dtype", "shape"} per sample when the captured batches had an attention mask (stored
    # under MASK_KEY), None when they had none; not recorded by version 1.
    attention_mask: dict[str, Any] | None = None

    @property
    def masks_recorded(self) -> bool:
        """Whether the cache says if its batches had attention masks (format version >= 2)."""
        return self.format_version >= 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.masks_recorded:  # a version-1 manifest keeps its own fields (and hash)
            data.pop("attention_mask")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureCacheManifest:
        data = dict(data)
        data["shards"] = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in data["shards"]]
        return cls(**data)

    def hash(self) -> str:
        """sha256 of the canonical JSON: per-slice jobs record it to prove a shared cache."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()

    def slice_plan(self) -> SlicePlan:
        return SlicePlan.from_dict(self.plan)


def normalize_identity(identity: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON round trip, so tuples vs lists and key order never cause false mismatches."""
    return json.loads(canonical_json(dict(identity or {})))


def partial_dirs(directory: Path) -> list[Path]:
    return sorted(directory.parent.glob(f"{directory.name}.partial-*"))


def partial_dir_name(directory: Path) -> Path:
    # Host and PID in the name tell a later run whether the capture that wrote it is dead.
    host = socket.gethostname().replace("-", "_")
    suffix = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return directory.parent / f"{directory.name}.partial-{suffix}"


def clean_partials(directory: str | Path) -> list[Path]:
    """Remove ``<directory>.partial-*`` left by killed captures on this host; report others.

    Returns the removed paths. Leftovers of live captures, or of other hosts (whose PIDs
    cannot be checked from here), are kept and logged with the command that removes them.
    """
    log = logging.getLogger("tnexp")
    directory = Path(directory)
    host = socket.gethostname().replace("-", "_")
    removed = []
    for partial in partial_dirs(directory):
        parts = partial.name.rsplit(".partial-", 1)[1].rsplit("-", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if parts[0] == host and pid is not None and not pid_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
            log.warning("removed %s, left by a killed feature capture (PID %d)", partial, pid)
        else:
            log.warning(
                "%s is an unfinished feature capture of another live process or host; if "
                "that capture is dead, remove it: rm -rf %s",
                partial,
                partial,
            )
    return removed


# =========================================================================== open / verify
def read_manifest(directory: Path) -> FeatureCacheManifest:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        partials = partial_dirs(directory)
        where = (
            f" Unfinished capture directories: {[p.name for p in partials]}." if partials else ""
        )
        state = "exists but has" if directory.is_dir() else "does not exist, so there is"
        raise FeatureCacheError(
            f"no complete feature cache at {directory}: it {state} no {MANIFEST_FILE} (the "
            f"manifest is written last, so the capture never ran, is still running, or was "
            f"interrupted: an incomplete capture).{where} Re-run the capture (it removes "
            "leftover *.partial-* directories of killed captures on this host; the .lock file "
            "beside the cache is reused and harmless)."
        )
    try:
        data = json.loads(path.read_text())
        version = data.get("format_version") if isinstance(data, dict) else None
        if version is not None and version not in READABLE_VERSIONS:
            raise FeatureCacheError(
                f"feature cache {directory} has format version {version}, this tnexp reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}; {cache_remedy(directory)}."
            )
        manifest = FeatureCacheManifest.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as err:
        raise FeatureCacheError(
            f"{path} is unreadable or corrupt ({type(err).__name__}: {err}); "
            f"{cache_remedy(directory)}."
        ) from None
    return manifest
