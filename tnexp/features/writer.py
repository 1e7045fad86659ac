"""Writing a feature cache: one teacher pass into checksummed shards, published atomically."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.features.capture import FeatureCapture, SliceFeatures
from tnexp.features.manifest import (
    CACHE_DTYPES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MASK_KEY,
    FeatureCacheError,
    FeatureCacheIntegrityError,
    FeatureCacheManifest,
    ShardInfo,
    clean_partials,
    normalize_identity,
    partial_dir_name,
)
from tnexp.features.reader import open_feature_cache
from tnexp.features.tensors import attention_mask, teacher_fingerprint
from tnexp.integrity import atomic_write_json, sha256_file, tensor_checksum
from tnexp.slicing import SlicePlan

__all__ = ["write_feature_cache"]


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(model inputs, labels) from ``(x, y, ...)``, a dict batch, or a bare tensor."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch.get("labels")
    elif isinstance(batch, tuple | list):
        inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        inputs, labels = batch, None
    if labels is not None and not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    return inputs, labels


class _ShardWriter:
    """Buffers captured features and writes fixed-size safetensors shards."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory = directory
        self.shard_size = shard_size
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.buffered = 0
        self.shards: list[ShardInfo] = []

    def add(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        if self.buffer and set(tensors) != set(self.buffer):
            raise FeatureCacheError(
                "batches yield different keys (labels or attention masks present in some "
                "batches only)."
            )
        for key, value in tensors.items():
            self.buffer.setdefault(key, []).append(value)
        self.buffered += count
        while self.buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        from safetensors.torch import save_file

        joined = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in self.buffer.items()}
        # Clone the slices: safetensors wants compact, non-shared tensors.
        out = {k: v[:count].contiguous().clone() for k, v in joined.items()}
        rest = {k: [v[count:].clone()] for k, v in joined.items() if v.shape[0] > count}
        name = f"shard_{len(self.shards):05d}.safetensors"
        path = self.directory / name
        save_file(out, str(path))
        checksums = {k: tensor_checksum(v) for k, v in out.items()}
        self.shards.append(
            ShardInfo(name, count, path.stat().st_size, sha256_file(path), checksums)
        )
        self.buffer = rest
        self.buffered -= count

    def finish(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


def _check_replayable(features: Mapping[str, SliceFeatures]) -> None:
    for name, feats in features.items():
        needed = [k for k, v in feats.kwargs.items() if v is not None and v is not False]
        if needed:
            raise FeatureCacheError(
                f"slice {name!r} needs extra inputs ({', '.join(needed)}: attention masks, "
                "position embeddings) besides its input tensor, which a feature cache does not "
                "store; use online mode for it (or slice at 'block' level: transformer MLPs "
                "need none)."
            )


def write_feature_cache(
    directory: str | Path,
    teacher: nn.Module,
    plan: SlicePlan,
    dataloader: Iterable[Any],
    *,
    dataset_identity: Mapping[str, Any],
    dtype: str = "float16",
    shard_size: int = 1024,
    progress: bool = True,
    device: torch.device | str | None = None,
    overwrite: bool = False,
) -> FeatureCacheManifest:
    """Capture every slice's teacher input/output over ``dataloader`` into ``directory``.

    One teacher forward per batch (eval mode, restored afterwards) feeds all slices. Shards
    and the manifest are written into a sibling ``<directory>.partial-<pid>-<id>`` that is
    renamed onto ``directory`` only at the end, so an interrupted capture never looks
    complete. A matching existing cache is reused without recomputing; a non-matching one
    is an error unless ``overwrite=True``. With ``device`` set the teacher is moved there.

    Use a loader without shuffling or random augmentation: the cache freezes one pass.
    """
    if dtype not in CACHE_DTYPES:
        raise FeatureCacheError(f"dtype must be one of {list(CACHE_DTYPES)}, got {dtype!r}.")
    if shard_size < 1:
        raise FeatureCacheError(f"shard_size must be >= 1, got {shard_size}.")
    directory = Path(directory)
    fingerprint = teacher_fingerprint(teacher)
    identity = normalize_identity(dataset_identity)
    if directory.exists():
        if (directory / MANIFEST_FILE).exists():
            try:
                return open_feature_cache(
                    directory,
                    teacher_fingerprint=fingerprint,
                    dataset_identity=identity,
                    plan=plan,
                    dtype=dtype,
                ).manifest
            except FeatureCacheError as err:
                if not overwrite:
                    raise type(err)(f"{err} (The existing cache was not replaced.)") from None
        elif any(directory.iterdir()) and not overwrite:
            raise FeatureCacheError(
                f"{directory} exists, is not empty and holds no feature cache; choose another "
                "directory (method.cache.dir=...), or replace it with method.cache.overwrite=true "
                "(overwrite=True in Python)."
            )

    if device is not None:
        teacher.to(device)
    clean_partials(directory)
    work = partial_dir_name(directory)
    work.mkdir(parents=True)
    was_training = teacher.training
    try:
        teacher.eval()  # cached features are the pretrained model's inference features
        manifest = _capture_into(work, teacher, plan, dataloader, dtype, shard_size, progress)
        manifest.teacher_fingerprint = fingerprint
        manifest.dataset_identity = identity
        _write_json(work / MANIFEST_FILE, manifest.to_dict())
        _publish(work, directory, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        teacher.train(was_training)
    # Re-open with every check: if a concurrent job published first, its cache must match.
    return open_feature_cache(
        directory,
        teacher_fingerprint=fingerprint,
        dataset_identity=identity,
        plan=plan,
        dtype=dtype,
    ).manifest


def _capture_into(
    work: Path,
    teacher: nn.Module,
    plan: SlicePlan,
    dataloader: Iterable[Any],
    dtype: str,
    shard_size: int,
    progress: bool,
) -> FeatureCacheManifest:
    from tqdm.auto import tqdm

    import tnexp

    cast = CACHE_DTYPES[dtype]
    writer = _ShardWriter(work, shard_size)
    shapes: dict[str, dict[str, list[int]]] = {}
    label_info: dict[str, Any] | None = None
    mask_info: dict[str, Any] | None = None
    checked = False
    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    with FeatureCapture(teacher, plan, stop_after_last=True) as capture:
        bar = tqdm(
            dataloader,
            total=total,
            desc="capturing teacher features",
            unit="batch",
            disable=not progress,
        )
        for batch_index, batch in enumerate(bar):
            inputs, labels = _split_batch(batch)
            features = capture(inputs)
            if not checked:
                _check_replayable(features)
                checked = True
            count = next(iter(features.values())).input.shape[0]
            tensors: dict[str, torch.Tensor] = {}
            for name, feats in features.items():
                for kind, value in (("input", feats.input), ("output", feats.output)):
                    if value.shape[0] != count:
                        raise FeatureCacheError(
                            f"slice {name!r} {kind} has leading dimension {value.shape[0]}, "
                            f"expected the batch size {count}: only batch-first features can "
                            "be cached per sample."
                        )
                    # Cast on the device (less to transfer), then move to host memory.
                    stored = value.to(cast).cpu()
                    if stored.is_floating_point() and not torch.isfinite(stored).all():
                        # Training on NaN/Inf targets fails later and far from the cause.
                        raise FeatureCacheIntegrityError(
                            f"the teacher's {kind} of slice {name!r} holds NaN or Inf "
                            f"(batch {batch_index}, cached as {dtype}); nothing was cached. "
                            "Check the teacher and the data for NaN; values beyond "
                            "float16's range (65504) need method.cache.dtype=float32 or "
                            "bfloat16."
                        )
                    tensors[f"{name}/{kind}"] = stored
                    shapes.setdefault(name, {})[f"{kind}_shape"] = list(value.shape[1:])
            if labels is not None:
                if labels.shape[0] != count:
                    raise FeatureCacheError(
                        f"labels have {labels.shape[0]} rows for a batch of {count} samples."
                    )
                tensors["labels"] = labels.detach().cpu()
                label_info = {"dtype": str(labels.dtype), "shape": list(labels.shape[1:])}
            mask = attention_mask(inputs)
            if mask is not None:  # text: padded positions stay out of the losses, as online
                if mask.shape[0] != count:
                    raise FeatureCacheError(
                        f"the attention mask has {mask.shape[0]} rows for a batch of {count} "
                        "samples."
                    )
                tensors[MASK_KEY] = mask.detach().cpu()
                mask_info = {"dtype": str(mask.dtype), "shape": list(mask.shape[1:])}
            writer.add(tensors, count)
        writer.finish()
    if not writer.shards:
        raise FeatureCacheError("the dataloader yielded no batches; nothing to cache.")
    return FeatureCacheManifest(
        format_version=FORMAT_VERSION,
        teacher_fingerprint="",
        dataset_identity={},
        plan=plan.to_dict(),
        dtype=dtype,
        num_samples=sum(s.num_samples for s in writer.shards),
        shards=writer.shards,
        features=shapes,
        labels=label_info,
        attention_mask=mask_info,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        tnexp_version=getattr(tnexp, "__version__", "unknown"),
    )


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, sort_keys=True)


def _publish(work: Path, directory: Path, overwrite: bool) -> None:
    """Rename the finished capture onto ``directory`` (atomic on one filesystem)."""
    try:
        os.replace(work, directory)  # succeeds when directory is absent or empty
        return
    except OSError:
        if not directory.exists():
            raise
    if (directory / MANIFEST_FILE).exists() and not overwrite:
        # Another job finished the same capture first: keep theirs, drop ours.
        shutil.rmtree(work, ignore_errors=True)
        return
    if not overwrite:
        raise FeatureCacheError(f"{directory} appeared during the capture; not replacing it.")
    stale = directory.parent / f"{directory.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(directory, stale)
    os.replace(work, directory)
    with contextlib.suppress(OSError):
        shutil.rmtree(stale)
