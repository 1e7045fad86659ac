"""A DataModule wrapper whose training data follows the training phase.

Local phases may read teacher features from a disk cache and use their own batch size
(the paper: local bs 8, global bs 16/64); validation always uses the task data, so every
method is measured the same way.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader


class PhasedDataModule(L.LightningDataModule):
    """Delegates to ``base``; the local phase can swap in a feature-cache loader."""

    def __init__(self, base: L.LightningDataModule, feature_cache: Any | None = None):
        super().__init__()
        self.base = base
        self.feature_cache = feature_cache  # a FeatureCacheDataset, or None for online
        self.phase = "global"
        self.default_batch_size = int(getattr(base, "batch_size", 32))
        self.batch_size = self.default_batch_size

    def set_phase(self, method: str, batch_size: int | None) -> None:
        self.phase = method
        self.batch_size = int(batch_size or self.default_batch_size)

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.base.setup(stage)

    def train_dataloader(self) -> DataLoader:
        if self.phase == "local" and self.feature_cache is not None:
            from tnexp.features import ShardGroupedSampler, collate_features

            return DataLoader(
                self.feature_cache,
                batch_size=self.batch_size,
                sampler=ShardGroupedSampler(self.feature_cache, shuffle=True),
                collate_fn=collate_features,
                num_workers=0,
            )
        self.base.batch_size = self.batch_size
        return self.base.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.base.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.base.test_dataloader()

    def identity(self) -> dict[str, Any]:
        return self.base.identity()

    def __getattr__(self, name: str) -> Any:
        # num_classes, in_channels, ... of the wrapped module
        base = self.__dict__.get("base")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)
