"""The `tnexp` command: a Hydra app over configs/ (see configs/train.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
if not Path(CONFIG_DIR).is_dir():  # installed as a wheel: configs ship inside the package
    CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    from tnexp.run import run

    run(cfg)


def main() -> None:
    # W&B stays offline unless the user asks otherwise; HF libraries must not try the hub.
    os.environ.setdefault("WANDB_SILENT", "true")
    _app()


if __name__ == "__main__":
    main()
