"""One place for composing fast Hydra stage configs in tests (small digits runs)."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tnexp.config import CONFIG_DIR

# One short epoch on 8x8 digits with a width-8 ResNet: a stage takes a few seconds.
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "callbacks.progress_bar=none",
    "data.image_size=8",
    "model.width=8",
]


def make_cfg(
    tmp: Path, *overrides: str, fast: bool = True, cache_dir: Path | None = None
) -> DictConfig:
    """The composed `train` config writing into ``tmp`` (FAST first, then ``overrides``)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *(FAST if fast else []),
                f"paths.output_dir={tmp}",
                f"paths.cache_dir={cache_dir or tmp / 'cache'}",
                *overrides,
            ],
        )
