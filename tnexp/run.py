"""What the `tnexp` command does: dispatch ``method=<name>`` to its stage (tnexp/stages/).

Training methods (pretrain, local, global, hybrid) run :func:`tnexp.stages.train.run_stage`;
the commands quickstart, profile, analyze, capture and assemble run their own stage.
Every stage writes its outputs into ``paths.output_dir`` (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from tnexp.analysis.stage import run_analyze
from tnexp.errors import ConfigError
from tnexp.stages.assemble import run_assemble
from tnexp.stages.capture import run_capture
from tnexp.stages.profile import run_profile
from tnexp.stages.quickstart import run_quickstart
from tnexp.stages.train import METHODS, run_stage

__all__ = ["COMMANDS", "METHODS", "run", "run_stage"]

# method=<name> values that are commands rather than training methods, and their stages.
COMMANDS: dict[str, Callable[[DictConfig], Any]] = {
    "quickstart": run_quickstart,
    "profile": run_profile,
    "analyze": run_analyze,  # bond spectra and entropy: tnexp/analysis/
    "capture": run_capture,  # slice-parallel local: the shared feature cache
    "assemble": run_assemble,  # slice-parallel local: the student from the jobs
}


def run(cfg: DictConfig) -> dict[str, Any] | list[dict[str, Any]]:
    """Run the stage that ``cfg.method.name`` names; returns what it wrote (results)."""
    name = str(cfg.method.name)
    if name in COMMANDS:
        return COMMANDS[name](cfg)
    if name in METHODS:
        return run_stage(cfg)
    raise ConfigError(
        f"unknown method {name!r}; choose a training method ({', '.join(METHODS)}) or a "
        f"command ({', '.join(COMMANDS)})."
    )
