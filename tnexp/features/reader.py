"""Reading a feature cache: checks against the request, lazy per-shard dataset, grouped sampler."""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from tnexp.features.manifest import (
    CACHE_DTYPES,
    MASK_KEY,
    FeatureCacheError,
    FeatureCacheIntegrityError,
    FeatureCacheManifest,
    cache_remedy,
    normalize_identity,
    read_manifest,
)
from tnexp.integrity import checksum_matches, tensor_checksum
from tnexp.slicing import SlicePlan

__all__ = ["FeatureCacheDataset", "ShardGroupedSampler", "collate_features", "open_feature_cache"]


def _check_plan(manifest: FeatureCacheManifest, plan: SlicePlan, directory: Path) -> None:
    cached = {s.name: s.paths for s in manifest.slice_plan()}
    problems = []
    for s in plan:
        if s.name not in cached:
            problems.append(f"slice {s.name!r} is not in the cache")
        elif tuple(cached[s.name]) != tuple(s.paths):
            problems.append(
                f"slice {s.name!r} covers {list(s.paths)} but the cached one {list(cached[s.name])}"
            )
    if problems:
        raise FeatureCacheError(
            f"slice-plan mismatch with the feature cache at {directory}: {'; '.join(problems)}. "
            f"Cached slices: {list(cached)}. Request a subset of those, or "
            f"{cache_remedy(directory)}."
        )


def open_feature_cache(
    directory: str | Path,
    *,
    teacher_fingerprint: str | None = None,
    dataset_identity: Mapping[str, Any] | None = None,
    plan: SlicePlan | None = None,
    dtype: str | None = None,
    verify_checksums: bool = False,
    slices: Sequence[str] | None = None,
    max_cached_shards: int = 2,
) -> FeatureCacheDataset:
    """Open a cache written by :func:`write_feature_cache`, refusing anything that differs.

    Each ``None`` argument skips its check. ``plan`` may be a subset of the cached plan (a
    per-slice job reads one slice); the dataset then serves only those slices, as does an
    explicit ``slices`` list. Shard sizes are always checked; ``verify_checksums`` also
    re-hashes every shard (reads all data).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if teacher_fingerprint is not None and manifest.teacher_fingerprint != teacher_fingerprint:
        raise FeatureCacheError(
            f"stale feature cache at {directory}: it was captured from another teacher "
            f"(fingerprint {manifest.teacher_fingerprint[:12]}..., the current teacher is "
            f"{teacher_fingerprint[:12]}...); {cache_remedy(directory)}."
        )
    if dataset_identity is not None:
        want = normalize_identity(dataset_identity)
        have = normalize_identity(manifest.dataset_identity)
        if want != have:
            keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            diffs = ", ".join(
                f"{k}: cached {have.get(k)!r} vs requested {want.get(k)!r}" for k in keys
            )
            raise FeatureCacheError(
                f"dataset identity mismatch with the feature cache at {directory} ({diffs}); "
                f"{cache_remedy(directory)}."
            )
    if dtype is not None and manifest.dtype != dtype:
        raise FeatureCacheError(
            f"the feature cache at {directory} stores {manifest.dtype}, {dtype} was requested; "
            f"{cache_remedy(directory)}, or request method.cache.dtype={manifest.dtype}."
        )
    if plan is not None:
        _check_plan(manifest, plan, directory)
    for shard in manifest.shards:
        path = directory / shard.file
        if not path.is_file():
            raise FeatureCacheError(
                f"feature cache shard {path} is missing; {cache_remedy(directory)}."
            )
        size = path.stat().st_size
        if size != shard.bytes:
            raise FeatureCacheError(
                f"feature cache shard {path} has {size} bytes, the manifest records "
                f"{shard.bytes} (truncated or overwritten); {cache_remedy(directory)}."
            )
        if verify_checksums and not checksum_matches(path, shard.sha256):
            raise FeatureCacheIntegrityError(
                f"feature cache shard {path} fails its sha256 checksum (corrupt); "
                f"{cache_remedy(directory)}."
            )
    wanted = list(slices) if slices is not None else (plan.names() if plan is not None else None)
    return FeatureCacheDataset(
        directory, manifest, slices=wanted, max_cached_shards=max_cached_shards
    )


class FeatureBatch(tuple):
    """``({slice: (inputs[B, ...], outputs[B, ...])}, labels[B] | None[, mask[B, T]])`` read
    as one batch by :meth:`FeatureCacheDataset.__getitems__`; :func:`collate_features`
    passes it on."""


def collate_features(batch: Sequence[tuple] | FeatureBatch) -> tuple:
    """Stack samples into ``({slice: (inputs[B, ...], outputs[B, ...])}, labels[B])``, plus
    ``attention_mask[B, T]`` as a third element when the cache stores masks.

    A :class:`FeatureBatch` (a DataLoader fetches whole batches through the dataset's
    ``__getitems__``) is already stacked and comes back as that plain tuple.
    """
    if isinstance(batch, FeatureBatch):
        return tuple(batch)
    names = list(batch[0][0])
    features = {
        s: (torch.stack([b[0][s][0] for b in batch]), torch.stack([b[0][s][1] for b in batch]))
        for s in names
    }
    labels = None if batch[0][1] is None else torch.stack([b[1] for b in batch])
    if len(batch[0]) > 2:
        return features, labels, torch.stack([b[2] for b in batch])
    return features, labels


class FeatureCacheDataset(Dataset):
    """Per-sample ``({slice: (input, output)}, label)`` from a feature cache, and the
    sample's attention mask as a third element when the cache stores masks (text).

    Shards are loaded lazily, only the requested slices' keys (safetensors reads single
    tensors), and the last ``max_cached_shards`` stay in memory. Use
    :class:`ShardGroupedSampler` so that shuffled epochs read each shard once. Tensors come
    back in the cache dtype; the consumer casts. ``label`` is ``None`` when the dataloader
    had no labels.
    """

    def __init__(
        self,
        directory: str | Path,
        manifest: FeatureCacheManifest,
        *,
        slices: Sequence[str] | None = None,
        max_cached_shards: int = 2,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        cached = manifest.slice_plan().names()
        if slices is None:
            slices = cached
        unknown = [s for s in slices if s not in cached]
        if unknown:
            raise FeatureCacheError(
                f"slices {unknown} are not in the feature cache at {directory}; cached: {cached}."
            )
        self.slice_names = [s for s in cached if s in set(slices)]
        self.has_labels = manifest.labels is not None
        self.has_masks = manifest.attention_mask is not None
        self.max_cached_shards = max(1, int(max_cached_shards))
        counts = [s.num_samples for s in manifest.shards]
        self._starts = [sum(counts[:i]) for i in range(len(counts))]
        self.shard_ranges = [(a, a + n) for a, n in zip(self._starts, counts)]
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._verified: set[int] = set()  # shards whose tensors passed their checksums

    @property
    def dtype(self) -> torch.dtype:
        return CACHE_DTYPES[self.manifest.dtype]

    def check_masks(self, data_has_masks: bool) -> None:
        """Refuse a cache without the attention masks that the data's batches carry.

        The distillation losses leave padded positions out (mask-aware); a version-1 cache
        stored no masks, so training from it would count every padded position, unlike the
        same run online.
        """
        if data_has_masks and not self.has_masks:
            why = (
                "was written by an older tnexp (format version 1), which stored no masks"
                if not self.manifest.masks_recorded
                else "holds no attention masks"
            )
            raise FeatureCacheError(
                f"the training batches carry an attention mask (padded text), which the "
                f"mask-aware local losses need, but the feature cache at {self.directory} "
                f"{why}; recapture it so that it stores the masks: {cache_remedy(self.directory)}."
            )

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the loaded shards.
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def _keys(self) -> list[str]:
        keys = [f"{s}/{kind}" for s in self.slice_names for kind in ("input", "output")]
        keys += ["labels"] if self.has_labels else []
        return [*keys, MASK_KEY] if self.has_masks else keys

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        from safetensors import safe_open

        path = self.directory / self.manifest.shards[index].file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensors = {k: handle.get_tensor(k) for k in self._keys()}
        except Exception as err:  # safetensors raises its own error types
            raise FeatureCacheIntegrityError(
                f"cannot load feature cache shard {path} ({type(err).__name__}: {err}); it is "
                f"truncated or corrupt: {cache_remedy(self.directory)}."
            ) from None
        if index not in self._verified:
            self._verify(index, path, tensors)
            self._verified.add(index)
        self._cache[index] = tensors
        while len(self._cache) > self.max_cached_shards:
            self._cache.popitem(last=False)
        return tensors

    def _verify(self, index: int, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        """Check the tensors just read against the checksums recorded at capture.

        Hashing only what was read costs a fraction of the epoch (docs/benchmarks.md) and
        catches same-size damage that the size check in open_feature_cache cannot.
        """
        expected = self.manifest.shards[index].checksums
        if expected is None:  # cache from before per-tensor checksums: the whole file
            bad = [] if checksum_matches(path, self.manifest.shards[index].sha256) else ["file"]
        else:
            bad = [k for k, t in tensors.items() if tensor_checksum(t) != expected.get(k)]
        if bad:
            raise FeatureCacheIntegrityError(
                f"feature cache shard {path} fails its checksum ({', '.join(bad[:4])}): the "
                f"file was damaged after the capture; {cache_remedy(self.directory)}."
            )

    def __getitem__(self, index: int) -> tuple:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for a cache of {n} samples")
        index %= n
        shard = bisect_right(self._starts, index) - 1
        tensors = self._shard(shard)
        j = index - self._starts[shard]
        features = {
            s: (tensors[f"{s}/input"][j], tensors[f"{s}/output"][j]) for s in self.slice_names
        }
        label = tensors["labels"][j] if self.has_labels else None
        if self.has_masks:
            return features, label, tensors[MASK_KEY][j]
        return features, label

    def __getitems__(self, indices: Sequence[int]) -> FeatureBatch:
        """The samples ``indices`` as one stacked batch (what a DataLoader fetches).

        One gather per cached tensor and shard touched, instead of one view per sample and
        tensor plus a stack of them all in :func:`collate_features`: the per-batch cost of a
        cached local step no longer grows with batch size x slices. Same values and order
        as ``collate_features([self[i] for i in indices])``.
        """
        n = len(self)
        if not indices:
            raise IndexError("an empty batch of feature-cache samples was requested")
        positions = torch.as_tensor(list(indices), dtype=torch.long)
        if bool(((positions < -n) | (positions >= n)).any()):
            bad = next(i for i in indices if not -n <= i < n)
            raise IndexError(f"sample {bad} out of range for a cache of {n} samples")
        positions = positions % n
        # Group the rows by shard (shards in order of first appearance: the shard-grouped
        # sampler's batches stay in order) and load each shard once per batch.
        groups: dict[int, list[int]] = {}
        for k, i in enumerate(positions.tolist()):
            groups.setdefault(bisect_right(self._starts, i) - 1, []).append(k)
        order = [k for members in groups.values() for k in members]
        parts = [
            (self._shard(shard), positions[members] - self._starts[shard])
            for shard, members in groups.items()
        ]
        # Where a shard recurs after another one (an unsorted sampler), restore batch order.
        restore = None
        if order != sorted(order):
            restore = torch.empty(len(order), dtype=torch.long)
            restore[torch.as_tensor(order)] = torch.arange(len(order))

        def gather(key: str) -> torch.Tensor:
            pieces = [tensors[key].index_select(0, rows) for tensors, rows in parts]
            out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            return out if restore is None else out.index_select(0, restore)

        features = {s: (gather(f"{s}/input"), gather(f"{s}/output")) for s in self.slice_names}
        labels = gather("labels") if self.has_labels else None
        if self.has_masks:
            return FeatureBatch((features, labels, gather(MASK_KEY)))
        return FeatureBatch((features, labels))

    # A module-level function (not a lambda) so DataLoader workers can pickle it.
    collate = staticmethod(collate_features)


class ShardGroupedSampler(Sampler[int]):
    """Shuffles shard order, then samples within each shard: random epochs, one read per shard.

    Each epoch uses ``seed + epoch``; the epoch advances after every full pass unless the
    trainer sets it with :meth:`set_epoch` (Lightning does).
    """

    def __init__(self, dataset: FeatureCacheDataset, shuffle: bool = True, seed: int = 0) -> None:
        self.shard_ranges = list(dataset.shard_ranges)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(b - a for a, b in self.shard_ranges)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = (
            torch.randperm(len(self.shard_ranges), generator=generator).tolist()
            if self.shuffle
            else range(len(self.shard_ranges))
        )
        for shard in order:
            start, stop = self.shard_ranges[shard]
            inner = (
                torch.randperm(stop - start, generator=generator).tolist()
                if self.shuffle
                else range(stop - start)
            )
            for j in inner:
                yield start + j
