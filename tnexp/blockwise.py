"""Memory-bounded local tensorization: distill the slices block by block.

The normal local mode (:class:`tnexp.modules.LocalDistillation`) holds the teacher, the
student and the activations of every slice on one device. For models that do not fit,
:func:`distill_blockwise` walks the model's chain of sequential blocks (residual blocks of
a CNN, decoder layers of a transformer) and keeps only the current *stage* on the device:

1. **prefix pass** - the model's prefix (stem, embeddings) runs once over the training
   samples the schedule will draw, and the first block's inputs go to a spill store (host
   memory for ``offload="cpu"``, raw files in ``work_dir`` for ``offload="disk"``).
   Extra block arguments (attention masks, positions, rotary cos/sin) are recomputed per
   batch by re-running the cheap prefix up to the first block, so they are never stored.
2. **per stage** - the stage's teacher weights are put on the device (``offload="cpu"``:
   moved from the teacher in host memory; ``offload="disk"``: read from a safetensors file,
   only that block's tensors, so the full teacher is never resident); the stage's student
   is the block tensorized through the one factory; its slices are trained with the local
   loss and optimizer on (input, teacher output) pairs captured from the teacher block per
   step, exactly like the online local mode; then the stored inputs are propagated through
   the teacher block (``input_source="teacher"``) - and, for ``input_source="student"``,
   also through the trained student block, whose outputs become the next slices' inputs
   (sequential, as in GPTQ-style pipelines; the targets stay the teacher's own features,
   as in the normal mode). The trained block is written to ``work_dir/stages`` and freed.
3. **assembly** - the tensorized student is put together from the trained blocks.

What equals the normal mode (``tests/test_blockwise.py`` checks it): the batches (the
training loader's sampler and generator are replayed, so every epoch draws the normal
mode's batches in the same order), the per-slice losses, gradients and optimizer updates
(each slice's parameters get their own Adam state in both modes), and the initialisation:
with ``offload="cpu"`` the whole student is tensorized once up front, so even random
init draws the normal mode's numbers; with ``offload="disk"`` each block is tensorized on
its own, so SVD init (deterministic) is identical while random init is a different,
equally distributed draw. The remaining difference is float rounding: the stored block
inputs are computed in other batch compositions than the training batches, which changes
summation order in GEMMs/convolutions at the last bit (about 1e-7 relative) and Adam
carries that through training; the tests allow 1e-4.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from tnexp.config import plain as _plain
from tnexp.factory import (
    TensorizeReport,
    TensorizeSpec,
    count_parameters,
    match_pattern,
    needs_input_stats,
    plan_layers,
    save_tensorized,
    solve_overall_cr,
    supported_kind,
    tensorize,
)
from tnexp.features import (
    FeatureCapture,
    _named_extra_inputs,
    _same_tensor,
    _same_value,
    _sanitize_kwargs,
    _StopForward,
    to_device,
)
from tnexp.integrity import atomic_write_json
from tnexp.modules.guard import DivergenceGuard
from tnexp.modules.losses import get_distillation_loss
from tnexp.modules.optim import build_optimizer, build_scheduler
from tnexp.modules.tensorization import LocalConfig, NonFiniteLossError
from tnexp.results import Results, plain_config, run_name
from tnexp.runtime import runtime_record
from tnexp.slicing import (
    Slice,
    SlicePlan,
    decoder_layers,
    first_tensor,
    make_slice_plan,
    residual_blocks,
)
from tnexp.stages.build import (
    build,
    data_summary,
    is_language_model,
    load_teacher,
    resolve_teacher_path,
)
from tnexp.stages.evaluate import evaluate_language_model
from tnexp.stages.loggers import build_loggers, finish_loggers
from tnexp.stages.student import tensorize_spec
from tnexp.tn.mpo import MPOLinear
from tnexp.tn.tucker import TuckerConv2d

log = logging.getLogger("tnexp")

__all__ = [
    "OFFLOADS",
    "BlockwiseConfig",
    "BlockwiseError",
    "BlockwiseResult",
    "Stage",
    "StageStats",
    "WeightsFile",
    "build_skeleton",
    "distill_blockwise",
    "export_teacher_weights",
    "plan_stages",
    "run_memory_bounded_stage",
]

OFFLOADS = ("cpu", "disk")
PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}
MANIFEST = "blockwise.json"
HOST = torch.device("cpu")


class BlockwiseError(ValueError):
    """Input the memory-bounded mode cannot work with (the message names the fix)."""


# =========================================================================== config
@dataclass
class BlockwiseConfig:
    """How the block-by-block run is carried out (the training itself is a LocalConfig).

    ``epochs``, ``limit_batches`` (an int: batches per epoch; a float: fraction of the
    loader) and ``max_steps`` mean what ``trainer.max_epochs``, ``limit_train_batches`` and
    ``max_steps`` mean in the normal mode; every stage runs that whole schedule.
    """

    offload: str = "cpu"  # cpu: teacher + activations in host memory | disk: both on disk
    work_dir: str | Path | None = None  # None: a temporary directory, removed at the end
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    epochs: int = 1
    limit_batches: int | float | None = None
    max_steps: int | None = None
    gradient_clip_val: float | None = None  # per stage: the normal mode clips all slices
    gradient_clip_algorithm: str = "norm"
    precision: str = "32-true"  # 32-true | bf16-mixed
    verify: bool = True  # check on one sample that the blocks form a chain (one extra pass)
    resume: bool = False  # reuse trained stages in work_dir written by the same setup
    assemble: bool = True  # put the trained student together at the end
    progress: bool = True
    log_every_n_steps: int = 10
    # Stop a stage whose loss exceeds this factor times its lowest loss (guard.*; None:
    # NaN/Inf only), as in the normal mode (tnexp/modules/guard.py).
    divergence_factor: float | None = 1.0e4

    def __post_init__(self) -> None:
        if self.offload not in OFFLOADS:
            raise BlockwiseError(
                f"memory_bounded.offload must be one of {OFFLOADS}, got {self.offload!r} "
                "(cpu: teacher and activations in host memory; disk: read the teacher per "
                "block from safetensors and spill activations to work_dir)."
            )
        if self.epochs is None or int(self.epochs) < 1:
            raise BlockwiseError(
                f"epochs must be >= 1, got {self.epochs!r}: set trainer.max_epochs to a number."
            )
        self.epochs = int(self.epochs)
        if self.max_steps is not None and int(self.max_steps) in (-1,):
            self.max_steps = None
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise BlockwiseError(f"max_steps must be >= 1 or -1 (no limit), got {self.max_steps}.")
        if self.limit_batches is not None and not (
            isinstance(self.limit_batches, int | float) and self.limit_batches > 0
        ):
            raise BlockwiseError(
                f"limit_batches must be a positive int or fraction, got {self.limit_batches!r}."
            )
        if self.precision not in PRECISIONS:
            raise BlockwiseError(
                f"precision {self.precision!r} is not supported by the memory-bounded mode; use "
                f"one of {sorted(PRECISIONS)} (trainer.precision)."
            )
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise BlockwiseError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got "
                f"{self.gradient_clip_algorithm!r}."
            )


@dataclass(frozen=True)
class Stage:
    """Consecutive blocks trained together: one block, or the blocks of one group slice."""

    index: int
    blocks: tuple[str, ...]
    slices: tuple[Slice, ...]

    @property
    def name(self) -> str:
        return "+".join(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "blocks": list(self.blocks),
            "slices": [s.name for s in self.slices],
        }


@dataclass
class StageStats:
    """What happened in one stage (for results.json and logs)."""

    stage: Stage
    steps: int = 0
    seconds: float = 0.0
    resumed: bool = False
    losses: dict[str, float] = field(default_factory=dict)  # mean over the last epoch
    file: str | None = None
    peak_device_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.stage.to_dict(),
            "steps": self.steps,
            "seconds": self.seconds,
            "resumed": self.resumed,
            "losses": self.losses,
            "file": self.file,
            "peak_device_bytes": self.peak_device_bytes,
        }


# =========================================================================== stages
def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def plan_stages(model: nn.Module, plan: SlicePlan) -> list[Stage]:
    """Cut ``model``'s chain of blocks into stages and give each slice its stage.

    Blocks are torchvision residual blocks or a transformer's decoder layers
    (:func:`tnexp.slicing.residual_blocks` / :func:`tnexp.slicing.decoder_layers`). A slice
    must be one block, consecutive whole blocks (a group), or lie inside one block (a
    transformer MLP, a single layer); anything else cannot be trained block by block.
    """
    blocks = residual_blocks(model) or decoder_layers(model)
    if not blocks:
        raise BlockwiseError(
            "the memory-bounded mode needs a model made of a chain of sequential blocks "
            "(torchvision residual blocks, or a transformer's decoder layers such as GPT-2's "
            "transformer.h / Llama's model.layers) and found none. Use the normal local mode "
            "(method.memory_bounded.enabled=false)."
        )

    def owner(path: str) -> int | None:
        return next((i for i, b in enumerate(blocks) if _inside(path, b)), None)

    span_of: dict[str, tuple[int, int]] = {}
    for s in plan:
        owners = [owner(p) for p in s.paths]
        outside = [p for p, o in zip(s.paths, owners) if o is None]
        if outside:
            raise BlockwiseError(
                f"slice {s.name!r} lies outside the sequential blocks ({outside[0]!r} is in "
                f"none of {_short(blocks)}), so it cannot be trained block by block. Slice at "
                "'block', 'decoder' or 'group:<k>' granularity, leave it out with "
                "method.slices, or use the normal local mode."
            )
        whole = [p == blocks[o] for p, o in zip(s.paths, owners)]
        if all(whole):
            first = owners[0]
            if owners != list(range(first, first + len(owners))):
                raise BlockwiseError(
                    f"slice {s.name!r} groups blocks that are not consecutive in the chain "
                    f"{_short(blocks)}; a group must be neighbouring blocks in forward order "
                    "(e.g. granularity 'group:<k>')."
                )
            span_of[s.name] = (first, owners[-1])
        elif not any(whole) and len(set(owners)) == 1:
            span_of[s.name] = (owners[0], owners[0])
        else:
            raise BlockwiseError(
                f"slice {s.name!r} spans parts of several blocks ({list(s.paths)}); in the "
                "memory-bounded mode a slice is whole consecutive blocks or lies inside one "
                "block."
            )
    stages: list[Stage] = []
    i = 0
    while i < len(blocks):
        end = max((b for a, b in span_of.values() if a == i), default=i)
        members = [s for s in plan if span_of[s.name][0] >= i and span_of[s.name][1] <= end]
        stages.append(Stage(len(stages), tuple(blocks[i : end + 1]), tuple(members)))
        i = end + 1
    return stages


def _short(names: Sequence[str], limit: int = 6) -> str:
    return f"[{', '.join(names[:limit])}{', ...' if len(names) > limit else ''}]"


# =========================================================================== modules
def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at dotted ``path`` under ``root``, creating empty parents."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(leaf, module)


class _StageShell(nn.Module):
    """The blocks of one stage at their full paths (the same module objects), run in order.

    Keeping the full paths lets slice plans, tensorization rules and state-dict names of
    the whole model address the stage unchanged.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        super().__init__()
        self.block_paths = tuple(paths)
        for path in self.block_paths:
            _attach(self, path, model.get_submodule(path))

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x = hidden_states
        for path in self.block_paths:
            x = first_tensor(self.get_submodule(path)(x, **kwargs))
        return x


@contextlib.contextmanager
def _swapped(root: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Temporarily put ``modules`` at their paths in ``root``."""
    old = {path: root.get_submodule(path) for path in modules}
    try:
        for path, module in modules.items():
            _set_module(root, path, module)
        yield
    finally:
        for path, module in old.items():
            _set_module(root, path, module)


def _placeholder(item: Any) -> nn.Module:
    """A parameter-free stand-in of the layer the factory will build (for slice planning)."""
    if item.kind == "mpo":
        bias = getattr(item.module, "bias", None) is not None
        return MPOLinear(item.in_factors, item.out_factors, 1, bias=bias, device="meta")
    conv = item.module
    return TuckerConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, (1, 1), device="meta"
    )


def _tied_groups(root: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


class WeightsFile:
    """Tensors of a safetensors checkpoint, read by name without loading the rest.

    ``path`` is a ``.safetensors`` file, a directory holding ``model.safetensors`` /
    ``teacher.safetensors``, or a sharded checkpoint's ``*.safetensors.index.json`` (or
    its directory). On the host, safetensors hands out tensors backed by its memory map:
    their pages become resident when they are used and leave with the tensor, so a block
    that has been released holds no memory.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        files = self._files(self.path)
        self.where: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                        self.where[key] = file
            except Exception as err:  # safetensors raises its own error types
                raise BlockwiseError(
                    f"cannot read teacher weights {file} ({type(err).__name__}: {err}); write "
                    "them again with tnexp.blockwise.export_teacher_weights."
                ) from None

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_dir():
            for name in (
                "model.safetensors.index.json",
                "model.safetensors",
                "teacher.safetensors",
            ):
                if (path / name).is_file():
                    return WeightsFile._files(path / name)
            raise BlockwiseError(
                f"{path} holds no model.safetensors, teacher.safetensors or "
                "model.safetensors.index.json; point teacher_weights at the safetensors file."
            )
        if not path.is_file():
            raise BlockwiseError(
                f"teacher weights {path} do not exist; write them once with "
                "tnexp.blockwise.export_teacher_weights (or `tnexp method=pretrain`)."
            )
        if path.name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return [path.parent / s for s in shards]
        return [path]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(
        self, names: Sequence[str], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
        return out


def _materialize(
    root: nn.Module,
    weights: WeightsFile,
    device: torch.device,
    only: Sequence[str] | None = None,
) -> None:
    """Load ``root``'s parameters and persistent buffers from ``weights`` onto ``device``.

    ``only``: just the tensors at or under these paths. Tied parameters stay one object
    (a checkpoint stores one name of a tie); non-persistent buffers, which checkpoints do
    not hold, keep their values and move to ``device``.
    """

    def wanted(name: str) -> bool:
        return only is None or any(_inside(name, p) for p in only)

    groups = [g for g in _tied_groups(root) if any(wanted(n) for n in g)]
    param_names = {n for n, _ in root.named_parameters(remove_duplicate=False)}
    persistent = [n for n in root.state_dict(keep_vars=True) if wanted(n) and n not in param_names]
    missing = [g[0] for g in groups if not any(n in weights for n in g)]
    missing += [n for n in persistent if n not in weights]
    if missing:
        raise BlockwiseError(
            f"the teacher weights {weights.path} lack {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}; they were written for another "
            "architecture. Export the teacher of this model config again."
        )
    stored = {g[0]: next(n for n in g if n in weights) for g in groups}
    tensors = weights.read([*stored.values(), *persistent], device)
    for group in groups:
        value = tensors[stored[group[0]]]
        owner, leaf = _owner(root, group[0])
        old = owner._parameters[leaf]
        if tuple(value.shape) != tuple(old.shape):
            raise BlockwiseError(
                f"{group[0]}: the teacher weights hold shape {tuple(value.shape)}, the model "
                f"expects {tuple(old.shape)}; export the teacher of this model config again."
            )
        param = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
        for name in group:
            owner, leaf = _owner(root, name)
            owner._parameters[leaf] = param
    persistent_set = set(persistent)
    for name, buffer in list(root.named_buffers(remove_duplicate=False)):
        if not wanted(name):
            continue
        owner, leaf = _owner(root, name)
        owner._buffers[leaf] = (
            tensors[name].to(buffer.dtype) if name in persistent_set else buffer.to(device)
        )


def _release(root: nn.Module) -> None:
    """Put ``root``'s parameters back on the meta device and its buffers on the host."""
    meta: dict[int, nn.Parameter] = {}
    for module in root.modules():
        for leaf, param in list(module._parameters.items()):
            if param is None or param.device.type == "meta":
                continue
            if id(param) not in meta:
                meta[id(param)] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
            module._parameters[leaf] = meta[id(param)]
        for leaf, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[leaf] = buffer.to(HOST)


def _on_meta(root: nn.Module, paths: Sequence[str] | None = None) -> bool:
    return any(
        p.device.type == "meta"
        for n, p in root.named_parameters()
        if paths is None or any(_inside(n, q) for q in paths)
    )


# =========================================================================== skeletons
def build_skeleton(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The architecture of a Hydra model config with every parameter on the meta device.

    Buffers stay real (rotary frequencies and other non-persistent buffers are computed at
    construction and are not in checkpoints). Pretrained causal LMs
    (``tnexp.models.hf.build_causal_lm``) are built from their config alone, so neither
    hub weights nor a GGUF file are read or dequantized.
    """
    from accelerate import init_empty_weights
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    cfg = (
        OmegaConf.to_container(model_cfg, resolve=True)
        if isinstance(model_cfg, DictConfig)
        else dict(model_cfg)
    )
    if cfg.get("_target_") == "tnexp.models.hf.build_causal_lm":
        from transformers import AutoConfig, AutoModelForCausalLM

        from tnexp.models.hf import _torch_dtype, resolve_model_source

        source = resolve_model_source(cfg["name"], cfg.get("gguf_file"))
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        config = AutoConfig.from_pretrained(
            source.location,
            trust_remote_code=bool(cfg.get("trust_remote_code", False)),
            **kwargs,
        )
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        _retie(model)
        dtype = _torch_dtype(cfg.get("dtype", "float32"))
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model.eval()
    with init_empty_weights():
        model = instantiate(cfg)
    _retie(model)
    return model.eval()


def _retie(model: nn.Module) -> None:
    """Tie shared weights again (e.g. an LM head and its embeddings).

    accelerate's ``init_empty_weights`` registers a fresh meta parameter on every
    assignment, which unties weights that the model ties in its constructor; checkpoints
    store only one name of a tie, so the skeleton must tie them back to be loadable.
    """
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def export_teacher_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s weights as one safetensors file (atomically) for ``offload=disk``.

    A tied tensor is stored once, under its first state-dict name (as ``save_pretrained``
    does, so ``from_pretrained`` can read the file too). ``path`` is a ``.safetensors``
    file or a directory (then ``<path>/teacher.safetensors``). Do this once, in a separate
    process if peak memory matters: loading a pretrained model (and dequantizing a GGUF)
    holds the whole model, which the memory-bounded run avoids.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "teacher.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue  # the other name of a tie
        seen.add(key)
        tensors[name] = tensor.detach().to(HOST).contiguous()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


# =========================================================================== spill store
class _MemoryStore:
    """Block inputs in host memory, one row per sample."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.data: torch.Tensor | None = None
        self.count = 0

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to(HOST)
        if self.data is None:
            self.data = torch.empty((self.rows, *batch.shape[1:]), dtype=batch.dtype)
        self.data[self.count : self.count + batch.shape[0]] = batch
        self.count += batch.shape[0]

    def finish(self) -> None:
        if self.count != self.rows:
            raise RuntimeError(f"spill store got {self.count} rows, expected {self.rows}.")

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.data[rows]

    def range(self, start: int, stop: int) -> torch.Tensor:
        # A copy: a block that modifies its input in place must not change the stored rows.
        return self.data[start:stop].clone()

    def delete(self) -> None:
        self.data = None


class _DiskStore:
    """Block inputs in a raw file (rows of fixed size), read back with positioned reads.

    Plain reads instead of a memory map keep the pages in the OS cache rather than in the
    process, so the run's resident memory stays bounded by one batch.
    """

    def __init__(self, path: Path, rows: int) -> None:
        self.path = path
        self.rows = rows
        self.file = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed in delete()
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.row_bytes = 0
        self.count = 0

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to(HOST).contiguous()
        if self.shape is None:
            self.shape, self.dtype = tuple(batch.shape[1:]), batch.dtype
            self.row_bytes = math.prod(self.shape) * batch.element_size()
        view = memoryview(batch.reshape(-1).view(torch.uint8).numpy())
        while view:
            view = view[self.file.write(view) :]
        self.count += batch.shape[0]

    def finish(self) -> None:
        if self.count != self.rows:
            raise RuntimeError(f"spill store got {self.count} rows, expected {self.rows}.")
        os.fsync(self.file.fileno())

    def _read(self, rows: Sequence[int]) -> torch.Tensor:
        out = torch.empty((len(rows), *self.shape), dtype=self.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        # Consecutive rows are read with one call.
        j = 0
        while j < len(rows):
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1:
                k += 1
            chunk = buffer[j * self.row_bytes : k * self.row_bytes]
            done = 0
            while done < len(chunk):
                got = os.preadv(self.file.fileno(), [chunk[done:]], rows[j] * self.row_bytes + done)
                if got <= 0:
                    raise RuntimeError(f"spill file {self.path} is shorter than expected.")
                done += got
            j = k
        return out

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self._read(rows.tolist())

    def range(self, start: int, stop: int) -> torch.Tensor:
        return self._read(list(range(start, stop)))

    def delete(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# =========================================================================== data order
class _Indices(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def _collate_indices(items: list[int]) -> torch.Tensor:
    return torch.tensor(items, dtype=torch.long)


def _batches_per_epoch(num_batches: int, limit: int | float | None) -> int:
    # Lightning's limit_train_batches: an int caps the batches, a float takes a fraction.
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return num_batches
    if isinstance(limit, float):
        count = int(num_batches * limit)
        if count == 0:
            raise BlockwiseError(
                f"limit_train_batches={limit} of {num_batches} batches is 0 batches; raise it."
            )
        return count
    return min(num_batches, int(limit))


def replay_schedule(
    loader: DataLoader, epochs: int, limit: int | float | None = None, max_steps: int | None = None
) -> list[list[torch.Tensor]]:
    """The sample indices of every training batch, per epoch, in the order ``loader`` yields.

    The loader's own batch sampler and generator are iterated through a DataLoader of
    indices with the same worker settings, which draws from the generator exactly as
    Lightning's loop iterating ``loader`` does, so the batches equal the normal mode's.
    ``loader``'s generator is advanced in the process.
    """
    if isinstance(loader.dataset, IterableDataset):
        raise BlockwiseError(
            "the memory-bounded mode needs a map-style training dataset (indexable, with a "
            "length) to store and replay per-sample block inputs; got an IterableDataset."
        )
    indices = DataLoader(
        _Indices(len(loader.dataset)),
        batch_sampler=loader.batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=_collate_indices,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
    )
    per_epoch = _batches_per_epoch(len(indices), limit)
    schedule: list[list[torch.Tensor]] = []
    steps = 0
    for _ in range(epochs):
        take = per_epoch if max_steps is None else min(per_epoch, max_steps - steps)
        if take <= 0:
            break
        # Take exactly the batches Lightning takes (it stops by length): pulling once more
        # would exhaust the RandomSampler, which then draws an extra permutation from the
        # generator and shifts every later epoch.
        iterator = iter(indices)
        schedule.append([next(iterator) for _ in range(take)])
        del iterator
        steps += take
    return schedule


# =========================================================================== prefix probe
class _PrefixProbe:
    """Runs ``model`` up to its first block and returns that block's input and kwargs."""

    def __init__(self, model: nn.Module, first_block: str) -> None:
        self.model = model
        self.first_block = first_block

    def __call__(self, inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        found: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x, extra = _named_extra_inputs(module, self.first_block, args, kwargs)
            found["x"] = first_tensor(x).detach()
            found["kwargs"] = _sanitize_kwargs(extra)
            raise _StopForward

        block = self.model.get_submodule(self.first_block)
        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                _call(self.model, to_device(inputs, HOST))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "x" not in found:
            raise BlockwiseError(
                f"the first block {self.first_block!r} did not run in the model's forward; "
                "is it part of the forward for these inputs?"
            )
        return found["x"], found["kwargs"]


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, tuple | list):
        return any(_has_tensor(v) for v in value)
    return False


# =========================================================================== teacher access
class _Teacher:
    """One teacher block at a time on the device: moved (offload=cpu) or read (disk)."""

    def __init__(self, model: nn.Module, weights: WeightsFile | None) -> None:
        self.model = model
        self.weights = weights

    def put(self, shell: nn.Module, device: torch.device) -> None:
        if self.weights is not None:
            _materialize(shell, self.weights, device)
        else:
            shell.to(device)
        shell.eval().requires_grad_(False)

    def take_back(self, shell: nn.Module) -> None:
        if self.weights is not None:
            _release(shell)
        else:
            shell.to(HOST)


def _verify_chain(teacher: _Teacher, blocks: Sequence[str], inputs: Any) -> None:
    """One forward on one sample: each block's output must be the next block's input and
    every block must get the first block's extra arguments (they are replayed for all)."""
    model = teacher.model
    records: dict[str, dict[str, Any]] = {}
    handles = []
    shells: dict[str, _StageShell] = {}

    def pre(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            shells[path] = _StageShell(model, [path])
            teacher.put(shells[path], HOST)
            x, extra = _named_extra_inputs(module, path, args, kwargs)
            records[path] = {"input": first_tensor(x), "kwargs": _sanitize_kwargs(extra)}

        return hook

    def post(path: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            records[path]["output"] = first_tensor(output)
            teacher.take_back(shells.pop(path))
            if path == blocks[-1]:
                raise _StopForward

        return hook

    for path in blocks:
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True))
        handles.append(module.register_forward_hook(post(path)))
    try:
        with torch.no_grad():
            _call(model, to_device(inputs, HOST))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for shell in shells.values():
            teacher.take_back(shell)
    ran = [b for b in blocks if "output" in records.get(b, {})]
    if len(ran) != len(blocks):
        missing = next(b for b in blocks if b not in ran)
        raise BlockwiseError(f"block {missing!r} did not run in the teacher's forward.")
    first = records[blocks[0]]["kwargs"]
    for a, b in itertools.pairwise(blocks):
        if not _same_tensor(records[a]["output"], records[b]["input"]):
            raise BlockwiseError(
                f"the blocks are not a chain: the output of {a!r} is not the input of {b!r} "
                "(something runs between them, e.g. a norm, a pooling or a residual add), so "
                "the model cannot be run block by block. Use the normal local mode."
            )
        other = records[b]["kwargs"]
        if set(other) != set(first) or not all(_same_value(first[k], other[k]) for k in first):
            raise BlockwiseError(
                f"block {b!r} receives other extra arguments than {blocks[0]!r} (e.g. another "
                "attention mask), so they cannot be replayed per batch. Use the normal local "
                "mode."
            )


# =========================================================================== result
@dataclass
class BlockwiseResult:
    """A finished block-by-block run; ``student`` is set once assembled."""

    report: TensorizeReport
    plan: SlicePlan
    stages: list[StageStats]
    timer: Any  # tnexp.callbacks.OptimizationTimer with the accumulated times
    work_dir: Path
    offload: str
    device: torch.device
    steps_per_stage: int
    teacher_params: int
    peak_device_bytes: int | None = None
    student: nn.Module | None = None
    _assembler: Any = field(default=None, repr=False)

    def assemble(self) -> nn.Module:
        """The tensorized student with every trained block (loaded to host memory)."""
        if self.student is None:
            self.student = self._assembler()
            self._assembler = None
        return self.student

    def summary(self) -> dict[str, Any]:
        return {
            "offload": self.offload,
            "device": str(self.device),
            "work_dir": str(self.work_dir),
            "steps_per_stage": self.steps_per_stage,
            "peak_device_bytes": self.peak_device_bytes,
            "stages": [s.to_dict() for s in self.stages],
        }


# =========================================================================== the driver
def _resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BlockwiseError(f"device {name!r} was requested but CUDA is not available.")
    return device


def _stage_spec(spec: TensorizeSpec, shell: nn.Module, per_layer_cr: float | None) -> TensorizeSpec:
    """``spec`` narrowed to the modules under ``shell``, with the solved per-layer CR.

    Rules and exclusions that match no tensorizable module there are dropped (the factory
    rejects them); every remaining module keeps its first matching rule, and the size
    comes from the CR solved once over the whole model, so each layer gets the shape the
    whole-model tensorization gives it.
    """
    names = [n for n, m in shell.named_modules() if n and supported_kind(m)]

    def used(pattern: str) -> bool:
        return any(match_pattern(n, pattern) for n in names)

    rules = [
        dataclasses.replace(r, cr=per_layer_cr)
        if per_layer_cr is not None and not r.has_explicit_size
        else r
        for r in spec.rules
        if used(r.pattern)
    ]
    return TensorizeSpec(
        rules=rules,
        exclude=[e for e in spec.exclude if used(e)],
        overall_cr=None,
        contraction=spec.contraction,
    )


def _fingerprint(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def distill_blockwise(
    teacher: nn.Module,
    spec: TensorizeSpec | Mapping[str, Any] | None,
    train_loader: DataLoader,
    task: Any,
    *,
    granularity: Any = "block",
    slices: Sequence[int | str] | None = None,
    local: LocalConfig | None = None,
    config: BlockwiseConfig | None = None,
    teacher_weights: str | Path | None = None,
    student: tuple[nn.Module, TensorizeReport] | None = None,
    loggers: Sequence[Any] = (),
    identity: Mapping[str, Any] | None = None,
) -> BlockwiseResult:
    """Train the tensorized slices of ``teacher`` block by block (see the module docstring).

    Args:
        teacher: ``offload="cpu"``: the pretrained model in host memory. ``offload="disk"``:
            its skeleton (:func:`build_skeleton`; parameters may be on the meta device),
            whose weights come from ``teacher_weights``. In disk mode this object becomes
            the assembled student (its blocks are replaced), so the teacher is never copied.
        spec: the tensorization spec (rules, exclusions, overall CR), as for
            :func:`tnexp.factory.tensorize`. May be None in cpu mode when ``student`` is given.
        train_loader: the normal mode's training loader; its batches are replayed.
        task: ``tnexp.tasks`` task (``model_inputs`` turns a batch into model inputs).
        granularity, slices: the slice plan, as ``method.slicing`` / ``method.slices``.
        local: loss, input source, trainable parameters and optimizer.
        config: offload, device, schedule (:class:`BlockwiseConfig`).
        teacher_weights: safetensors of the teacher for ``offload="disk"``.
        student: cpu mode only: an already tensorized ``(student, report)`` (run_stage
            passes the one it built, so initialisation matches the normal mode).
        loggers: Lightning loggers (CSV, W&B) to receive the per-step losses.
        identity: extra values identifying the run for ``resume`` (data, seed, model).
    """
    from tnexp.callbacks import OptimizationTimer

    config = config or BlockwiseConfig()
    local = local or LocalConfig()
    device = _resolve_device(config.device)
    distill = get_distillation_loss(local.loss)
    if not isinstance(train_loader, DataLoader):
        raise BlockwiseError(
            f"train_loader must be a torch DataLoader (its sampler is replayed), got "
            f"{type(train_loader).__name__}."
        )
    teacher.eval().requires_grad_(False)
    teacher_params = count_parameters(teacher)

    # ---------------------------------------------------------------- student structure
    weights: WeightsFile | None = None
    rest: dict[str, nn.Module] = {}  # tensorized layers outside the blocks (disk mode)
    layer_reports: dict[str, Any] = {}

    def planned_stages(model: nn.Module) -> tuple[SlicePlan, list[Stage]]:
        plan = make_slice_plan(model, granularity)
        if slices is not None:
            plan = plan.select(list(slices))
        return plan, plan_stages(model, plan)

    if config.offload == "cpu":
        if _on_meta(teacher):
            raise BlockwiseError(
                "offload=cpu needs the teacher's weights in host memory, but some of its "
                "parameters are on the meta device; use offload=disk with teacher_weights."
            )
        if student is None:
            if spec is None:
                raise BlockwiseError("pass a tensorization spec (or a tensorized student).")
            student = tensorize(teacher, spec)
        student_model, report = student
        student_model.eval()
        plan, stages = planned_stages(student_model)
        per_layer_cr = report.per_layer_cr
        tensorized_names = [layer.name for layer in report.layers]
    else:
        if student is not None:
            raise BlockwiseError(
                "offload=disk tensorizes each block when it is loaded; do not pass a student."
            )
        if spec is None:
            raise BlockwiseError("offload=disk needs the tensorization spec.")
        if teacher_weights is None:
            raise BlockwiseError(
                "offload=disk reads the teacher block by block from a safetensors file: pass "
                "teacher_weights (method.memory_bounded.teacher_weights), written once with "
                "tnexp.blockwise.export_teacher_weights or by `tnexp method=pretrain`."
            )
        spec = TensorizeSpec.from_config(spec)
        weights = WeightsFile(teacher_weights)
        _retie(teacher)
        planned = plan_layers(teacher, spec)
        per_layer_cr = (
            solve_overall_cr(teacher, planned, spec.overall_cr)
            if spec.overall_cr is not None
            else None
        )
        tensorized_names = [item.name for item in planned]
        student_model = None
        report = None
        # Plan the slices on parameter-free stand-ins of the layers the factory will build.
        with _swapped(teacher, {item.name: _placeholder(item) for item in planned}):
            plan, stages = planned_stages(teacher)
    block_paths = [b for s in stages for b in s.blocks]
    outside = [n for n in tensorized_names if not any(_inside(n, b) for b in block_paths)]
    last_trained = max(s.index for s in stages if s.slices)
    source = local.input_source
    tensorized_stage = {
        s.index: any(_inside(n, b) for n in tensorized_names for b in s.blocks) for s in stages
    }

    # ---------------------------------------------------------------- host part (prefix/head)
    teacher_access = _Teacher(teacher, weights)
    if weights is not None:
        # Everything outside the blocks (stem / embeddings, head) lives in host memory.
        _materialize_outside(teacher, weights, block_paths)
        if outside:
            shell = _StageShell(teacher, outside)
            rest_student, rest_report = tensorize(shell, _stage_spec(spec, shell, per_layer_cr))
            rest = {n: rest_student.get_submodule(n) for n in outside}
            layer_reports.update({layer.name: layer for layer in rest_report.layers})

    # ---------------------------------------------------------------- schedule and streams
    schedule = replay_schedule(train_loader, config.epochs, config.limit_batches, config.max_steps)
    steps_per_stage = sum(len(e) for e in schedule)
    if steps_per_stage == 0:
        raise BlockwiseError("the training loader yields no batches; nothing to train.")
    used = torch.unique(torch.cat([b for e in schedule for b in e]))  # sorted
    row_of = torch.full((len(train_loader.dataset),), -1, dtype=torch.long)
    row_of[used] = torch.arange(used.numel())
    ordered = DataLoader(
        Subset(train_loader.dataset, used.tolist()),
        batch_size=train_loader.batch_size or 1,
        shuffle=False,
        num_workers=train_loader.num_workers,
        collate_fn=train_loader.collate_fn,
    )
    dataset, collate = train_loader.dataset, train_loader.collate_fn
    if config.verify and len(block_paths) > 1:
        first = next(iter(DataLoader(Subset(dataset, used[:1].tolist()), collate_fn=collate)))
        _verify_chain(teacher_access, block_paths, task.model_inputs(first))

    # Created only now, so that bad input found above leaves nothing behind.
    temporary = config.work_dir is None
    work_dir = (
        Path(tempfile.mkdtemp(prefix="tnexp-blockwise-")) if temporary else Path(config.work_dir)
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    spill = work_dir / "activations"
    live_stores: list[Any] = []

    def new_store(name: str) -> Any:
        store = (
            _DiskStore(spill / f"{name}.bin", used.numel())
            if config.offload == "disk"
            else _MemoryStore(used.numel())
        )
        live_stores.append(store)
        return store

    probe = _PrefixProbe(teacher, block_paths[0])
    student_probe: _PrefixProbe | None = None
    if source == "student":
        student_probe = (
            _PrefixProbe(student_model, block_paths[0]) if student_model is not None else probe
        )
    try:
        spill.mkdir(exist_ok=True)
        streams = {"teacher": new_store("s000-teacher")}
        if source == "student":
            streams["student"] = new_store("s000-student")
        constant_kwargs: dict[str, Any] | None = None
        dynamic = False
        for raw in ordered:
            inputs = task.model_inputs(raw)
            x, kwargs = probe(inputs)
            if constant_kwargs is None:
                constant_kwargs = kwargs
                dynamic = _has_tensor(kwargs)
            streams["teacher"].append(x)
            if student_probe is not None:
                with _swapped(teacher, rest) if student_model is None else contextlib.nullcontext():
                    xs, _ = student_probe(inputs)
                streams["student"].append(xs)
        for store in streams.values():
            store.finish()

        def kwargs_for(rows_raw: Any) -> dict[str, Any]:
            if not dynamic:
                return constant_kwargs
            return probe(task.model_inputs(rows_raw))[1]

        def raw_batch(indices: torch.Tensor) -> Any:
            return collate([dataset[i] for i in indices.tolist()])

        # ---------------------------------------------------------------- resume bookkeeping
        stage_dir = work_dir / "stages"
        stage_dir.mkdir(exist_ok=True)
        fingerprint = _fingerprint(
            {
                "plan": plan.to_dict(),
                "stages": [s.to_dict() for s in stages],
                "local": dataclasses.asdict(local),
                "schedule": [[b.tolist() for b in e] for e in schedule],
                "tensorize": (spec.to_dict() if isinstance(spec, TensorizeSpec) else None)
                or (report.to_dict() if report is not None else None),
                "offload": config.offload,
                "precision": config.precision,
                "clip": [config.gradient_clip_val, config.gradient_clip_algorithm],
                "identity": dict(identity or {}),
            }
        )
        manifest_path = work_dir / MANIFEST
        manifest = {"fingerprint": fingerprint, "stages": {}}
        if manifest_path.is_file():
            old = json.loads(manifest_path.read_text())
            if config.resume and old.get("fingerprint") == fingerprint:
                manifest = old
            elif config.resume and old.get("stages"):
                raise BlockwiseError(
                    f"{work_dir} holds trained stages of another setup (data, plan, schedule or "
                    "tensorization differ), so they cannot be resumed; use another work_dir or "
                    "delete it."
                )

        def save_manifest() -> None:
            atomic_write_json(manifest_path, manifest)

        save_manifest()

        # ---------------------------------------------------------------- per stage
        timer = OptimizationTimer(monitor="blockwise", mode="min")
        timer.on_fit_start(None, None)
        autocast_dtype = PRECISIONS[config.precision]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats: list[StageStats] = []
        student_blocks: dict[str, nn.Module] = {}  # disk mode: trained blocks, weights on disk
        stage_files: dict[int, Path] = {}
        logged_steps = 0
        for stage in stages:
            stat = StageStats(stage)
            stats.append(stat)
            disk_student = config.offload == "disk" and tensorized_stage[stage.index]
            if stage.index > last_trained and not disk_student:
                continue  # after the last slice, nothing to train, propagate or tensorize
            started = time.perf_counter()
            t_shell = _StageShell(teacher, stage.blocks)
            teacher_access.put(t_shell, device)
            if config.offload == "cpu":
                s_shell = _StageShell(student_model, stage.blocks)
                if stage.slices or source == "student":
                    s_shell.to(device)
            elif disk_student:
                with torch.no_grad():
                    spec_here = _stage_spec(spec, t_shell, per_layer_cr)
                    s_shell, stage_report = tensorize(t_shell, spec_here)
                layer_reports.update({layer.name: layer for layer in stage_report.layers})
            else:
                s_shell = t_shell  # a dense block: the student's is the teacher's
            s_shell.eval()
            file = stage_dir / f"{stage.index:04d}-{_slug(stage.name)}.safetensors"
            done = manifest["stages"].get(stage.name)
            if stage.slices and done and file.is_file() and config.resume:
                _materialize(s_shell, WeightsFile(file), device)
                stat.resumed, stat.losses, stat.steps = True, done["losses"], done["steps"]
                log.info("stage %s: resumed from %s", stage.name, file)
            elif stage.slices:
                logged_steps = _train_stage(
                    stage,
                    t_shell,
                    s_shell,
                    streams,
                    row_of,
                    schedule,
                    kwargs_for,
                    raw_batch if dynamic else None,
                    local,
                    distill,
                    device,
                    autocast_dtype,
                    config,
                    timer,
                    stat,
                    loggers,
                    logged_steps,
                )
            if stage.slices or disk_student:
                _save_stage(s_shell, file)
                stat.file = str(file)
                stage_files[stage.index] = file
                if stage.slices and not stat.resumed:
                    manifest["stages"][stage.name] = {
                        "file": file.name,
                        "losses": stat.losses,
                        "steps": stat.steps,
                    }
                    save_manifest()
            if stage.index < last_trained:
                streams = _propagate(
                    stage,
                    t_shell,
                    s_shell,
                    streams,
                    ordered,
                    kwargs_for,
                    dynamic,
                    device,
                    new_store,
                )
            teacher_access.take_back(t_shell)
            if disk_student:
                _release(s_shell)
                for path in stage.blocks:
                    student_blocks[path] = s_shell.get_submodule(path)
            elif config.offload == "cpu":
                s_shell.to(HOST)
            _trim_host_memory()
            stat.seconds = time.perf_counter() - started
            if device.type == "cuda":
                stat.peak_device_bytes = int(torch.cuda.max_memory_allocated(device))
    except BaseException:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    finally:
        for store in live_stores:  # every spill file, also after a failure
            store.delete()
        shutil.rmtree(spill, ignore_errors=True)
    timer.on_fit_end(None, None)

    # ---------------------------------------------------------------- report and assembly
    if report is None:
        order = {name: i for i, name in enumerate(tensorized_names)}
        layers = sorted(layer_reports.values(), key=lambda layer: order[layer.name])
        saved = sum(layer.params_before - layer.params_after for layer in layers)
        report = TensorizeReport(
            layers=layers,
            model_params_before=teacher_params,
            model_params_after=teacher_params - saved,
            overall_cr_target=spec.overall_cr,
            per_layer_cr=per_layer_cr,
            contraction=spec.contraction,
        )

    def assemble() -> nn.Module:
        if config.offload == "cpu":
            model = student_model
        else:
            model = teacher  # the skeleton becomes the student: the teacher is never copied
            for path, module in rest.items():
                _set_module(model, path, module.to(HOST))
            for stage in stages:
                if stage.index in stage_files and tensorized_stage[stage.index]:
                    shell = nn.Module()
                    for path in stage.blocks:
                        _set_module(model, path, student_blocks[path])
                        _attach(shell, path, student_blocks[path])
                    _materialize(shell, WeightsFile(stage_files[stage.index]), HOST)
                elif _on_meta(model, stage.blocks):
                    _materialize(model, weights, HOST, only=list(stage.blocks))
        model.requires_grad_(True)
        report.model_params_after = count_parameters(model)
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        return model.eval()

    result = BlockwiseResult(
        report=report,
        plan=plan,
        stages=stats,
        timer=timer,
        work_dir=work_dir,
        offload=config.offload,
        device=device,
        steps_per_stage=steps_per_stage,
        teacher_params=teacher_params,
        peak_device_bytes=(
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        ),
        _assembler=assemble,
    )
    if config.assemble:
        result.assemble()
    return result


def _materialize_outside(teacher: nn.Module, weights: WeightsFile, blocks: Sequence[str]) -> None:
    """Load every parameter/buffer that lies outside the blocks (prefix and head)."""
    names = [
        n
        for n, _ in list(teacher.named_parameters(remove_duplicate=False))
        + list(teacher.named_buffers(remove_duplicate=False))
        if not any(_inside(n, b) for b in blocks)
    ]
    if names:
        _materialize(teacher, weights, HOST, only=names)


def _trim_host_memory() -> None:
    """Give the host memory of the finished block back to the OS.

    Freed tensors of a few MB land in glibc's heap, which keeps them and lets the resident
    size creep up block after block; ``malloc_trim`` returns the free pages. A no-op
    where glibc is not the allocator.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _save_stage(shell: nn.Module, file: Path) -> None:
    from safetensors.torch import save_model

    tmp = file.with_name(f".{file.name}.partial")
    save_model(shell, str(tmp))
    os.replace(tmp, file)


def _train_stage(
    stage: Stage,
    t_shell: nn.Module,
    s_shell: nn.Module,
    streams: dict[str, Any],
    row_of: torch.Tensor,
    schedule: list[list[torch.Tensor]],
    kwargs_for: Any,
    raw_batch: Any,
    local: LocalConfig,
    distill: Any,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    config: BlockwiseConfig,
    timer: Any,
    stat: StageStats,
    loggers: Sequence[Any],
    logged_steps: int,
) -> int:
    """Train the slices of one stage over the replayed schedule (the online local step)."""
    from tqdm.auto import tqdm

    dtype = next(s_shell.parameters()).dtype
    sub_plan = SlicePlan(list(stage.slices))
    t_capture = FeatureCapture(t_shell, sub_plan, stop_after_last=True)
    s_capture = (
        FeatureCapture(s_shell, sub_plan, capture_outputs=False, stop_after_last=True)
        if local.input_source == "student"
        else None
    )
    params: dict[int, nn.Parameter] = {}
    for s in stage.slices:
        group = (
            s.tensorized_parameters(s_shell)
            if local.trainable == "tensorized"
            else s.parameters(s_shell)
        )
        params.update({id(p): p for p in group})
    for p in s_shell.parameters():
        p.requires_grad_(id(p) in params)
    optimizer = build_optimizer([{"params": list(params.values())}], local.optimizer)
    scheduler = build_scheduler(optimizer, local.optimizer, sum(len(e) for e in schedule))
    total_steps = sum(len(e) for e in schedule)
    guard = DivergenceGuard(factor=config.divergence_factor)
    bar = tqdm(
        total=total_steps,
        desc=f"stage {stage.index} {stage.name}",
        unit="step",
        disable=not config.progress,
        leave=False,
    )
    step = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    try:
        for epoch, batches in enumerate(schedule):
            sums: dict[str, float] = {s.name: 0.0 for s in stage.slices}
            for indices in batches:
                sync()
                start = time.perf_counter()
                kwargs = to_device(kwargs_for(raw_batch(indices) if raw_batch else None), device)
                rows = row_of[indices]
                x = streams["teacher"].gather(rows).to(device)
                teacher_features = t_capture({"hidden_states": x, **kwargs})
                pairs = {n: (f.input, f.output, f.kwargs) for n, f in teacher_features.items()}
                if s_capture is not None:
                    xs = streams["student"].gather(rows).to(device)
                    with torch.no_grad():
                        feats = s_capture({"hidden_states": xs, **kwargs})
                    pairs = {
                        n: (feats[n].input, out, feats[n].kwargs)
                        for n, (_, out, _) in pairs.items()
                    }
                sync()
                captured = time.perf_counter() - start
                losses = {}
                with (
                    torch.autocast(device.type, dtype=autocast_dtype)
                    if autocast_dtype is not None
                    else contextlib.nullcontext()
                ):
                    for s in stage.slices:
                        inp, target, kw = pairs[s.name]
                        prediction = s.forward(s_shell, inp.to(dtype), **kw)
                        loss = distill(prediction, target.to(prediction.dtype))
                        if not torch.isfinite(loss).all():
                            raise NonFiniteLossError(
                                f"slice {s.name!r} is {loss.item()} at step {step} (epoch "
                                f"{epoch}) of stage {stage.name!r}. Training stopped; lower the "
                                "learning rate or check the inputs for NaN (the trained earlier "
                                "stages are kept in the work_dir; resume with resume=auto)."
                            )
                        losses[s.name] = loss
                total = torch.stack(list(losses.values())).sum()
                guard.check(
                    total, phase="local", what=f"stage {stage.name!r} loss", step=step, epoch=epoch
                )
                total.backward()
                if config.gradient_clip_val is not None:
                    if config.gradient_clip_algorithm == "norm":
                        nn.utils.clip_grad_norm_(params.values(), config.gradient_clip_val)
                    else:
                        nn.utils.clip_grad_value_(params.values(), config.gradient_clip_val)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                sync()
                elapsed = time.perf_counter() - start
                timer.optimization_s += max(elapsed - captured, 0.0)
                timer.feature_capture_s += captured
                timer.num_steps_timed += 1
                values = {n: float(v.detach()) for n, v in losses.items()}
                for n, v in values.items():
                    sums[n] += v
                step += 1
                logged_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(total.detach()):.4g}")
                if loggers and (logged_steps % max(1, config.log_every_n_steps) == 0):
                    metrics = {f"train/slice/{n}": v for n, v in values.items()}
                    metrics.update(
                        {"train/loss": float(total.detach()), "train/stage": stage.index}
                    )
                    for logger in loggers:
                        logger.log_metrics(metrics, step=logged_steps)
            if batches:
                stat.losses = {n: v / len(batches) for n, v in sums.items()}
    finally:
        bar.close()
        t_capture.close()
        if s_capture is not None:
            s_capture.close()
        for p in s_shell.parameters():
            p.requires_grad_(False)
    stat.steps = step
    return logged_steps


def _propagate(
    stage: Stage,
    t_shell: nn.Module,
    s_shell: nn.Module,
    streams: dict[str, Any],
    ordered: DataLoader,
    kwargs_for: Any,
    dynamic: bool,
    device: torch.device,
    new_store: Any,
) -> dict[str, Any]:
    """The next stage's inputs: every stored input through this stage's block(s)."""
    tag = f"s{stage.index + 1:03d}"
    nxt = {name: new_store(f"{tag}-{name}") for name in streams}
    shells = {"teacher": t_shell, "student": s_shell}
    start = 0
    with torch.no_grad():
        for raw in ordered if dynamic else _counts(ordered):
            count = _batch_len(raw) if dynamic else raw
            kwargs = to_device(kwargs_for(raw if dynamic else None), device)
            for name, store in streams.items():
                x = store.range(start, start + count).to(device)
                nxt[name].append(shells[name](x, **kwargs))
            start += count
    for name, store in streams.items():
        store.delete()
        nxt[name].finish()
    return nxt


def _counts(loader: DataLoader) -> Iterator[int]:
    n, size = len(loader.dataset), loader.batch_size or 1
    for start in range(0, n, size):
        yield min(size, n - start)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, tuple | list):
        return _batch_len(batch[0])
    raise BlockwiseError(f"cannot tell the batch size of a {type(batch).__name__} batch.")


# =========================================================================== Hydra stage
def run_memory_bounded_stage(cfg: Any) -> dict[str, Any]:
    """``method=local`` with ``method.memory_bounded.enabled=true``: the block-by-block run
    behind :func:`tnexp.stages.train.run_stage`, writing the same results schema (tnexp.results)."""
    method = cfg.method
    mb = method.memory_bounded
    if method.name != "local":
        raise BlockwiseError(
            f"method.memory_bounded covers method=local only, not {method.name!r}; set "
            "method.memory_bounded.enabled=false."
        )
    if method.features != "online":
        raise BlockwiseError(
            "method.memory_bounded keeps its own per-block activations; set "
            "method.features=online (the feature cache holds every slice at once)."
        )
    trainer = cfg.trainer
    if trainer.get("fast_dev_run"):
        raise BlockwiseError(
            "trainer.fast_dev_run is not supported by the memory-bounded mode; use "
            "trainer.max_epochs=1 trainer.limit_train_batches=1."
        )
    if int(trainer.get("accumulate_grad_batches") or 1) != 1:
        raise BlockwiseError(
            "trainer.accumulate_grad_batches must be 1 in the memory-bounded mode."
        )
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(mb.work_dir) if mb.work_dir else out / "memory_bounded"
    device = mb.device
    if device in (None, "auto") and trainer.accelerator == "cpu":
        device = "cpu"
    config = BlockwiseConfig(
        offload=str(mb.offload),
        work_dir=work_dir,
        device=str(device or "auto"),
        epochs=trainer.max_epochs,
        limit_batches=trainer.get("limit_train_batches"),
        max_steps=trainer.get("max_steps"),
        gradient_clip_val=trainer.get("gradient_clip_val"),
        gradient_clip_algorithm=str(trainer.get("gradient_clip_algorithm") or "norm"),
        precision=str(trainer.precision),
        verify=bool(mb.get("verify", True)),
        resume=cfg.resume == "auto",
        progress=cfg.callbacks.progress_bar != "none",
        log_every_n_steps=int(trainer.log_every_n_steps or 10),
        divergence_factor=(cfg.get("guard") or {}).get("divergence_factor", 1.0e4),
    )
    if cfg.resume not in (None, False, "auto"):
        raise BlockwiseError(
            "the memory-bounded mode resumes from its work_dir: use resume=auto (Lightning "
            ".ckpt files do not apply)."
        )
    local = LocalConfig(**_plain(method.local))
    spec = tensorize_spec(cfg)
    skipped: list[str] = []
    # The one set-up step of every stage, so random init draws the same numbers as there.
    parts = build(cfg, teacher=config.offload == "cpu")
    datamodule, task = parts.datamodule, parts.task
    if config.offload == "cpu":
        teacher, student, report = parts.teacher, parts.student, parts.report
        teacher_weights = None
    else:
        if needs_input_stats(spec):
            raise BlockwiseError(
                "data-aware tensorization (init whiten/als, layout auto) needs the teacher's "
                "input statistics, which offload=disk does not collect block by block yet; "
                "use method.memory_bounded.offload=cpu, or tensorize.init=svd."
            )
        student = report = None
        teacher_weights = mb.get("teacher_weights") or (
            resolve_teacher_path(cfg.teacher.path) if cfg.teacher.path else None
        )
        if teacher_weights is None:
            if not is_language_model(cfg):
                resolve_teacher_path(None)  # raises the usual "run method=pretrain" error
            teacher_weights = work_dir / "teacher.safetensors"
            if not teacher_weights.is_file():
                log.warning(
                    "offload=disk: exporting the teacher once to %s; this process holds the "
                    "whole teacher while it does. For bounded peak memory export it beforehand "
                    "and set method.memory_bounded.teacher_weights.",
                    teacher_weights,
                )
                dense = load_teacher(cfg)
                export_teacher_weights(dense, teacher_weights)
                del dense
                gc.collect()
        teacher = build_skeleton(cfg.model)
        skipped = ["before", "teacher"]  # neither whole model is ever in memory
    datamodule.setup("fit")
    data_batch_size = datamodule.batch_size
    if local.batch_size:
        datamodule.batch_size = int(local.batch_size)
    loader = datamodule.train_dataloader()
    # Validation uses the data's batch size, as in the normal mode (only limit_val_batches
    # makes it matter).
    datamodule.batch_size = data_batch_size
    name = run_name(cfg, report)
    loggers = build_loggers(cfg, out, name)
    extra: dict[str, Any] = {}
    if student is not None:
        before = evaluate_language_model(cfg, datamodule, student, "before_training")
        if before:
            extra["before"] = before
    started = time.time()
    result = distill_blockwise(
        teacher,
        spec,
        loader,
        task,
        granularity=_plain(method.slicing),
        slices=list(method.slices) if method.slices is not None else None,
        local=local,
        config=config,
        teacher_weights=teacher_weights,
        student=(student, report) if student is not None else None,
        loggers=loggers,
        identity={
            "data": datamodule.identity() if hasattr(datamodule, "identity") else None,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "seed": int(cfg.seed),
            "teacher": str(teacher_weights or cfg.teacher.path),
        },
    )
    wall = time.time() - started
    student_model = result.student
    final = validate(
        student_model, datamodule, task, result.device, trainer.get("limit_val_batches")
    )
    timer = result.timer
    timer.monitor, timer.mode = task.monitor, task.mode
    value = final.get(task.monitor)
    timer.history.append(
        {
            "step": result.steps_per_stage,
            "epoch": config.epochs - 1,
            "optimization_s": timer.optimization_s,
            "wall_s": timer.wall_s,
            "value": value,
            "metrics": final,
        }
    )
    if value is not None and not math.isnan(value):
        timer.best_value = value
        timer.time_to_best_s = timer.optimization_s
        timer.wall_to_best_s = timer.wall_s
        timer.step_at_best = result.steps_per_stage
        timer.epoch_at_best = config.epochs - 1
    after = evaluate_language_model(cfg, datamodule, student_model, "final")
    if after:
        extra["final_eval"] = after
    if config.offload == "cpu":
        dense = evaluate_language_model(cfg, datamodule, teacher, "teacher")
        if dense:
            extra["teacher"] = dense
    base_config = OmegaConf.to_container(cfg.model, resolve=True)
    save_tensorized(student_model, result.report, out / "student", base_config=base_config)
    results = Results(
        method=method.name,
        experiment=cfg.experiment_name,
        run_name=name,
        task={"monitor": task.monitor, "mode": task.mode},
        metrics={"final": final, "best": {task.monitor: timer.best_value}, **extra},
        time={**timer.summary(), "run_wall_s": wall},
        params={"student": count_parameters(student_model), "teacher": result.teacher_params},
        tensorize=result.report.to_dict(),
        weights={"student": str(out / "student"), "best_checkpoint": None},
        data=data_summary(cfg, datamodule),
        epochs=config.epochs,
        global_step=result.steps_per_stage,
        memory_bounded={
            **result.summary(),
            "skipped_evaluations": skipped if is_language_model(cfg) else [],
        },
        runtime=runtime_record(),
        config=plain_config(cfg),
    ).write(out)
    log.info("results written to %s", out / "results.json")
    for logger in loggers:
        logger.log_metrics(final, step=result.steps_per_stage)
        logger.save()
    finish_loggers(loggers, results)
    return results


@torch.no_grad()
def validate(
    model: nn.Module,
    datamodule: Any,
    task: Any,
    device: torch.device,
    limit_batches: int | float | None = None,
) -> dict[str, float]:
    """The validation metrics of ``model`` (``val/...``), as the normal mode's validation
    epoch computes them (``limit_batches`` as ``trainer.limit_val_batches``)."""
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    count = len(loader) if limit_batches is None else _batches_per_epoch(len(loader), limit_batches)
    was_training = model.training
    model.eval().to(device)
    metrics = task.make_metrics().to(device)
    for batch in itertools.islice(loader, count):
        batch = to_device(batch, device)
        outputs = task.forward(model, batch)
        task.update_metrics(metrics, outputs, batch, task.loss(outputs, batch))
    values = task.finalize(metrics.compute())
    model.train(was_training).to(HOST)
    return {f"val/{k}": float(v) for k, v in values.items()}
