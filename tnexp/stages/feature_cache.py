"""The teacher-feature cache of a cached local phase: where it lives, capture once, open."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig
from torch import nn

from tnexp.config import plain
from tnexp.features import (
    FeatureCacheDataset,
    attention_mask,
    open_feature_cache,
    teacher_fingerprint,
    write_feature_cache,
)
from tnexp.slicing import SlicePlan, make_slice_plan

log = logging.getLogger("tnexp")

__all__ = ["build_feature_cache", "cache_lock", "feature_cache_dir"]


def build_feature_cache(
    cfg: DictConfig,
    teacher: nn.Module,
    student: nn.Module,
    plan: SlicePlan,
    datamodule: Any,
) -> FeatureCacheDataset:
    """Capture (or reuse) the teacher features on disk; open them for ``plan``'s slices.

    The cache always holds every slice of the student's full plan, so slice jobs that
    train different slices share one capture.
    """
    method = cfg.method
    fingerprint = teacher_fingerprint(teacher)
    cache_dir = feature_cache_dir(cfg, fingerprint)
    datamodule.setup("fit")
    full_plan = make_slice_plan(student, plain(method.slicing))
    with cache_lock(cache_dir):  # concurrent slice jobs: one captures, the others wait
        write_feature_cache(
            cache_dir,
            teacher,
            full_plan,
            datamodule.train_dataloader(),
            dtype=method.cache.dtype,
            dataset_identity=datamodule.identity(),
            shard_size=int(method.cache.shard_size),
            overwrite=bool(method.cache.get("overwrite", False)),
        )
    cache = open_feature_cache(
        cache_dir,
        teacher_fingerprint=fingerprint,
        dataset_identity=datamodule.identity(),
        plan=plan,
        dtype=method.cache.dtype,
        verify_checksums=bool(method.cache.verify_checksums),
    )
    first = next(iter(datamodule.train_dataloader()), None)
    cache.check_masks(attention_mask(first) is not None)
    return cache


def feature_cache_dir(cfg: DictConfig, fingerprint: str) -> Path:
    """``method.cache.dir``, or one directory per teacher, slicing and dtype."""
    method = cfg.method
    if method.cache.dir:
        return Path(method.cache.dir)
    name = f"{fingerprint[:16]}-{_slug(method.slicing)}-{method.cache.dtype}"
    return Path(cfg.paths.cache_dir) / name


def _slug(value: Any) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(value))[:40]


@contextlib.contextmanager
def cache_lock(cache_dir: str | Path) -> Iterator[None]:
    """Hold ``<cache_dir>.lock`` so concurrent jobs capture a feature cache only once.

    The waiting job then finds the finished cache and opens it read-only. (The capture
    itself publishes atomically, so even without the lock a cache is never corrupt; the lock
    only saves the duplicate work.) On filesystems without working ``flock`` run
    ``tnexp method=capture`` before the sweep instead.
    """
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache_dir.parent / f"{cache_dir.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another job is capturing the feature cache %s; waiting for it", cache_dir)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
