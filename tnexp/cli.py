"""The `tnexp` command: a Hydra app over configs/ (see configs/train.yaml)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

if TYPE_CHECKING:
    from tnexp.restore import SavedRun

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
if not Path(CONFIG_DIR).is_dir():  # installed as a wheel: configs ship inside the package
    CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")

# The config a run folder was started with, read before Hydra rewrites its .hydra/
# (`hydra.run.dir=<dir> resume=auto`; tnexp/restore.py).
_SAVED_RUN: SavedRun | None = None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    from tnexp.console import setup_output
    from tnexp.run import run

    setup_output()
    if _SAVED_RUN is not None:
        from hydra.core.hydra_config import HydraConfig

        from tnexp.restore import restore_config

        cfg = restore_config(cfg, _SAVED_RUN, list(HydraConfig.get().overrides.task))
    run(cfg)


def main() -> None:
    global _SAVED_RUN
    from tnexp.config import check_experiment_overrides
    from tnexp.restore import saved_run

    # W&B stays offline unless the user asks otherwise; HF libraries must not try the hub.
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        check_experiment_overrides(sys.argv[1:], CONFIG_DIR)
        _SAVED_RUN = saved_run(sys.argv[1:])
    except ValueError as err:  # before Hydra starts: no run folder for a run that cannot run
        print(f"tnexp: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        _app()
    finally:
        _SAVED_RUN = None  # belongs to this command only (main() may run again in-process)


if __name__ == "__main__":
    main()
