"""Teacher feature capture for slice-wise distillation: online hooks and a disk cache.

*Online*: :class:`FeatureCapture` runs **one** teacher forward with hooks and returns the
input and output of every slice of a :class:`~tnexp.slicing.SlicePlan` at once (re-running
the teacher prefix per slice would cost O(L^2) layer evaluations).

*Cached*: :func:`write_feature_cache` stores those features for a whole dataloader in
safetensors shards plus a ``manifest.json`` that records what produced them (teacher
fingerprint, dataset identity, slice plan, dtype, per-shard sizes and checksums).
:func:`open_feature_cache` refuses any cache that does not match what the caller is about
to train (stale teacher, other data, other slices, truncated shards, interrupted capture)
and returns a :class:`FeatureCacheDataset`; per-slice jobs read only their own tensors.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import inspect
import json
import os
import shutil
import socket
import uuid
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from tnexp.errors import IntegrityError, TnexpError
from tnexp.integrity import atomic_write_json, checksum_matches, sha256_file, tensor_checksum
from tnexp.rundir import pid_alive
from tnexp.slicing import Slice, SlicePlan, SlicePlanError, first_tensor

__all__ = [
    "CACHE_DTYPES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "FeatureCacheDataset",
    "FeatureCacheError",
    "FeatureCacheIntegrityError",
    "FeatureCacheManifest",
    "FeatureCapture",
    "ShardGroupedSampler",
    "ShardInfo",
    "SliceFeatures",
    "clean_partials",
    "collate_features",
    "open_feature_cache",
    "sha256_file",
    "teacher_fingerprint",
    "write_feature_cache",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CACHE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def _remedy(directory: Path) -> str:
    """The fix for a cache that cannot be used: options that exist, and the exact path."""
    return (
        f"recapture it with method.cache.overwrite=true (overwrite=True in Python), or delete "
        f"it: rm -rf {directory}"
    )


class FeatureCacheError(TnexpError, RuntimeError):
    """A feature cache that is missing, incomplete, corrupt, or does not match the request."""


class FeatureCacheIntegrityError(FeatureCacheError, IntegrityError):
    """Cached data that fails its checksum, or non-finite features refused at capture."""


# =========================================================================== online capture
@dataclass
class SliceFeatures:
    """What one teacher forward recorded for one slice (tensors detached).

    ``kwargs`` are the extra inputs of the slice's first module (attention mask, position
    ids / embeddings of a decoder layer; extra positional arguments are stored under their
    parameter names), so ``slice.forward(model, input, **kwargs)`` replays the slice.
    KV caches are dropped (``use_cache`` is forced off) because replaying into a live cache
    would grow it. Empty for ResNet blocks and transformer MLPs.
    """

    input: torch.Tensor | None
    output: torch.Tensor | None
    kwargs: dict[str, Any] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised inside the last slice's hook to skip the rest of the teacher forward."""


@dataclass
class _Record:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    kwargs: dict[str, Any] | None = None
    seen_input: bool = False
    seen_output: bool = False
    versions: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(_detach(v) for v in value)
    return value


def _is_kv_cache(value: Any) -> bool:
    """transformers' Cache objects (DynamicCache, ...): live state that a replay would grow."""
    return hasattr(value, "get_seq_length") or type(value).__name__.endswith("Cache")


def _named_extra_inputs(
    module: nn.Module, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Split a call into (first input, every other argument by parameter name)."""
    if args:
        first, rest = args[0], args[1:]
    else:  # called as module(hidden_states=...): the first parameter came as a keyword
        params = list(inspect.signature(module.forward).parameters)
        if not params or params[0] not in kwargs:
            raise SlicePlanError(f"slice module {path!r} was called without any input.")
        kwargs = dict(kwargs)
        first, rest = kwargs.pop(params[0]), ()
    extra: dict[str, Any] = {}
    if rest:
        # GPT-2 passes past_key_values / attention_mask positionally; naming them lets
        # Slice.forward replay the call with keyword arguments only.
        params = list(inspect.signature(module.forward).parameters.values())[1:]
        for param, value in zip(params, rest):
            if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                raise SlicePlanError(
                    f"slice module {path!r} got {len(rest)} extra positional arguments that "
                    "cannot be named from its signature, so the slice cannot be replayed."
                )
            extra[param.name] = value
        if len(rest) > len(params):
            raise SlicePlanError(f"slice module {path!r} got more positional args than it names.")
    extra.update(kwargs)
    return first, extra


def _sanitize_kwargs(extra: dict[str, Any]) -> dict[str, Any]:
    """Detach tensors; drop KV caches (and turn ``use_cache`` off) so replays are pure."""
    clean: dict[str, Any] = {}
    dropped = False
    for key, value in extra.items():
        if _is_kv_cache(value):
            clean[key] = None
            dropped = True
        else:
            clean[key] = _detach(value)
    if dropped and "use_cache" in clean:
        clean["use_cache"] = False
    return clean


def _pop_residual(s: Slice, extra: dict[str, Any], slice_input: Any) -> dict[str, Any]:
    """The last member's extra inputs without its residual, checked to be the slice input."""
    extra = dict(extra)
    name = next(iter(extra), None)  # the second positional parameter comes first
    residual = extra.pop(name) if name is not None else None
    if not (isinstance(residual, torch.Tensor) and isinstance(slice_input, torch.Tensor)) or (
        not _same_tensor(residual, slice_input)
    ):
        raise SlicePlanError(
            f"residual slice {s.name!r}: the second argument of {s.paths[-1]!r} is not the "
            f"input of {s.paths[0]!r}, so the residual cannot be replayed. Use granularity "
            "'layer' or an explicit list of module paths."
        )
    return extra


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _same_tensor(a, b) or (a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` (tensors, nested in dicts / lists / tuples) moved to ``device``."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


class FeatureCapture:
    """Inputs and outputs of every slice of ``plan`` from one forward of ``model``.

    ``capture(inputs)`` runs ``model(inputs)`` (or ``model(**inputs)`` for a dict such as
    ``{"input_ids": ..., "attention_mask": ...}``) under ``torch.no_grad()`` in the model's
    current mode, and returns ``{slice name: SliceFeatures}`` in plan order.

    Hooks are registered at the start of each call and removed in a ``finally``, so the
    model never keeps hooks after a call, even when its forward raises or the caller
    forgets ``close()``; ``close()`` / the context manager only retire the object.

    With ``stop_after_last=True`` the forward is aborted as soon as every slice has its
    output (the rest of the teacher, e.g. the LM head, is not computed); the call then
    returns only the slice features.

    On the first call every multi-module slice (group) is checked to be sequential in the
    data flow: each member's output must be the tensor the next member receives.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: SlicePlan | Sequence[Slice],
        *,
        capture_inputs: bool = True,
        capture_outputs: bool = True,
        stop_after_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.plan = plan if isinstance(plan, SlicePlan) else SlicePlan(list(plan))
        if len(self.plan) == 0:
            raise SlicePlanError("FeatureCapture needs at least one slice.")
        self.plan.validate(model)
        self.capture_inputs = capture_inputs
        self.capture_outputs = capture_outputs
        self.stop_after_last = stop_after_last
        self.device = torch.device(device) if device is not None else None
        self.calls = 0
        self._groups_verified = all(len(s.paths) == 1 for s in self.plan)
        self._closed = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Retire this capture (no hooks outlive a call anyway; see the class docstring)."""
        self._closed = True

    # ------------------------------------------------------------------ capture
    def __call__(self, inputs: Any) -> dict[str, SliceFeatures]:
        if self._closed:
            raise RuntimeError("this FeatureCapture is closed; create a new one.")
        device = self.device or _model_device(self.model)
        inputs = to_device(inputs, device)
        records = {s.name: _Record() for s in self.plan}
        verify = not self._groups_verified
        links: dict[tuple[str, int], dict[str, Any]] = {}
        handles = []
        try:
            for s in self.plan:
                handles += self._register(s, records[s.name], records)
                if verify and len(s.paths) > 1:
                    handles += self._register_group_check(s, links)
            with torch.no_grad():
                try:
                    if isinstance(inputs, Mapping):
                        self.model(**inputs)
                    else:
                        self.model(inputs)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        self.calls += 1
        self._check_complete(records)
        if verify:
            self._check_groups(links)
            self._groups_verified = True
        return {
            s.name: SliceFeatures(
                input=records[s.name].input,
                output=records[s.name].output,
                kwargs=records[s.name].kwargs or {},
            )
            for s in self.plan
        }

    capture = __call__

    def _register(self, s: Slice, rec: _Record, records: dict[str, _Record]) -> list[Any]:
        first = self.model.get_submodule(s.paths[0])
        last = self.model.get_submodule(s.paths[-1])

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if rec.seen_input:
                raise SlicePlanError(
                    f"slice {s.name!r}: module {s.paths[0]!r} ran twice in one forward (shared "
                    "module); such a module cannot be a slice boundary."
                )
            rec.seen_input = True
            x, extra = _named_extra_inputs(module, s.paths[0], args, kwargs)
            rec.kwargs = _sanitize_kwargs(extra)
            if self.capture_inputs:
                rec.input = first_tensor(x).detach()
                rec.versions.append(("input", rec.input, rec.input._version))

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if rec.seen_output:
                raise SlicePlanError(
                    f"slice {s.name!r}: module {s.paths[-1]!r} ran twice in one forward (shared "
                    "module); such a module cannot be a slice boundary."
                )
            rec.seen_output = True
            if self.capture_outputs:
                rec.output = first_tensor(output).detach()
                rec.versions.append(("output", rec.output, rec.output._version))
            if self.stop_after_last and all(r.seen_output for r in records.values()):
                raise _StopForward

        return [
            first.register_forward_pre_hook(pre_hook, with_kwargs=True),
            last.register_forward_hook(hook),
        ]

    def _register_group_check(
        self, s: Slice, links: dict[tuple[str, int], dict[str, Any]]
    ) -> list[Any]:
        handles = []
        for i, path in enumerate(s.paths):
            module = self.model.get_submodule(path)
            link = links.setdefault((s.name, i), {})

            def pre(module: nn.Module, args: tuple, kwargs: dict, link=link, path=path) -> None:
                x, extra = _named_extra_inputs(module, path, args, kwargs)
                link.setdefault("input", first_tensor(x))
                link.setdefault("kwargs", extra)

            def post(module: nn.Module, args: tuple, output: Any, link=link) -> None:
                link.setdefault("output", first_tensor(output))

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        return handles

    def _check_groups(self, links: dict[tuple[str, int], dict[str, Any]]) -> None:
        for s in self.plan:
            for i in range(len(s.paths) - 1):
                out = links[(s.name, i)].get("output")
                nxt = links[(s.name, i + 1)].get("input")
                if out is None or nxt is None or not _same_tensor(out, nxt):
                    raise SlicePlanError(
                        f"group slice {s.name!r} is not sequential in the data flow: the output "
                        f"of {s.paths[i]!r} is not the input of {s.paths[i + 1]!r} (something "
                        "runs between them, e.g. a norm, activation or residual add). Group only "
                        "consecutive blocks (granularity 'group:<k>') or split this group."
                    )
            first = _sanitize_kwargs(links[(s.name, 0)].get("kwargs", {}))
            for i in range(1, len(s.paths)):
                other = _sanitize_kwargs(links[(s.name, i)].get("kwargs", {}))
                if s.residual and i == len(s.paths) - 1:
                    other = _pop_residual(s, other, links[(s.name, 0)].get("input"))
                if set(first) != set(other) or not all(
                    _same_value(first[k], other[k]) for k in first
                ):
                    raise SlicePlanError(
                        f"group slice {s.name!r}: {s.paths[i]!r} receives other extra inputs "
                        f"than {s.paths[0]!r} (e.g. a different attention mask), so the group "
                        "cannot be replayed with one set of kwargs. Use smaller slices."
                    )

    def _check_complete(self, records: dict[str, _Record]) -> None:
        for s in self.plan:
            rec = records[s.name]
            if not (rec.seen_input and rec.seen_output):
                missing = s.paths[0] if not rec.seen_input else s.paths[-1]
                raise SlicePlanError(
                    f"slice {s.name!r}: module {missing!r} did not run during the forward, so its "
                    "features cannot be captured. Is the path part of the forward for these "
                    "inputs?"
                )
            for what, tensor, version in rec.versions:
                # A later in-place op (e.g. ReLU(inplace=True)) would silently corrupt the
                # captured tensor; the version counter exposes it at no cost.
                if tensor._version != version:
                    raise RuntimeError(
                        f"the captured {what} of slice {s.name!r} was modified in place later in "
                        "the teacher forward (an in-place op such as ReLU(inplace=True) or +=). "
                        "Make that op out-of-place in the teacher."
                    )


# =========================================================================== fingerprint
def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 over the state_dict (names, dtypes, shapes and raw bytes), stable across runs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            # A uint8 view hashes every dtype (bfloat16 included, which numpy lacks).
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


# =========================================================================== manifest
@dataclass
class ShardInfo:
    file: str
    num_samples: int
    bytes: int
    sha256: str  # of the whole file (verify_checksums=true re-hashes it)
    # Per-tensor checksums (tnexp.integrity), verified when a tensor is first read; None in
    # caches written before they existed (the whole file is verified instead).
    checksums: dict[str, str] | None = None


@dataclass
class FeatureCacheManifest:
    """What a feature cache holds and what produced it (``manifest.json``)."""

    format_version: int
    teacher_fingerprint: str
    dataset_identity: dict[str, Any]
    plan: dict[str, Any]
    dtype: str
    num_samples: int
    shards: list[ShardInfo]
    features: dict[str, dict[str, list[int]]]  # slice -> per-sample input/output shapes
    labels: dict[str, Any] | None  # {"dtype", "shape"} per sample, None without labels
    created: str
    tnexp_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureCacheManifest:
        data = dict(data)
        data["shards"] = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in data["shards"]]
        return cls(**data)

    def hash(self) -> str:
        """sha256 of the canonical JSON: per-slice jobs record it to prove a shared cache."""
        return hashlib.sha256(_canonical_json(self.to_dict()).encode()).hexdigest()

    def slice_plan(self) -> SlicePlan:
        return SlicePlan.from_dict(self.plan)


def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _normalize_identity(identity: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON round trip, so tuples vs lists and key order never cause false mismatches."""
    return json.loads(_canonical_json(dict(identity or {})))


def _partials(directory: Path) -> list[Path]:
    return sorted(directory.parent.glob(f"{directory.name}.partial-*"))


def _partial_name(directory: Path) -> Path:
    # Host and PID in the name tell a later run whether the capture that wrote it is dead.
    host = socket.gethostname().replace("-", "_")
    suffix = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return directory.parent / f"{directory.name}.partial-{suffix}"


def clean_partials(directory: str | Path) -> list[Path]:
    """Remove ``<directory>.partial-*`` left by killed captures on this host; report others.

    Returns the removed paths. Leftovers of live captures, or of other hosts (whose PIDs
    cannot be checked from here), are kept and logged with the command that removes them.
    """
    import logging

    log = logging.getLogger("tnexp")
    directory = Path(directory)
    host = socket.gethostname().replace("-", "_")
    removed = []
    for partial in _partials(directory):
        parts = partial.name.rsplit(".partial-", 1)[1].rsplit("-", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if parts[0] == host and pid is not None and not pid_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
            log.warning("removed %s, left by a killed feature capture (PID %d)", partial, pid)
        else:
            log.warning(
                "%s is an unfinished feature capture of another live process or host; if "
                "that capture is dead, remove it: rm -rf %s",
                partial,
                partial,
            )
    return removed


# =========================================================================== open / verify
def _read_manifest(directory: Path) -> FeatureCacheManifest:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        partials = _partials(directory)
        where = (
            f" Unfinished capture directories: {[p.name for p in partials]}." if partials else ""
        )
        state = "exists but has" if directory.is_dir() else "does not exist, so there is"
        raise FeatureCacheError(
            f"no complete feature cache at {directory}: it {state} no {MANIFEST_FILE} (the "
            f"manifest is written last, so the capture never ran, is still running, or was "
            f"interrupted: an incomplete capture).{where} Re-run the capture (it removes "
            "leftover *.partial-* directories of killed captures on this host; the .lock file "
            "beside the cache is reused and harmless)."
        )
    try:
        data = json.loads(path.read_text())
        version = data.get("format_version") if isinstance(data, dict) else None
        if version is not None and version != FORMAT_VERSION:
            raise FeatureCacheError(
                f"feature cache {directory} has format version {version}, this tnexp reads "
                f"version {FORMAT_VERSION}; {_remedy(directory)}."
            )
        manifest = FeatureCacheManifest.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as err:
        raise FeatureCacheError(
            f"{path} is unreadable or corrupt ({type(err).__name__}: {err}); {_remedy(directory)}."
        ) from None
    return manifest


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
            f"{_remedy(directory)}."
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
    manifest = _read_manifest(directory)
    if teacher_fingerprint is not None and manifest.teacher_fingerprint != teacher_fingerprint:
        raise FeatureCacheError(
            f"stale feature cache at {directory}: it was captured from another teacher "
            f"(fingerprint {manifest.teacher_fingerprint[:12]}..., the current teacher is "
            f"{teacher_fingerprint[:12]}...); {_remedy(directory)}."
        )
    if dataset_identity is not None:
        want = _normalize_identity(dataset_identity)
        have = _normalize_identity(manifest.dataset_identity)
        if want != have:
            keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            diffs = ", ".join(
                f"{k}: cached {have.get(k)!r} vs requested {want.get(k)!r}" for k in keys
            )
            raise FeatureCacheError(
                f"dataset identity mismatch with the feature cache at {directory} ({diffs}); "
                f"{_remedy(directory)}."
            )
    if dtype is not None and manifest.dtype != dtype:
        raise FeatureCacheError(
            f"the feature cache at {directory} stores {manifest.dtype}, {dtype} was requested; "
            f"{_remedy(directory)}, or request method.cache.dtype={manifest.dtype}."
        )
    if plan is not None:
        _check_plan(manifest, plan, directory)
    for shard in manifest.shards:
        path = directory / shard.file
        if not path.is_file():
            raise FeatureCacheError(f"feature cache shard {path} is missing; {_remedy(directory)}.")
        size = path.stat().st_size
        if size != shard.bytes:
            raise FeatureCacheError(
                f"feature cache shard {path} has {size} bytes, the manifest records "
                f"{shard.bytes} (truncated or overwritten); {_remedy(directory)}."
            )
        if verify_checksums and not checksum_matches(path, shard.sha256):
            raise FeatureCacheIntegrityError(
                f"feature cache shard {path} fails its sha256 checksum (corrupt); "
                f"{_remedy(directory)}."
            )
    wanted = list(slices) if slices is not None else (plan.names() if plan is not None else None)
    return FeatureCacheDataset(
        directory, manifest, slices=wanted, max_cached_shards=max_cached_shards
    )


# =========================================================================== dataset
def collate_features(
    batch: Sequence[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Any]],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Stack samples into ``({slice: (inputs[B, ...], outputs[B, ...])}, labels[B])``."""
    names = list(batch[0][0])
    features = {
        s: (torch.stack([b[0][s][0] for b in batch]), torch.stack([b[0][s][1] for b in batch]))
        for s in names
    }
    labels = None if batch[0][1] is None else torch.stack([b[1] for b in batch])
    return features, labels


class FeatureCacheDataset(Dataset):
    """Per-sample ``({slice: (input, output)}, label)`` from a feature cache.

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
        self.max_cached_shards = max(1, int(max_cached_shards))
        counts = [s.num_samples for s in manifest.shards]
        self._starts = [sum(counts[:i]) for i in range(len(counts))]
        self.shard_ranges = [(a, a + n) for a, n in zip(self._starts, counts)]
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._verified: set[int] = set()  # shards whose tensors passed their checksums

    @property
    def dtype(self) -> torch.dtype:
        return CACHE_DTYPES[self.manifest.dtype]

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the loaded shards.
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def _keys(self) -> list[str]:
        keys = [f"{s}/{kind}" for s in self.slice_names for kind in ("input", "output")]
        return [*keys, "labels"] if self.has_labels else keys

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
                f"truncated or corrupt: {_remedy(self.directory)}."
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
                f"file was damaged after the capture; {_remedy(self.directory)}."
            )

    def __getitem__(
        self, index: int
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
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
        return features, (tensors["labels"][j] if self.has_labels else None)

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


# =========================================================================== write
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
                "batches yield different keys (labels present in some batches only)."
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
    identity = _normalize_identity(dataset_identity)
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
    work = _partial_name(directory)
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
