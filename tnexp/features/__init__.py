"""Teacher feature capture for slice-wise distillation: online hooks and a disk cache.

*Online*: :class:`FeatureCapture` (``capture.py``) runs **one** teacher forward with hooks
and returns the input and output of every slice of a :class:`~tnexp.slicing.SlicePlan` at
once (re-running the teacher prefix per slice would cost O(L^2) layer evaluations).

*Cached*: :func:`write_feature_cache` (``writer.py``) stores those features for a whole
dataloader in safetensors shards plus a ``manifest.json`` (``manifest.py``) that records
what produced them (teacher fingerprint, dataset identity, slice plan, dtype, per-shard
sizes and checksums) and, for text, each sample's attention mask (format version 2).
:func:`open_feature_cache` (``reader.py``) refuses any cache that does not match what the
caller is about to train (stale teacher, other data, other slices, truncated shards,
interrupted capture) and returns a :class:`FeatureCacheDataset`;
per-slice jobs read only their own tensors. ``tensors.py`` holds the shared tensor
plumbing (device moves, teacher fingerprints).
"""

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
)
from tnexp.features.reader import (
    FeatureCacheDataset,
    ShardGroupedSampler,
    collate_features,
    open_feature_cache,
)
from tnexp.features.tensors import attention_mask, teacher_fingerprint, to_device
from tnexp.features.writer import write_feature_cache

__all__ = [
    "CACHE_DTYPES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MASK_KEY",
    "FeatureCacheDataset",
    "FeatureCacheError",
    "FeatureCacheIntegrityError",
    "FeatureCacheManifest",
    "FeatureCapture",
    "ShardGroupedSampler",
    "ShardInfo",
    "SliceFeatures",
    "attention_mask",
    "clean_partials",
    "collate_features",
    "open_feature_cache",
    "teacher_fingerprint",
    "to_device",
    "write_feature_cache",
]
