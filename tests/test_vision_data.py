"""CIFAR-10/100 and Fashion-MNIST datamodules on small fake data in the real file formats.

CIFAR: the fake batches are pickled exactly like the official python archives (Python 2
pickles: `str` keys that load as ``b"data"`` with ``encoding="bytes"``, a uint8
``(N, 3072)`` array of R, G, B planes, ``labels`` / ``fine_labels`` lists, the meta files
with ``label_names`` / ``fine_label_names``). torchvision checks each file's md5 against
the official archive (``CIFAR10._check_integrity`` and ``_load_meta`` both call
``torchvision.datasets.cifar.check_integrity``), so the ``accept_fake_cifar`` fixture
replaces that one function by an existence check - only inside these tests; the real
loader code runs otherwise unchanged.

Fashion-MNIST: fake idx files, raw and gzip, written by the format's definition.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tnexp.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
    FashionMNISTDataModule,
)
from tnexp.data import fashion_mnist as fm
from tnexp.data.cifar import CIFAR_STATS
from tnexp.data.fashion_mnist import IdxFormatError, find_fashion_mnist, read_idx


# ======================================================================= CIFAR fakes
class _Py2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` as Python 2 ``str`` opcodes, like the official files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _dump(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _images(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def make_fake_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> dict:
    """5 training batches + test batch + meta; labels cycle through the 10 classes."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = []
    for b in range(1, 6):
        data = _images(per_batch, rng)
        labels = [(i + b) % 10 for i in range(per_batch)]
        train.append((data, labels))
        _dump(
            {
                "batch_label": f"training batch {b} of 5",
                "labels": labels,
                "data": data,
                "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
            },
            folder / f"data_batch_{b}",
        )
    test_data, test_labels = _images(n_test, rng), [i % 10 for i in range(n_test)]
    _dump(
        {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data,
         "filenames": [f"t_{i}.png" for i in range(n_test)]},
        folder / "test_batch",
    )  # fmt: skip
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    _dump(
        {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072},
        folder / "batches.meta",
    )
    return {
        "train_data": np.concatenate([d for d, _ in train]),
        "train_labels": [label for _, labels in train for label in labels],
        "test_data": test_data,
        "test_labels": test_labels,
    }


def make_fake_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> dict:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data, fine = _images(n, rng), [i % 100 for i in range(n)]
        _dump(
            {"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": split,
             "fine_labels": fine, "coarse_labels": [c // 5 for c in fine], "data": data},
            folder / split,
        )  # fmt: skip
        out[f"{split}_data"], out[f"{split}_labels"] = data, fine
    _dump(
        {"fine_label_names": [f"fine_{i}" for i in range(100)],
         "coarse_label_names": [f"coarse_{i}" for i in range(20)]},
        folder / "meta",
    )  # fmt: skip
    return out


@pytest.fixture
def accept_fake_cifar(monkeypatch):
    """Skip torchvision's md5 comparison with the official archive (files must exist)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def cifar10(tmp_path, accept_fake_cifar):
    return tmp_path, make_fake_cifar10(tmp_path)


def _normalised(row: np.ndarray, variant: int) -> torch.Tensor:
    """What the eval transform must produce from one raw 3072-byte CIFAR row."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR_STATS[variant])
    x = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32)) / 255.0
    return (x - mean) / std


# ======================================================================= CIFAR tests
def test_fake_cifar_matches_official_pickle_layout(tmp_path):
    make_fake_cifar10(tmp_path)
    make_fake_cifar100(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # how the CIFAR web page says to read it
    assert {b"data", b"labels", b"batch_label", b"filenames"} <= set(batch)
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (20, 3072)
    with open(tmp_path / "cifar-100-python" / "meta", "rb") as f:
        assert len(pickle.load(f, encoding="bytes")[b"fine_label_names"]) == 100


def test_cifar10_shapes_and_normalisation(cifar10):
    root, raw = cifar10
    dm = CIFAR10DataModule(root=root, batch_size=8, seed=0)
    dm.setup("fit")
    assert (dm.num_classes, dm.in_channels, dm.name) == (10, 3, "cifar10")
    assert len(dm.train_set) == 100 and len(dm.val_set) == 30  # val = official test split
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == raw["test_labels"][:8]
    for i in (0, 7):  # exact per-channel normalisation, R/G/B planes in order
        torch.testing.assert_close(x[i], _normalised(raw["test_data"][i], 10))
    xt, yt = next(iter(dm.train_dataloader()))
    assert xt.shape == (8, 3, 32, 32) and yt.shape == (8,)
    assert dm.test_dataloader().dataset is dm.val_set


def test_cifar_augmentation_only_in_training(cifar10):
    root, raw = cifar10
    dm = CIFAR10DataModule(root=root, seed=0)
    dm.setup()
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert names[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert "RandomCrop" not in [type(t).__name__ for t in dm.val_set.transform.transforms]
    draws = []
    for seed in range(4):
        torch.manual_seed(seed)
        draws.append((dm.train_set[0][0], dm.val_set[0][0]))
    assert any(not torch.equal(draws[0][0], d[0]) for d in draws[1:])  # train varies
    assert all(torch.equal(draws[0][1], d[1]) for d in draws[1:])  # val fixed
    plain = CIFAR10DataModule(root=root, augment=False)
    plain.setup()
    torch.testing.assert_close(plain.train_set[3][0], _normalised(raw["train_data"][3], 10))
    assert dm.identity()["augmentation"] != plain.identity()["augmentation"] == "none"


def test_cifar_subset_balanced_deterministic_nested(cifar10):
    root, raw = cifar10
    labels = np.asarray(raw["train_labels"])

    def subset(n: int, seed: int) -> list[int]:
        dm = CIFAR10DataModule(root=root, train_subset=n, seed=seed)
        dm.setup()
        assert len(dm.train_set) == n and len(dm.val_set) == 30
        return dm.train_indices

    a = subset(30, 0)
    assert Counter(labels[a].tolist()) == {c: 3 for c in range(10)}
    assert subset(30, 0) == a
    assert subset(30, 1) != a
    assert set(a) <= set(subset(50, 0))
    dm = CIFAR10DataModule(root=root, train_subset=30, seed=0)
    dm.setup()
    assert int(dm.train_set[0][1]) == labels[a[0]]
    ident = dm.identity()
    assert ident["train_subset"] == 30 and ident["seed"] == 0 and ident["name"] == "cifar10"
    assert "random_crop" in ident["augmentation"]


def test_cifar100(tmp_path, accept_fake_cifar):
    raw = make_fake_cifar100(tmp_path)
    dm = CIFAR100DataModule(root=tmp_path, batch_size=16, train_subset=100, seed=3)
    dm.setup()
    assert (dm.num_classes, dm.name) == (100, "cifar100")
    labels = np.asarray(raw["train_labels"])[dm.train_indices]
    assert sorted(labels.tolist()) == list(range(100))  # one image per class
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.tolist() == raw["test_labels"][:16]
    torch.testing.assert_close(x[5], _normalised(raw["test_data"][5], 100))


def test_cifar_root_may_point_at_the_extracted_folder(cifar10):
    root, _ = cifar10
    dm = CIFARDataModule(variant=10, root=root / "cifar-10-batches-py")
    dm.setup()
    assert len(dm.val_set) == 30


@pytest.mark.parametrize(
    ("cls", "folder"),
    [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")],
)
def test_cifar_missing_files_error(tmp_path, cls, folder):
    dm = cls(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert str((tmp_path / "nowhere" / folder).resolve()) in msg
    assert f"'{folder}'" in msg and "data.download=true" in msg and "copy" in msg


def test_cifar_partial_copy_names_missing_file(tmp_path, accept_fake_cifar):
    make_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(root=tmp_path).setup()


def test_cifar_md5_mismatch_is_explained(tmp_path):
    make_fake_cifar10(tmp_path)  # real torchvision md5 check: fake files fail it
    with pytest.raises(RuntimeError, match="md5"):
        CIFAR10DataModule(root=tmp_path).setup()


def test_cifar_download_path_calls_torchvision(tmp_path, accept_fake_cifar, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def fake_download(self):  # stands in for the internet
        calls.append(self.root)
        if not (Path(self.root) / "cifar-10-batches-py").exists():
            make_fake_cifar10(Path(self.root))

    monkeypatch.setattr(tvd.CIFAR10, "download", fake_download)
    dm = CIFAR10DataModule(root=tmp_path / "dl", download=True)
    dm.prepare_data()
    dm.setup()
    assert calls and len(dm.val_set) == 30


def test_cifar_loader_options(cifar10):
    root, _ = cifar10
    dm = CIFAR10DataModule(root=root, batch_size=4, num_workers=1)
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1 and loader.batch_size == 4
    assert not CIFAR10DataModule(root=root).hparams.download  # nothing downloads by default


# ======================================================================= idx fakes
def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    code = {np.uint8: 0x08, np.int16: 0x0B, np.float32: 0x0D}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_fake_fashion(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True):
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide /usr/share/datasets/fashion-mnist so tests see only their own files."""
    system = tmp_path / "system" / "fashion-mnist"
    monkeypatch.setattr(fm, "SYSTEM_DATA_DIRS", (system,))
    return system


# ======================================================================= idx tests
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 7
    b = np.linspace(-1, 1, 5, dtype=np.float32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", a, gz), expect_ndim=3), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b", b, gz)), b)


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = write_idx(tmp_path / "img", np.zeros((3, 28, 28), np.uint8))
    raw = good.read_bytes()
    (tmp_path / "magic").write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "trunc").write_bytes(raw[:-100])
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(tmp_path / "trunc")
    gz = write_idx(tmp_path / "img2", np.zeros((3, 28, 28), np.uint8), gz=True)
    gz.write_bytes(gz.read_bytes()[:-30])
    with pytest.raises(IdxFormatError, match=r"img2\.gz"):
        read_idx(gz)
    with pytest.raises(IdxFormatError, match="expected 1"):
        read_idx(good, expect_ndim=1)


def test_fashion_shapes_normalisation_pad(tmp_path, no_system_fashion):
    raw = make_fake_fashion(tmp_path / "fm")
    dm = FashionMNISTDataModule(root=tmp_path / "fm", image_size=28, batch_size=10)
    dm.setup()
    assert (dm.num_classes, dm.in_channels) == (10, 1)
    assert len(dm.train_set) == 60 and len(dm.val_set) == 20
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (torch.from_numpy(raw["test_images"][:10]).float() / 255 - dm.mean) / dm.std
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == raw["test_labels"][:10].tolist()

    padded = FashionMNISTDataModule(root=tmp_path / "fm", image_size=32)
    padded.setup()
    x32 = padded.val_set[0][0]
    assert x32.shape == (1, 32, 32)
    torch.testing.assert_close(x32[0, 2:30, 2:30], expected[0])  # centred, exact
    border = torch.full((2, 32), -dm.mean / dm.std)
    torch.testing.assert_close(x32[0, :2], border)  # zero background, normalised
    bilinear = FashionMNISTDataModule(root=tmp_path / "fm", image_size=32, resize="bilinear")
    bilinear.setup()
    assert bilinear.val_set[0][0].shape == (1, 32, 32)
    assert padded.identity() != bilinear.identity() != dm.identity()


def test_fashion_augmentation_only_in_training(tmp_path, no_system_fashion):
    make_fake_fashion(tmp_path / "fm", gz=False)  # raw (uncompressed) files
    dm = FashionMNISTDataModule(root=tmp_path / "fm", image_size=32, horizontal_flip=True)
    dm.setup()
    assert dm.identity()["augmentation"] == "random_crop32_pad4+hflip"
    draws = []
    for seed in range(4):
        torch.manual_seed(seed)
        draws.append((dm.train_set[0][0], dm.val_set[0][0]))
    assert draws[0][0].shape == (1, 32, 32)
    assert any(not torch.equal(draws[0][0], d[0]) for d in draws[1:])
    assert all(torch.equal(draws[0][1], d[1]) for d in draws[1:])
    plain = FashionMNISTDataModule(root=tmp_path / "fm", image_size=32, augment=False)
    plain.setup()
    torch.testing.assert_close(plain.train_set[0][0], plain.eval_transform()(
        plain.train_set.images[0].float().div(255).unsqueeze(0)))  # fmt: skip
    assert plain.identity()["augmentation"] == "none"


def test_fashion_subset_and_determinism(tmp_path, no_system_fashion):
    raw = make_fake_fashion(tmp_path / "fm")

    def subset(n: int, seed: int) -> list[int]:
        dm = FashionMNISTDataModule(root=tmp_path / "fm", train_subset=n, seed=seed)
        dm.setup()
        assert len(dm.train_set) == n
        return dm.train_indices

    a = subset(30, 0)
    assert Counter(raw["train_labels"][a].tolist()) == {c: 3 for c in range(10)}
    assert subset(30, 0) == a and subset(30, 5) != a and set(a) <= set(subset(40, 0))


def test_fashion_search_order(tmp_path, no_system_fashion):
    make_fake_fashion(no_system_fashion, n_train=30)
    # Nothing under root: the system directory is used.
    files, searched = find_fashion_mnist(tmp_path / "empty")
    assert files is not None and files["train_images"].parent == no_system_fashion
    assert any("empty" in s and "does not exist" in s for s in searched)
    # root wins over the system directory; torchvision's download layout is found too.
    make_fake_fashion(tmp_path / "dl" / "FashionMNIST" / "raw", n_train=40)
    dm = FashionMNISTDataModule(root=tmp_path / "dl")
    dm.setup()
    assert len(dm.train_set) == 40
    assert dm.files["train_images"].parent == tmp_path / "dl" / "FashionMNIST" / "raw"
    # A directory with only some files is skipped (and reported).
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    files, searched = find_fashion_mnist(tmp_path / "partial")
    assert files["train_images"].parent == no_system_fashion
    assert "lacks train-labels-idx1-ubyte" in searched[0]


def test_fashion_missing_files_error(tmp_path, no_system_fashion):
    dm = FashionMNISTDataModule(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg and str(no_system_fashion) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.root" in msg and "data.download=true" in msg


def test_fashion_corrupt_file_error(tmp_path, no_system_fashion):
    make_fake_fashion(tmp_path / "fm", gz=False)
    path = tmp_path / "fm" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-28])
    with pytest.raises(IdxFormatError, match="t10k-images-idx3-ubyte"):
        FashionMNISTDataModule(root=tmp_path / "fm").setup()
    make_fake_fashion(tmp_path / "fm2", gz=False)
    write_idx(tmp_path / "fm2" / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(IdxFormatError, match="7 labels"):
        FashionMNISTDataModule(root=tmp_path / "fm2").setup()


def test_fashion_download_path_calls_torchvision(tmp_path, no_system_fashion, monkeypatch):
    import torchvision.datasets as tvd

    def fake_download(self):  # stands in for the internet: writes what torchvision would
        make_fake_fashion(Path(self.raw_folder), gz=False)

    monkeypatch.setattr(tvd.FashionMNIST, "download", fake_download)
    dm = FashionMNISTDataModule(root=tmp_path / "data", download=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 60
    assert dm.files["train_images"].parent == tmp_path / "data" / "FashionMNIST" / "raw"


@pytest.mark.skipif(
    not (fm.SYSTEM_DATA_DIRS[0] / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_from_debian_package():
    files, _ = find_fashion_mnist(None)
    labels = read_idx(files["train_labels"], expect_ndim=1)
    images = read_idx(files["test_images"], expect_ndim=3)
    assert labels.shape == (60000,) and images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10
