"""Deterministic, class-aware index selection shared by all classification datamodules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["balanced_subset_indices", "stratified_split_indices"]


def _as_label_array(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    return arr


def _class_permutations(arr: np.ndarray, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Classes in sorted order and, per class, a seeded permutation of its indices.

    The permutations depend only on ``(labels, seed)`` - never on the requested size - so
    a smaller subset is always a prefix (per class) of a larger one with the same seed.
    """
    classes = np.unique(arr)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(np.flatnonzero(arr == c)) for c in classes]
    return classes, perms


def balanced_subset_indices(labels: Sequence[int] | np.ndarray, n: int, seed: int) -> list[int]:
    """Pick ``n`` indices into ``labels`` with as equal a count per class as possible.

    Each class gets ``n // C`` or ``n // C + 1`` samples (``C`` = number of classes present);
    if a class has too few samples, its shortfall is spread over the others. Selection is
    deterministic in ``(labels, n, seed)``, and subsets are nested: for a fixed seed the
    subset of size ``n`` is contained in the subset of any size ``m > n``. This is what the
    paper's 10k / 30k / 50k training-set ablations need.

    Returns the indices sorted ascending (stable order for feature caches).
    """
    arr = _as_label_array(labels)
    n = int(n)
    classes, perms = _class_permutations(arr, seed)
    num_classes = len(classes)
    if n > len(arr):
        raise ValueError(f"subset size {n} exceeds the number of samples ({len(arr)})")
    if n < num_classes:
        raise ValueError(
            f"subset size {n} is smaller than the number of classes ({num_classes}); "
            "a class-balanced subset needs at least one sample per class"
        )

    counts = np.array([len(p) for p in perms], dtype=np.int64)
    # Water-filling: the largest level L with sum(min(count, L)) <= n; every class gets
    # min(count, L), and the r = n - sum(...) leftovers go one each to the first r classes
    # that still have samples, in a seeded order that does not depend on n. Quotas are
    # then monotone in n, which is what makes subsets nested.
    lo, hi = 0, int(counts.max())
    while lo < hi:  # binary search for L
        mid = (lo + hi + 1) // 2
        if int(np.minimum(counts, mid).sum()) <= n:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(counts, lo)
    leftover = n - int(quota.sum())
    order = np.random.default_rng([seed, 1]).permutation(num_classes)
    open_classes = [c for c in order if counts[c] > lo]
    for c in open_classes[:leftover]:
        quota[c] += 1
    chosen = np.concatenate([p[:q] for p, q in zip(perms, quota, strict=True)])
    return sorted(int(i) for i in chosen)


def stratified_split_indices(
    labels: Sequence[int] | np.ndarray, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices into disjoint ``(train, val)`` lists, stratified by class.

    The validation set has ``round(N * val_fraction)`` samples in total; per class it gets
    the floor of its proportional share, and the leftover samples go to the classes with
    the largest fractional remainders (ties broken by class order). Deterministic in
    ``(labels, val_fraction, seed)``; both lists are sorted ascending.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    arr = _as_label_array(labels)
    _, perms = _class_permutations(arr, seed)
    counts = np.array([len(p) for p in perms], dtype=np.float64)
    exact = counts * val_fraction
    n_val = np.floor(exact).astype(np.int64)
    leftover = round(len(arr) * val_fraction) - int(n_val.sum())
    # Largest-remainder allocation; argsort is stable so ties go to the lower class.
    for c in np.argsort(-(exact - n_val), kind="stable")[: max(leftover, 0)]:
        n_val[c] += 1
    # Never empty a class from the training split.
    n_val = np.minimum(n_val, counts.astype(np.int64) - 1)
    val = np.concatenate([p[:k] for p, k in zip(perms, n_val, strict=True)])
    train = np.concatenate([p[k:] for p, k in zip(perms, n_val, strict=True)])
    return sorted(int(i) for i in train), sorted(int(i) for i in val)
