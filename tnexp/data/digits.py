"""scikit-learn's 8x8 handwritten digits as a LightningDataModule.

The digits ship inside scikit-learn (1797 images, 10 classes), so this is the one real
image dataset that works everywhere without downloads: tests, CPU smoke runs and the
quick-start all use it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tnexp.data.base import SplitDataModule
from tnexp.data.subsets import balanced_subset_indices, stratified_split_indices

__all__ = ["DigitsDataModule"]


class DigitsDataModule(SplitDataModule):
    """Stratified train/val split of ``sklearn.datasets.load_digits``.

    Images are upsampled bilinearly from 8x8 to ``image_size`` (so ResNets with three
    stride-2 stages keep some spatial extent) and normalised with the mean/std of the
    training split. Batches are ``(x, y)`` with ``x`` float32 of shape (B, 1, S, S) and
    ``y`` int64. There is no separate test split: ``test_dataloader`` serves the
    validation set.

    Args:
        batch_size: batch size of every loader.
        val_fraction: fraction of the 1797 images held out for validation (stratified).
        seed: seeds the split, the training subset and the training-loader shuffle.
        num_workers: DataLoader workers (0 is fastest for this tiny in-memory dataset).
        image_size: side length after bilinear upsampling (8 = no resampling).
        train_subset: if set, keep only this many training images, class-balanced and
            deterministic in ``seed`` (the validation set is unaffected).
    """

    num_classes: int = 10
    in_channels: int = 1
    name: str = "sklearn_digits"

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        image_size: int = 16,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.image_size = image_size
        self.train_subset = train_subset

        self.train_indices: list[int] = []
        self.val_indices: list[int] = []
        self.mean: float = float("nan")
        self.std: float = float("nan")
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def identity(self) -> dict[str, Any]:
        """Everything that determines the tensors this module yields (for cache checks)."""
        return {
            "name": self.name,
            "image_size": self.image_size,
            "interpolation": "bilinear",
            "normalization": "train_mean_std",
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "train_subset": self.train_subset,
        }

    def setup(self, stage: str | None = None) -> None:
        """Load, split, resize and normalise (idempotent; cheap, so no disk caching)."""
        if self.train_set is not None:
            return
        # Imported lazily: scikit-learn is only needed by this datamodule.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)

        train_idx, val_idx = stratified_split_indices(labels.numpy(), self.val_fraction, self.seed)
        if self.train_subset is not None:
            # Indices returned are positions inside the training split; map them back.
            picked = balanced_subset_indices(
                labels[train_idx].numpy(), self.train_subset, self.seed
            )
            train_idx = [train_idx[i] for i in picked]
        self.train_indices, self.val_indices = train_idx, val_idx

        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
            )
        x_train, x_val = images[train_idx], images[val_idx]
        # Statistics from the (possibly subsetted) training split only: no val leakage.
        # float64 so the reduction is exact enough to be reproducible bit-for-bit.
        self.mean = float(x_train.double().mean())
        self.std = float(x_train.double().std())
        x_train = ((x_train - self.mean) / self.std).contiguous()
        x_val = ((x_val - self.mean) / self.std).contiguous()
        self.train_set = TensorDataset(x_train, labels[train_idx])
        self.val_set = TensorDataset(x_val, labels[val_idx])
