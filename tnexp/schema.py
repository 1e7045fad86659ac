"""The structured-config schemas: the one home of the defaults of the typed config nodes.

Each dataclass here is registered in Hydra's ConfigStore (group ``schema``) and extended
by the YAML that places it, e.g. ``configs/method/parts/local_phase.yaml``::

    defaults:
      - /schema/local@local
      - _self_

so the composed config holds every key with its default (``tnexp ... --cfg job`` shows
them), an unknown key (a typo in ``method.local.batchsize=8`` or in an experiment file) is
a composition error naming the node, and a wrong type (``method.local.batch_size=abc``) too.
The YAML files set only what a method chooses differently (tests/test_schema.py checks
that they restate no default). The classes the code builds from these nodes subclass them
(``LocalConfig``, ``GlobalConfig``, ``OptimizerConfig``) or take their defaults from them
(``BlockwiseConfig``), so the Python API has the same defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from tnexp.errors import ConfigError

__all__ = [
    "SCHEMAS",
    "CalibrationSettings",
    "GlobalSettings",
    "LocalSettings",
    "MemoryBoundedSettings",
    "OptimizerSettings",
    "RuntimeSettings",
    "SliceJobsSettings",
    "is_schema_default",
    "register_schemas",
    "settings_dict",
]


@dataclass
class OptimizerSettings:
    """``optimizer`` of a training phase (tnexp/modules/optim.py)."""

    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | cosine
    warmup_steps: int = 0


@dataclass
class LocalSettings:
    """``method.local``: the local (slice-wise feature distillation) phase."""

    loss: str = "mse"  # mse | normalized_mse | cosine
    input_source: str = "teacher"  # teacher (independent slices) | student (sequential)
    trainable: str = "slice"  # slice: every parameter in a slice | tensorized: TN cores only
    # Training batch size of the local phase (the paper's 8); null: the data's batch size.
    batch_size: int | None = 8
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    # Log every slice's relative output error ||Y' - Y|| / ||Y|| (teacher inputs) at each
    # validation, so convergence is visible per slice; costs one teacher forward per batch.
    log_slice_errors: bool = True


@dataclass
class GlobalSettings:
    """``method.global``: end-to-end training on the task loss (global, hybrid, pretrain)."""

    batch_size: int | None = None  # null: the data's batch size
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)


@dataclass
class SliceJobsSettings:
    """``method.slice_jobs`` (method=local, capture, assemble): slice-parallel local.

    Each job of a Hydra multirun trains some slices and writes them into a shared
    directory; ``tnexp method=assemble`` builds the full student from them
    (docs/scale_out.md).
    """

    dir: str | None = None  # shared output dir of the per-slice jobs (null: off)
    job: int | None = None  # job index: trains slices [job*group, (job+1)*group) of the plan
    group: int = 1  # slices per job (sweep job=range(0, ceil(num_slices/group)))
    skip_done: bool = True  # a rerun skips slices with ok records for this teacher/spec/cache


@dataclass
class MemoryBoundedSettings:
    """``method.memory_bounded`` (method=local): the teacher runs block by block with only
    the current block on the device, the rest in host memory (cpu) or on disk (disk);
    docs/scale_out.md."""

    enabled: bool = False
    offload: str = "cpu"  # cpu: teacher + activations in host memory | disk: read per block
    work_dir: str | None = None  # activations + trained blocks (null: <output_dir>/memory_bounded)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    teacher_weights: str | None = (
        None  # offload=disk: safetensors (null: teacher.path, or exported)
    )
    verify: bool = True  # check once on one sample that the blocks form a chain


@dataclass
class RuntimeSettings:
    """``runtime``: the thread policy of every stage and launcher job (tnexp/runtime.py)."""

    # auto: the cores this process may use / concurrent joblib jobs, less the cores other
    # processes keep busy when the stage starts, and 1 thread for tiny steps (below);
    # OMP_NUM_THREADS, when set, wins. N: exactly N torch threads.
    threads: Any = "auto"
    # auto: a training step below this many GFLOP (forward+backward, counted on the first
    # step) runs on 1 thread (docs/benchmarks.md, "Threads").
    tiny_step_gflop: float = 0.1
    # Layout of 4-D tensors while a stage trains: auto (channels_last for models with 2-D
    # convolutions, contiguous otherwise) | channels_last | contiguous
    # (tnexp/callbacks/memory_format.py; docs/benchmarks.md, "Memory format").
    memory_format: str = "auto"


@dataclass
class CalibrationSettings:
    """``tensorize.calibration``: the teacher's input statistics for data-aware
    tensorization (init whiten | als, layout auto; docs/data_aware.md), collected once from
    training batches of the data config and saved under ``dir``."""

    num_batches: int = 64  # training batches of the data config
    # training batches of the output-Fisher pass (forward + backward with the task loss);
    # used only with tensorize.weighting=fisher
    fisher_batches: int = 8
    dir: str | None = None  # null: <paths.cache_dir>/calibration
    compensate: bool = False  # refit later layers of each slice from the student's own inputs
    compensate_slicing: Any = "block"  # the slices compensation works within (tnexp/slicing.py)
    # Chain the slices: each is refitted from the student's own output of the earlier ones
    # (every stage, the first included); compensate_slicing must then tile the network in
    # order, e.g. "decoder" for transformers (docs/data_aware.md).
    compensate_chain: bool = False


# name in the ConfigStore group ``schema`` -> schema
SCHEMAS: dict[str, type] = {
    "optimizer": OptimizerSettings,
    "local": LocalSettings,
    "global": GlobalSettings,
    "slice_jobs": SliceJobsSettings,
    "memory_bounded": MemoryBoundedSettings,
    "runtime": RuntimeSettings,
    "calibration": CalibrationSettings,
}


# where the composed config places each schema (dotted key -> schema)
PLACES: dict[str, type] = {
    "method.local": LocalSettings,
    "method.global": GlobalSettings,
    "method.slice_jobs": SliceJobsSettings,
    "method.memory_bounded": MemoryBoundedSettings,
    "runtime": RuntimeSettings,
    "tensorize.calibration": CalibrationSettings,
}


def is_schema_default(key: str, value: Any) -> bool:
    """Whether ``value`` at the dotted ``key`` is what a schema gives there by default.

    A config saved before a schema placed a key (or after it moved one) lacks it or has
    it at its default; the code used that default either way (``resume=auto``).
    """
    for place, schema in PLACES.items():
        if key == place or key.startswith(f"{place}."):
            node: Any = dataclasses.asdict(schema())
            for part in key[len(place) :].split(".")[1:]:
                if not isinstance(node, dict) or part not in node:
                    return False
                node = node[part]
            return node == value
    return False


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore as ``schema/<name>`` (idempotent)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)


def settings_dict(node: Any, schema: type, where: str) -> dict[str, Any]:
    """``node`` (a config node or a mapping) as plain keyword arguments for ``schema``.

    Composition already refuses unknown keys of a schema node; a key added with ``+`` (or
    a config built by hand) is refused here, naming ``where`` and the known keys.
    """
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    data = dict(data or {})
    known = [f.name for f in fields(schema)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; {where} has: "
            f"{', '.join(known)} (tnexp/schema.py:{schema.__name__})."
        )
    return data
