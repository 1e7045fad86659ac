"""Input statistics of the layers to tensorize, streamed from the teacher (calibration).

One pass of the teacher over a few calibration batches accumulates, for every layer the
factory will replace, the Gram matrix of its inputs (float64, as a running mean):

* ``nn.Linear`` / HF ``Conv1D``: ``X^T X / n`` over every token, ``X`` of shape
  ``(tokens, in)``;
* ``nn.Conv2d``: the Gram of the unfolded input patches (``c_in*kh*kw`` square, with the
  layer's own padding, stride and dilation), so that ``tr(dW^T G dW)`` is exactly the
  mean squared output error of a kernel change ``dW``.

Layers that receive the same input tensor in a forward (Llama's ``gate_proj`` and
``up_proj``) share one Gram.

Optionally (``weighting: fisher``) the statistics also hold each layer's diagonal output
Fisher under the task loss (:mod:`tnexp.fisher`, a second teacher pass with a backward).

The statistics are saved as safetensors next to a JSON header naming what produced them,
so reruns and per-slice jobs load instead of recomputing; a file that does not match the
teacher, data or layers is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tnexp.console import work_bar
from tnexp.integrity import atomic_write_bytes, tensor_checksum
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import is_hf_conv1d

FORMAT_VERSION = 2  # 2: per-Gram checksums in the header
FISHER_PREFIX = "fisher:"  # tensor names of the output Fisher diagonals in the file


class CalibrationError(TensorizationError):
    """Missing, empty, stale or corrupt calibration statistics."""


class CalibrationFormatError(CalibrationError):
    """Statistics written by an older tnexp (a cache: safe to recollect)."""


@dataclass
class InputStats:
    """Per-layer input Gram matrices (mean over samples) and where they came from."""

    grams: dict[str, torch.Tensor]  # owner layer name -> Gram (float64)
    samples: dict[str, int]  # owner layer name -> rows averaged (tokens / patches)
    aliases: dict[str, str] = field(default_factory=dict)  # layer -> owner sharing its input
    meta: dict[str, Any] = field(default_factory=dict)
    # layer name -> diagonal output Fisher (float64, per output channel); empty unless
    # collected (tnexp.fisher.collect_output_fisher). Never shared: gate/up see different gradients.
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)

    def owner(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __contains__(self, name: str) -> bool:
        return self.owner(name) in self.grams

    def gram(self, name: str) -> torch.Tensor:
        owner = self.owner(name)
        if owner not in self.grams:
            raise CalibrationError(
                f"no input statistics for layer {name!r}: the calibration covered "
                f"{sorted(self.grams)[:5]}... Recollect calibration for the layers you "
                "tensorize (the file is keyed by the tensorization spec)."
            )
        return self.grams[owner]

    @property
    def layers(self) -> list[str]:
        return sorted({*self.grams, *self.aliases})

    def output_fisher(self, name: str) -> torch.Tensor:
        """The layer's diagonal output Fisher; a clear error when it was not collected."""
        if name not in self.fisher:
            raise CalibrationError(
                f"no output Fisher for layer {name!r}: weighting 'fisher' needs statistics "
                "collected with tensorize.calibration.fisher_batches > 0 (from Python: "
                "stats.fisher = tnexp.fisher.collect_output_fisher(...))."
            )
        return self.fisher[name]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Atomically write ``<path>`` (safetensors) with the metadata in its header."""
        fields = {"samples": self.samples, "aliases": self.aliases, "meta": self.meta}
        tensors = {**self.grams, **{FISHER_PREFIX + k: v for k, v in self.fisher.items()}}
        return save_checked(path, tensors, fields, version=FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | Path, *, expect: Mapping[str, Any] | None = None) -> InputStats:
        """Read statistics written by :meth:`save`; ``expect`` must match their ``meta``."""
        grams, fields = load_checked(
            path,
            "calibration statistics",
            version=FORMAT_VERSION,
            fields=("samples", "aliases", "meta"),
            expect=expect,
        )
        fisher = {
            k[len(FISHER_PREFIX) :]: grams.pop(k)
            for k in list(grams)
            if k.startswith(FISHER_PREFIX)
        }
        for name, gram in grams.items():
            if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
                raise CalibrationError(f"{path}: Gram of {name} is not square; delete it.")
            if not torch.isfinite(gram).all():
                raise CalibrationError(f"{path}: Gram of {name} holds NaN/Inf; delete it.")
        for name, diag in fisher.items():
            if diag.ndim != 1 or not torch.isfinite(diag).all() or bool((diag < 0).any()):
                raise CalibrationError(f"{path}: output Fisher of {name} is damaged; delete it.")
        samples = {k: int(v) for k, v in fields["samples"].items()}
        return cls(
            grams=grams,
            samples=samples,
            aliases=fields["aliases"],
            meta=fields["meta"],
            fisher=fisher,
        )


def save_checked(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    fields: Mapping[str, Any],
    *,
    version: int,
) -> Path:
    """Atomically write ``tensors`` as safetensors with a format version, per-tensor
    checksums and ``fields`` (JSON values) in the header; read back by :func:`load_checked`."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": str(version),
        "checksums": json.dumps({k: tensor_checksum(v) for k, v in tensors.items()}),
        **{k: json.dumps(v, default=str) for k, v in fields.items()},
    }
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    atomic_write_bytes(path, data)
    return path


def load_checked(
    path: str | Path,
    what: str,
    *,
    version: int,
    fields: Sequence[str],
    expect: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and header ``fields`` of a file written by :func:`save_checked`.

    Refuses (:class:`CalibrationError`, naming the ``rm`` command) a missing, unreadable,
    damaged (checksum) or stale file (``expect`` differs from the header's ``meta``); a
    file of another format version raises :class:`CalibrationFormatError` (a cache: the
    caller may recompute it). ``what`` names the file's content in the messages.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{what} {path} do not exist.")
    remedy = f"delete the file (rm {path}) and rerun to recompute them"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own types on damage
        raise CalibrationError(f"{what} {path} are unreadable ({err}); {remedy}.") from None
    if header.get("format") != str(version):
        raise CalibrationFormatError(
            f"{what} {path} have format {header.get('format')!r}, this tnexp writes "
            f"{version}; {remedy}."
        )
    try:
        checksums = json.loads(header["checksums"])
        values = {k: json.loads(header[k]) for k in fields}
    except (KeyError, ValueError) as err:
        raise CalibrationError(f"{what} {path} have a damaged header ({err}); {remedy}.") from None
    meta = values.get("meta") or {}
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise CalibrationError(
                f"{what} {path} were computed for another {key} ({meta.get(key)!r}, expected "
                f"{value!r}); {remedy}."
            )
    damaged = sorted(n for n, t in tensors.items() if checksums.get(n) != tensor_checksum(t))
    if damaged or set(checksums) != set(tensors):
        raise CalibrationError(
            f"{what} {path} are damaged (checksum mismatch in "
            f"{(damaged or sorted(set(checksums) ^ set(tensors)))[:3]}); {remedy}."
        )
    return tensors, values


def _linear_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _conv_rows(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        # 'same' padding / non-zero padding modes: pad as the layer does, then unfold.
        raise CalibrationError(
            f"calibration of a Conv2d with padding={module.padding!r}, "
            f"padding_mode={module.padding_mode!r} is not supported; exclude the layer."
        )
    patches = F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )  # (B, c_in*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X`` whose Gram defines this layer's output error (tokens or patches)."""
    if isinstance(module, nn.Conv2d):
        return _conv_rows(module, x)
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return _linear_rows(module, x)
    raise CalibrationError(f"no input statistics for a {type(module).__name__}.")


def add_gram(
    sums: dict[str, torch.Tensor], counts: dict[str, int], name: str, rows: torch.Tensor
) -> None:
    """Add one batch's ``rows^T rows`` to ``sums[name]`` and its row count to ``counts``.

    The batch's Gram is taken in the input's precision (float32 at least: 2-4x faster than
    float64 on CPUs; a float16 feature cache is widened first), summed in float64.
    """
    rows = rows if rows.dtype == torch.float64 else rows.float()
    gram = (rows.T @ rows).double()
    if name in sums:
        sums[name] += gram
    else:
        sums[name] = gram
    counts[name] = counts.get(name, 0) + rows.shape[0]


class _StopForward(Exception):
    """Raised after the last hooked layer: the rest of the forward is not needed."""


class GramAccumulator:
    """Forward pre-hooks that add each named layer's input Gram (float64 running sums)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = model
        self.names = list(names)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.aliases: dict[str, str] = {}
        # Inputs seen in the current batch, kept alive so that a freed tensor's memory
        # cannot be reused by another layer's input and be mistaken for a shared one.
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles: list[Any] = []
        # Execution order of the hooked layers in the first batch; later batches stop the
        # forward right after the last of them (an LM's head and final norm are skipped).
        self.order: list[str] = []
        self.stop_after: str | None = None
        self._stop_calls = 0

    def __enter__(self) -> GramAccumulator:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name, module)))
            self._handles.append(module.register_forward_hook(self._stop_hook(name)))
        return self

    def _stop_hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _args: tuple, _output: Any) -> None:
            if name != self.stop_after:
                return
            self._stop_calls += 1
            # A module called several times per forward stops only at its last call.
            if self._stop_calls == self.order.count(name):
                raise _StopForward

        return hook

    def end_batch(self) -> None:
        """After the first batch, stop later forwards at the last hooked layer."""
        if self.stop_after is None and self.order:
            self.stop_after = self.order[-1]

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def new_batch(self) -> None:
        self._seen.clear()
        self._stop_calls = 0

    def _hook(self, name: str, module: nn.Module) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise CalibrationError(f"layer {name!r} was called without a tensor input.")
            x = args[0].detach()
            if self.stop_after is None:
                self.order.append(name)
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, type(module))
            owner = self._seen.get(key, (None, None))[0]
            if owner is not None and owner != name:
                if self.aliases.setdefault(name, owner) != owner:
                    raise CalibrationError(f"layer {name!r} shares its input inconsistently.")
                return
            self._seen[key] = (name, x)
            add_gram(self.sums, self.counts, name, layer_input_rows(module, x))

        return hook

    def stats(self, meta: Mapping[str, Any] | None = None) -> InputStats:
        missing = [n for n in self.names if n not in self.sums and n not in self.aliases]
        if missing:
            raise CalibrationError(
                f"layers {missing[:5]} never ran during calibration; they cannot be "
                "initialised from data. Exclude them or check the model's forward."
            )
        # A layer is an alias only if it shared every batch; one that also saw its own
        # input (never happens for gate/up) keeps its own Gram.
        aliases = {k: v for k, v in self.aliases.items() if k not in self.sums}
        grams = {n: (s / max(self.counts[n], 1)).cpu() for n, s in self.sums.items()}
        return InputStats(grams, dict(self.counts), aliases, dict(meta or {}))


@contextlib.contextmanager
def teacher_pass(teacher: nn.Module, device: torch.device | str | None) -> Iterator[None]:
    """The teacher in eval mode (and on ``device``) for one statistics pass, then back."""
    was_training = teacher.training
    teacher.eval()
    home = next(iter(teacher.parameters()), torch.empty(0)).device
    if device is not None:
        teacher.to(device)
    try:
        yield
    finally:
        teacher.train(was_training)
        if device is not None:  # a skeleton paged from disk (meta parameters) stays put
            teacher.to(home)


@torch.no_grad()
def collect_input_stats(
    teacher: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[Any],
    *,
    model_inputs: Callable[[Any], Any],
    num_batches: int,
    device: torch.device | str | None = None,
    progress: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> InputStats:
    """Run ``teacher`` on ``num_batches`` batches and return the layers' input Grams.

    ``model_inputs(batch)`` turns a data batch into the model's input (a tensor, or a dict
    of keyword arguments for HF models). The teacher is put in eval mode for the pass.
    """
    from tnexp.features import to_device

    if num_batches < 1:
        raise CalibrationError(
            f"calibration needs at least one batch, got num_batches={num_batches}; set "
            "tensorize.calibration.num_batches to a positive number."
        )
    seen = 0
    with (
        teacher_pass(teacher, device),
        GramAccumulator(teacher, layer_names) as acc,
        work_bar(progress, num_batches, "calibration") as advance,
    ):
        for batch in batches:
            if seen >= num_batches:
                break
            acc.new_batch()
            inputs = to_device(model_inputs(batch), device)
            try:
                if isinstance(inputs, Mapping):
                    teacher(**inputs)
                else:
                    teacher(inputs)
            except _StopForward:
                pass
            acc.end_batch()
            seen += 1
            advance()
    if seen == 0:
        raise CalibrationError(
            "the calibration data yielded no batch; check the data set (train split) or "
            "lower tensorize.calibration.num_batches."
        )
    info = {**dict(meta or {}), "batches": seen}
    return acc.stats(info)


def _within(name: str, path: str) -> bool:
    return name == path or name.startswith(f"{path}.")


@torch.no_grad()
def layers_fed_by_slice_inputs(
    model: nn.Module, plan: Any, layer_names: Sequence[str], samples: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """Which of ``layer_names`` take their slice's input itself: layer -> slice name.

    Each slice of ``plan`` (a :class:`tnexp.slicing.SlicePlan`) runs once on its input in
    ``samples``; a layer inside it whose call receives that very tensor (a one-layer
    slice; ``conv1``/``downsample`` of a residual block; ``gate``/``up`` of an MLP slice)
    has the slice input as its layer input, so its Gram can be read from cached features.
    """
    found: dict[str, str] = {}
    for piece in plan:
        x = samples.get(piece.name)
        if x is None:
            continue
        inside = [n for n in layer_names if any(_within(n, q) for q in piece.paths)]

        def hook(name: str, x: torch.Tensor = x, slice_name: str = piece.name) -> Callable:
            def record(_module: nn.Module, args: tuple) -> None:
                a = args[0] if args else None
                if (
                    isinstance(a, torch.Tensor)
                    and a.data_ptr() == x.data_ptr()
                    and a.shape == x.shape
                    and a.stride() == x.stride()
                ):
                    found.setdefault(name, slice_name)

            return record

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in inside]
        try:
            piece.forward(model, x)
        finally:
            for handle in handles:
                handle.remove()
    return found


def feature_cache_feeds(model: nn.Module, layer_names: Sequence[str], cache: Any) -> dict[str, str]:
    """:func:`layers_fed_by_slice_inputs` for the slices of a feature cache (its first
    sample): the layers whose Grams ``cache`` can give, each with its slice."""
    samples = {s: value[0].unsqueeze(0).float() for s, value in cache[0][0].items()}
    was_training = model.training
    model.eval()
    try:
        return layers_fed_by_slice_inputs(model, cache.manifest.slice_plan(), layer_names, samples)
    finally:
        model.train(was_training)


@torch.no_grad()
def input_stats_from_feature_cache(
    model: nn.Module,
    layer_names: Sequence[str],
    cache: Any,
    *,
    num_batches: int,
    batch_size: int,
    meta: Mapping[str, Any] | None = None,
) -> InputStats:
    """The layers' input Grams read from a feature cache, without a teacher pass.

    ``cache`` is a :class:`tnexp.features.FeatureCacheDataset`; its first ``num_batches``
    batches of ``batch_size`` samples (cache order) are used. Every layer must take its
    slice's cached input itself (:func:`layers_fed_by_slice_inputs`); otherwise a
    :class:`CalibrationError` names the layers (collect those online). ``model`` (the
    teacher) runs each slice once on one sample to find that out and gives the layers'
    geometry (Conv2d patches). Layers fed the same slice input share one Gram.
    """
    from torch.utils.data import DataLoader

    if num_batches < 1 or len(cache) == 0:
        raise CalibrationError(
            f"calibration from the feature cache needs at least one batch (num_batches="
            f"{num_batches}, {len(cache)} cached samples)."
        )
    fed = feature_cache_feeds(model, layer_names, cache)
    missing = [n for n in layer_names if n not in fed]
    if missing:
        raise CalibrationError(
            f"layers {missing[:5]} do not take their slice's input, so the feature cache "
            "does not hold their inputs; collect the statistics with a teacher pass."
        )
    owners: dict[str, str] = {}  # slice -> the layer whose Gram the others share
    aliases = {}
    for name in layer_names:
        owner = owners.setdefault(fed[name], name)
        if owner != name:
            aliases[name] = owner
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    loader = DataLoader(cache, batch_size=batch_size, shuffle=False, collate_fn=cache.collate)
    seen = 0
    for features, _labels in loader:
        if seen >= num_batches:
            break
        for slice_name, owner in owners.items():
            x = features[slice_name][0]
            add_gram(sums, counts, owner, layer_input_rows(model.get_submodule(owner), x.float()))
        seen += 1
    grams = {n: (total / counts[n]).cpu() for n, total in sums.items()}
    info = {**dict(meta or {}), "batches": seen, "source": "feature_cache"}
    return InputStats(grams, counts, aliases, info)


def stats_key(parts: Mapping[str, Any]) -> str:
    """A short stable hash of what determines a statistics file."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "CalibrationError",
    "CalibrationFormatError",
    "GramAccumulator",
    "InputStats",
    "add_gram",
    "collect_input_stats",
    "feature_cache_feeds",
    "input_stats_from_feature_cache",
    "layer_input_rows",
    "layers_fed_by_slice_inputs",
    "load_checked",
    "save_checked",
    "stats_key",
    "teacher_pass",
]
