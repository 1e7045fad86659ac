"""Digits datamodule and the shared subset/split helpers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tnexp.data import DigitsDataModule, balanced_subset_indices, stratified_split_indices

N_DIGITS = 1797


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    module = DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0, image_size=16)
    module.setup("fit")
    return module


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def test_split_sizes_and_disjoint(dm):
    assert len(dm.train_set) + len(dm.val_set) == N_DIGITS
    assert len(dm.val_set) == round(0.2 * N_DIGITS)
    assert not set(dm.train_indices) & set(dm.val_indices)
    assert sorted(dm.train_indices + dm.val_indices) == list(range(N_DIGITS))


def test_split_is_stratified(dm, digit_labels):
    total = Counter(digit_labels.tolist())
    val = Counter(digit_labels[dm.val_indices].tolist())
    for c in range(10):
        # proportional share, up to the rounding of the largest-remainder allocation
        assert abs(val[c] - 0.2 * total[c]) <= 1, (c, val[c], total[c])


def test_tensor_format_and_normalisation(dm):
    x, y = dm.train_set.tensors
    assert x.shape == (len(dm.train_set), 1, 16, 16)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    # Normalised with train statistics: train split has mean 0 / std 1, val only roughly.
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std()) - 1.0) < 1e-3
    xv, _ = dm.val_set.tensors
    assert abs(float(xv.mean())) < 0.2
    assert dm.num_classes == 10 and dm.in_channels == 1


def test_loaders(dm):
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 1, 16, 16) and yb.shape == (32,)
    val_batches = list(dm.val_dataloader())
    test_batches = list(dm.test_dataloader())
    assert sum(len(b[1]) for b in val_batches) == len(dm.val_set)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val_batches, test_batches, strict=True))


def test_native_resolution():
    module = DigitsDataModule(image_size=8)
    module.setup()
    assert module.train_set.tensors[0].shape[-2:] == (8, 8)


def test_determinism_across_constructions(dm):
    other = DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0, image_size=16)
    other.setup("fit")
    assert other.train_indices == dm.train_indices
    assert other.val_indices == dm.val_indices
    assert torch.equal(other.train_set.tensors[0], dm.train_set.tensors[0])
    assert other.identity() == dm.identity()
    # Same seed -> same shuffle order of the training loader.
    assert torch.equal(
        next(iter(other.train_dataloader()))[1], next(iter(dm.train_dataloader()))[1]
    )
    different = DigitsDataModule(seed=1)
    different.setup()
    assert different.val_indices != dm.val_indices
    assert different.identity() != dm.identity()


def test_train_subset_is_balanced(dm, digit_labels):
    module = DigitsDataModule(train_subset=105, seed=0)
    module.setup()
    assert len(module.train_set) == 105
    assert set(module.train_indices) <= set(dm.train_indices)  # drawn from the train split
    assert module.val_indices == dm.val_indices  # validation unaffected
    counts = Counter(module.train_set.tensors[1].tolist())
    assert sorted(counts.values()) == [10] * 5 + [11] * 5
    assert module.identity()["train_subset"] == 105
    # Deterministic.
    again = DigitsDataModule(train_subset=105, seed=0)
    again.setup()
    assert again.train_indices == module.train_indices


@pytest.mark.parametrize("n", [N_DIGITS, 5, 0])
def test_bad_subset_sizes_raise(n):
    module = DigitsDataModule(train_subset=n)
    with pytest.raises(ValueError, match="subset size"):
        module.setup()


def test_bad_val_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)


# --------------------------------------------------------------------- shared helpers


def test_balanced_subset_helper_errors():
    labels = [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="exceeds"):
        balanced_subset_indices(labels, 7, seed=0)
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        balanced_subset_indices(labels, 2, seed=0)
    assert balanced_subset_indices(labels, 6, seed=0) == list(range(6))


def test_balanced_subset_nested_and_redistributes():
    rng = np.random.default_rng(123)
    # Imbalanced labels: class 3 has only 4 samples, so its shortfall must go elsewhere.
    labels = np.concatenate([np.repeat([0, 1, 2], 50), np.full(4, 3)])
    labels = labels[rng.permutation(len(labels))]
    previous: set[int] = set()
    for n in range(4, len(labels) + 1):
        picked = balanced_subset_indices(labels, n, seed=5)
        assert len(picked) == len(set(picked)) == n
        assert picked == sorted(picked)
        counts = Counter(labels[picked].tolist())
        full = [c for c in range(4) if counts[c] == (labels == c).sum()]
        rest = [counts[c] for c in range(4) if c not in full]
        assert not rest or max(rest) - min(rest) <= 1  # balanced among non-exhausted classes
        assert previous <= set(picked)  # nested in n
        previous = set(picked)
    assert balanced_subset_indices(labels, 40, seed=5) != balanced_subset_indices(
        labels, 40, seed=6
    )


def test_stratified_split_helper():
    labels = np.repeat(np.arange(3), [10, 20, 31])
    train, val = stratified_split_indices(labels, 0.25, seed=0)
    assert len(val) == round(61 * 0.25)
    assert sorted(train + val) == list(range(61))
    assert stratified_split_indices(labels, 0.25, seed=0) == (train, val)
