"""CIFAR-10 / CIFAR-100 LightningDataModules over ``torchvision.datasets.CIFAR10/100``.

The official test split serves as the validation set (as in the paper), the training
split can be cut to a deterministic, class-balanced subset (the paper's 10k / 30k / 50k
ablations), and training images get the usual augmentation (random 32x32 crop of the
4-pixel zero-padded image, horizontal flip).

Files are read from ``<root>/cifar-10-batches-py`` / ``<root>/cifar-100-python`` (the
extracted official python archives). Nothing is downloaded unless ``download=True``.
torchvision verifies every file's md5 against the official archive before loading; tests
that use small fake batches in the real pickle layout therefore replace
``torchvision.datasets.cifar.check_integrity`` by an existence check (see
``tests/test_vision_data.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset, Subset

from tnexp.data.base import SplitDataModule
from tnexp.data.subsets import balanced_subset_indices
from tnexp.errors import InputFileError

__all__ = [
    "CIFAR_STATS",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
]

# Per-channel mean / std of each training split (pixels scaled to [0, 1]). These are the
# exact population statistics; the often-copied (0.2023, 0.1994, 0.2010) std is not.
CIFAR_STATS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# What torchvision expects under `root`, per variant: folder, train files, test files, meta.
_LAYOUT: dict[int, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    10: (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
    ),
    100: ("cifar-100-python", ("train",), ("test",), "meta"),
}
_ARCHIVES = {10: "cifar-10-python.tar.gz", 100: "cifar-100-python.tar.gz"}
_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100 (``variant``) with the paper's train / validation protocol.

    Batches are ``(x, y)``: ``x`` float32 (B, 3, 32, 32) normalised with the per-channel
    CIFAR mean/std, ``y`` int64. ``val_dataloader`` and ``test_dataloader`` both serve the
    official 10k test split, without augmentation.

    Args:
        variant: 10 or 100.
        root: directory that holds (or will receive) ``cifar-10-batches-py`` /
            ``cifar-100-python``. Pointing it at that folder itself also works.
        download: fetch the official archive if the files are missing (needs internet).
        batch_size: batch size of every loader.
        num_workers: DataLoader workers (persistent when > 0).
        seed: seeds the training subset and the training-loader shuffle.
        train_subset: if set, keep this many training images, class-balanced and
            deterministic in ``seed`` (nested: the 10k subset lies inside the 30k one).
        augment: random crop (padding 4) + horizontal flip on training images. Turn off to
            capture a feature cache, which freezes one pass over the data.
    """

    in_channels: int = 3

    def __init__(
        self,
        variant: Literal[10, 100] = 10,
        root: str | Path = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        augment: bool = True,
    ) -> None:
        super().__init__()
        variant = int(variant)  # type: ignore[assignment]
        if variant not in _LAYOUT:
            raise ValueError(f"variant must be 10 or 100, got {variant!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be positive or null, got {train_subset}")
        self.save_hyperparameters()
        self.variant = variant
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_subset = train_subset
        self.augment = augment
        self.mean, self.std = CIFAR_STATS[variant]

        self.train_indices: list[int] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # ------------------------------------------------------------------ description
    @property
    def num_classes(self) -> int:
        return self.variant

    @property
    def name(self) -> str:
        return f"cifar{self.variant}"

    @property
    def folder_name(self) -> str:
        """The folder torchvision reads under ``root`` (``cifar-10-batches-py``, ...)."""
        return _LAYOUT[self.variant][0]

    def augmentation(self) -> str:
        """Human-readable description of the training-time augmentation."""
        return "random_crop32_pad4+hflip" if self.augment else "none"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the tensors this module yields (for cache checks)."""
        return {
            "name": self.name,
            "split": {"train": "train", "val": "test"},
            "train_subset": self.train_subset,
            "augmentation": self.augmentation(),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ files
    def _data_root(self) -> Path:
        # Accept root pointing at the extracted folder itself (a common mistake).
        if self.root.name == self.folder_name and not (self.root / self.folder_name).exists():
            return self.root.parent
        return self.root

    def missing_files(self) -> list[Path]:
        """Expected files under ``root`` that do not exist (empty when complete)."""
        folder, train, test, meta = _LAYOUT[self.variant]
        base = self._data_root() / folder
        return [base / f for f in (*train, *test, meta) if not (base / f).is_file()]

    def _missing_error(self, missing: list[Path]) -> FileNotFoundError:
        base = self._data_root() / self.folder_name
        names = ", ".join(p.name for p in missing)
        return InputFileError(
            f"CIFAR-{self.variant} not found: looked in {base.resolve()} (folder "
            f"'{self.folder_name}' under data.root={self.root}); missing {names}. "
            "Fix one of: run with data.download=true on a machine with internet access; or "
            f"copy the extracted official archive ({_ARCHIVES[self.variant]} from {_URL}, "
            f"which unpacks to '{self.folder_name}/') into {self._data_root().resolve()}; "
            "or set data.root to the directory that contains it."
        )

    def prepare_data(self) -> None:
        """Download the official archive if asked to and the files are missing."""
        if self.download and self.missing_files():
            self._torchvision_class()(str(self._data_root()), train=True, download=True)

    def _torchvision_class(self) -> type:
        from torchvision.datasets import CIFAR10, CIFAR100

        return CIFAR10 if self.variant == 10 else CIFAR100

    def _load(self, train: bool, transform: Any) -> Dataset:
        try:
            return self._torchvision_class()(
                str(self._data_root()), train=train, transform=transform, download=False
            )
        except RuntimeError as err:
            # torchvision says "not found or corrupted" for both; by now the files exist,
            # so only the md5 check can have failed.
            raise RuntimeError(
                f"CIFAR-{self.variant} files under {self._data_root() / self.folder_name} "
                "exist but fail torchvision's md5 check (partial copy, or not the official "
                "python-version archive). Re-copy the extracted archive, or delete the folder "
                f"and use data.download=true. torchvision said: {err}"
            ) from err

    # ------------------------------------------------------------------ datasets
    def train_transform(self) -> Any:
        from torchvision import transforms as T

        steps: list[Any] = []
        if self.augment:
            steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def eval_transform(self) -> Any:
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def setup(self, stage: str | None = None) -> None:
        """Open both splits (idempotent). Downloads here too when ``download=True``,
        because some callers (feature capture) set up a datamodule without a Trainer."""
        if self.train_set is not None:
            return
        missing = self.missing_files()
        if missing and self.download:
            self.prepare_data()
            missing = self.missing_files()
        if missing:
            raise self._missing_error(missing)
        train_full = self._load(True, self.train_transform())
        self.val_set = self._load(False, self.eval_transform())
        if self.train_subset is not None:
            self.train_indices = balanced_subset_indices(
                train_full.targets, self.train_subset, self.seed
            )
            self.train_set = Subset(train_full, self.train_indices)
        else:
            self.train_indices = list(range(len(train_full)))
            self.train_set = train_full


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (10 classes); see :class:`CIFARDataModule` for the arguments."""

    def __init__(self, root: str | Path = "data", **kwargs: Any) -> None:
        super().__init__(variant=10, root=root, **kwargs)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (100 fine classes); see :class:`CIFARDataModule` for the arguments."""

    def __init__(self, root: str | Path = "data", **kwargs: Any) -> None:
        super().__init__(variant=100, root=root, **kwargs)
