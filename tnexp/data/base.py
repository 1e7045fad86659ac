"""The loaders every tnexp DataModule shares: one place for shuffling and worker settings."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(L.LightningDataModule):
    """A DataModule with a training and a validation split (the test loader reuses it).

    Subclasses set ``train_set`` / ``val_set`` in ``setup`` and ``batch_size``,
    ``num_workers`` and ``seed`` in ``__init__``.
    """

    train_set: Dataset | None = None
    val_set: Dataset | None = None
    batch_size: int
    num_workers: int
    seed: int

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before requesting dataloaders")
        # A seeded generator makes the shuffle order reproducible even without
        # seed_everything(); each epoch still gets a new order as the generator advances.
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (augmented where the data set augments)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation loader, fixed order, no augmentation."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same as the validation loader (the paper validates on the official test split)."""
        return self._loader(self.val_set, shuffle=False)
