"""Fashion-MNIST as a LightningDataModule, read from the standard idx files.

The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-
ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are looked up, in order, in

1. ``root`` (and ``root/FashionMNIST/raw``, where torchvision downloads to), if given;
2. ``/usr/share/datasets/fashion-mnist`` - Debian's ``dataset-fashion-mnist`` package
   installs the four ``.gz`` files there, so ``apt-get install dataset-fashion-mnist``
   gives real data on machines without internet;
3. a download through ``torchvision.datasets.FashionMNIST`` into ``root`` (or ``data``)
   when ``download=True``.

The idx reader is our own (numpy, ~40 lines) so corrupt or truncated files fail with a
message naming the file instead of a reshape error deep inside torchvision.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tnexp.data.base import SplitDataModule
from tnexp.data.subsets import balanced_subset_indices
from tnexp.errors import InputFileError, TnexpError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "SYSTEM_DATA_DIRS",
    "FashionMNISTDataModule",
    "FashionTransform",
    "IdxFormatError",
    "find_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Split -> (images, labels) base names; each may also exist with a ".gz" suffix.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Searched after `root`; a module constant so tests (and odd installs) can replace it.
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
APT_PACKAGE = "dataset-fashion-mnist"
# Training-split pixel statistics (pixels in [0, 1]) of the 28x28 originals.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

# idx type byte -> big-endian numpy dtype (the format's definition).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(TnexpError, ValueError):
    """An idx file is corrupt, truncated or not the expected kind."""


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) into a numpy array in native byte order.

    Header: two zero bytes, a type byte, the number of dimensions, then one big-endian
    uint32 per dimension; the data follow, big-endian. Raises :class:`IdxFormatError` on
    a bad magic number, an unexpected dimensionality, or a size that does not match the
    header (truncated or padded file).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read()
        # Decide by content, not name: a renamed gz file still reads.
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise IdxFormatError(f"{path}: cannot decompress ({err}); the file is corrupt.") from err
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: only {len(raw)} bytes, too short for an idx header.")
    zero, type_code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        magic = int.from_bytes(raw[:4], "big")
        raise IdxFormatError(
            f"{path}: bad idx magic number 0x{magic:08x} (expected 0x00000801 for labels or "
            "0x00000803 for images); not an idx file, or corrupt."
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise IdxFormatError(f"{path}: idx file has {ndim} dimensions, expected {expect_ndim}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated inside the idx header.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: header says shape {shape} ({expected} data bytes) but the file has "
            f"{len(raw) - header}; the file is truncated or corrupt."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _file_in(directory: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _candidate_dirs(root: Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        # torchvision's download layout and the Debian folder name, below root.
        dirs += [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    dirs += list(SYSTEM_DATA_DIRS)
    return dirs


def find_fashion_mnist(
    root: str | Path | None = None,
) -> tuple[dict[str, Path] | None, list[str]]:
    """Locate the four idx files; returns ``(files, searched)``.

    ``files`` maps ``train_images``, ``train_labels``, ``test_images``, ``test_labels`` to
    paths, from the first directory that holds all four (raw preferred over ``.gz``), or is
    None. ``searched`` describes every directory looked at, for error messages.
    """
    searched: list[str] = []
    for directory in _candidate_dirs(Path(root).expanduser() if root is not None else None):
        found: dict[str, Path] = {}
        missing: list[str] = []
        for split, (images, labels) in FASHION_MNIST_FILES.items():
            for kind, base in (("images", images), ("labels", labels)):
                path = _file_in(directory, base)
                if path is None:
                    missing.append(base)
                else:
                    found[f"{split}_{kind}"] = path
        if not missing:
            return found, searched
        state = "does not exist" if not directory.is_dir() else f"lacks {', '.join(missing)}"
        searched.append(f"{directory} ({state})")
    return None, searched


@dataclass(frozen=True)
class FashionTransform:
    """Per-image pipeline: resize, (training) augmentation, normalisation.

    A small picklable object rather than a datamodule method, so DataLoader workers
    started with ``spawn`` do not receive a copy of both splits.
    """

    image_size: int = 28
    resize: str = "pad"
    crop_padding: int = 0
    horizontal_flip: bool = False
    mean: float | None = None  # None: no normalisation
    std: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 28, 28) in [0, 1] -> (1, S, S) float32."""
        x = self._resize(x)
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))  # zero = background, so pad before normalising
            i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[:, i : i + self.image_size, j : j + self.image_size]
        if self.horizontal_flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if size == x.shape[-1]:
            return x
        if self.resize == "pad" and size > x.shape[-1]:
            before = (size - x.shape[-1]) // 2
            after = size - x.shape[-1] - before
            return F.pad(x, (before, after, before, after))
        return F.interpolate(
            x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False
        ).squeeze(0)


class _FashionDataset(Dataset):
    """uint8 images in memory; the transform runs per item (cheap at 28x28)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: FashionTransform
    ) -> None:
        self.images = images  # (N, 28, 28) uint8
        self.targets = labels  # (N,) int64
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].to(torch.float32).div_(255.0).unsqueeze(0)
        return self.transform(x), self.targets[index]


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST (10 classes, 1 channel); the official 10k test split validates.

    Batches are ``(x, y)``: ``x`` float32 (B, 1, S, S) with ``S = image_size``, ``y`` int64.

    Args:
        root: directory with the idx files (searched first; also the download target).
        download: download through torchvision if no directory has the files.
        image_size: output side length; 28 keeps the originals, 32 fits CIFAR-style
            ResNets. Larger sizes zero-pad around the centre (``resize="pad"``, exact:
            the background is 0) or interpolate (``resize="bilinear"``).
        resize: ``pad`` or ``bilinear`` (smaller sizes always interpolate).
        augment: random crop of the ``crop_padding``-zero-padded image during training.
        crop_padding: padding of the random crop (0 disables the crop).
        horizontal_flip: random horizontal flips during training (off by default:
            Fashion-MNIST is usually trained without).
        normalize: subtract ``mean`` and divide by ``std`` (training-split statistics).
        mean, std: normalisation statistics.
        train_subset: keep this many training images, class-balanced and deterministic
            in ``seed`` (the paper-style 60k / 30k / 10k ablations).
        batch_size, num_workers, seed: as in the other datamodules.
    """

    num_classes: int = 10
    in_channels: int = 1
    name: str = "fashion_mnist"
    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | Path | None = None,
        download: bool = False,
        image_size: int = 28,
        resize: Literal["pad", "bilinear"] = "pad",
        augment: bool = True,
        crop_padding: int = 4,
        horizontal_flip: bool = False,
        normalize: bool = True,
        mean: float = FASHION_MNIST_MEAN,
        std: float = FASHION_MNIST_STD,
        train_subset: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if resize not in ("pad", "bilinear"):
            raise ValueError(f"resize must be 'pad' or 'bilinear', got {resize!r}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if normalize and std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be positive or null, got {train_subset}")
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root is not None else None
        self.download = bool(download)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.normalize = normalize
        self.mean = float(mean)
        self.std = float(std)
        self.train_subset = train_subset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

        self.files: dict[str, Path] | None = None
        self.train_indices: list[int] = []
        self.train_set: _FashionDataset | None = None
        self.val_set: _FashionDataset | None = None

    # ------------------------------------------------------------------ description
    def augmentation(self) -> str:
        """Human-readable description of the training-time augmentation."""
        steps = []
        if self.augment and self.crop_padding > 0:
            steps.append(f"random_crop{self.image_size}_pad{self.crop_padding}")
        if self.augment and self.horizontal_flip:
            steps.append("hflip")
        return "+".join(steps) or "none"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the tensors this module yields (for cache checks)."""
        return {
            "name": self.name,
            "split": {"train": "train", "val": "t10k"},
            "image_size": self.image_size,
            "resize": self.resize if self.image_size != 28 else "none",
            "augmentation": self.augmentation(),
            "normalization": {"mean": self.mean, "std": self.std} if self.normalize else None,
            "train_subset": self.train_subset,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ files
    def _download_root(self) -> Path:
        return self.root if self.root is not None else Path("data")

    def locate(self) -> dict[str, Path]:
        """Find (or, with ``download=True``, fetch) the idx files; clear error otherwise."""
        files, searched = find_fashion_mnist(self.root)
        if files is None and self.download:
            from torchvision.datasets import FashionMNIST

            # torchvision puts the .gz files and their extracted copies in <root>/FashionMNIST/raw.
            FashionMNIST(str(self._download_root()), train=True, download=True)
            files, more = find_fashion_mnist(self._download_root())
            searched += more
        if files is None:
            looked = "\n  ".join(searched)
            names = ", ".join(b for pair in FASHION_MNIST_FILES.values() for b in pair)
            raise InputFileError(
                f"Fashion-MNIST idx files ({names}, raw or .gz) not found. Looked in:\n  "
                f"{looked}\nFix one of: `apt-get install {APT_PACKAGE}` (Debian/Ubuntu; "
                f"installs them in {SYSTEM_DATA_DIRS[0]}); set data.root to a directory "
                "that holds them; or run with data.download=true on a machine with internet."
            )
        return files

    def prepare_data(self) -> None:
        """Download only if asked to and no directory has the files."""
        if self.download:
            self.locate()

    # ------------------------------------------------------------------ transforms
    def train_transform(self) -> FashionTransform:
        """Resize, augmentation (if enabled) and normalisation for training images."""
        return FashionTransform(
            image_size=self.image_size,
            resize=self.resize,
            crop_padding=self.crop_padding if self.augment else 0,
            horizontal_flip=self.horizontal_flip and self.augment,
            mean=self.mean if self.normalize else None,
            std=self.std,
        )

    def eval_transform(self) -> FashionTransform:
        """Resize and normalisation only."""
        return FashionTransform(
            image_size=self.image_size,
            resize=self.resize,
            mean=self.mean if self.normalize else None,
            std=self.std,
        )

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: str | None = None) -> None:
        """Read both splits into memory (idempotent)."""
        if self.train_set is not None:
            return
        self.files = self.locate()
        splits = {}
        for split in ("train", "test"):
            images = read_idx(self.files[f"{split}_images"], expect_ndim=3)
            labels = read_idx(self.files[f"{split}_labels"], expect_ndim=1)
            if len(images) != len(labels):
                raise IdxFormatError(
                    f"{self.files[f'{split}_images']} has {len(images)} images but "
                    f"{self.files[f'{split}_labels']} has {len(labels)} labels."
                )
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise IdxFormatError(
                    f"{self.files[f'{split}_labels']}: labels outside 0..{self.num_classes - 1}."
                )
            splits[split] = (
                torch.from_numpy(images.astype(np.uint8)),
                torch.from_numpy(labels.astype(np.int64)),
            )
        x_train, y_train = splits["train"]
        if self.train_subset is not None:
            self.train_indices = balanced_subset_indices(
                y_train.numpy(), self.train_subset, self.seed
            )
            x_train, y_train = x_train[self.train_indices], y_train[self.train_indices]
        else:
            self.train_indices = list(range(len(y_train)))
        self.train_set = _FashionDataset(x_train, y_train, self.train_transform())
        self.val_set = _FashionDataset(*splits["test"], self.eval_transform())
