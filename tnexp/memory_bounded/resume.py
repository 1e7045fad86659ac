"""Resume bookkeeping of a memory-bounded run: which stages of this exact setup are trained."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tnexp.integrity import atomic_write_json
from tnexp.memory_bounded.config import MANIFEST, BlockwiseError, StageStats

__all__ = ["StageManifest", "setup_fingerprint"]


def setup_fingerprint(setup: Mapping[str, Any]) -> str:
    """sha256 of everything that decides a stage's result (plan, schedule, settings, data)."""
    # Not tnexp.integrity.canonical_json: its compact separators would change the hash that
    # existing work_dirs recorded, and they could no longer be resumed.
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()


class StageManifest:
    """``work_dir/blockwise.json``: the setup fingerprint and the stages trained under it.

    Trained stages of another setup are refused when resuming (they would be wrong), and
    overwritten otherwise.
    """

    def __init__(self, work_dir: Path, fingerprint: str, resume: bool) -> None:
        self.path = work_dir / MANIFEST
        self.data: dict[str, Any] = {"fingerprint": fingerprint, "stages": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if resume and old.get("fingerprint") == fingerprint:
                self.data = old
            elif resume and old.get("stages"):
                raise BlockwiseError(
                    f"{work_dir} holds trained stages of another setup (data, plan, schedule or "
                    "tensorization differ), so they cannot be resumed; use another work_dir or "
                    "delete it."
                )
        self.save()

    def done(self, stage_name: str) -> dict[str, Any] | None:
        """The record of a stage trained under this setup (file, losses, steps), if any."""
        return self.data["stages"].get(stage_name)

    def record(self, stat: StageStats, file: Path) -> None:
        self.data["stages"][stat.stage.name] = {
            "file": file.name,
            "losses": stat.losses,
            "steps": stat.steps,
        }
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)
