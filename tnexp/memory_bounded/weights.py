"""Teacher weights block by block: safetensors reading, meta skeletons, loading and releasing."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.memory_bounded.blocks import inside
from tnexp.memory_bounded.config import HOST, BlockwiseError

__all__ = [
    "WeightsFile",
    "build_skeleton",
    "export_teacher_weights",
    "materialize",
    "materialize_outside",
    "on_meta",
    "release",
    "retie",
]


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
                    "them again with tnexp.memory_bounded.export_teacher_weights."
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
                "tnexp.memory_bounded.export_teacher_weights (or `tnexp method=pretrain`)."
            )
        if path.name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return [path.parent / s for s in shards]
        return [path]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def fingerprint(self) -> str:
        """Checksum over the weight files' bytes (in file-name order): identifies the
        teacher without loading it (keys its calibration statistics in disk mode)."""
        from tnexp.integrity import bytes_checksum, file_checksum

        files = sorted(set(self.where.values()))
        return bytes_checksum(" ".join(file_checksum(f) for f in files).encode()).split(":")[1]

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


def materialize(
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
        return only is None or any(inside(name, p) for p in only)

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


def release(root: nn.Module) -> None:
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


def on_meta(root: nn.Module, paths: Sequence[str] | None = None) -> bool:
    return any(
        p.device.type == "meta"
        for n, p in root.named_parameters()
        if paths is None or any(inside(n, q) for q in paths)
    )


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

        from tnexp.models.hf import resolve_model_source, torch_dtype

        source = resolve_model_source(cfg["name"], cfg.get("gguf_file"))
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        config = AutoConfig.from_pretrained(
            source.location,
            trust_remote_code=bool(cfg.get("trust_remote_code", False)),
            **kwargs,
        )
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        retie(model)
        dtype = torch_dtype(cfg.get("dtype", "float32"))
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model.eval()
    with init_empty_weights():
        model = instantiate(cfg)
    retie(model)
    return model.eval()


def retie(model: nn.Module) -> None:
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


def materialize_outside(teacher: nn.Module, weights: WeightsFile, blocks: Sequence[str]) -> None:
    """Load every parameter/buffer that lies outside the blocks (prefix and head)."""
    names = [
        n
        for n, _ in list(teacher.named_parameters(remove_duplicate=False))
        + list(teacher.named_buffers(remove_duplicate=False))
        if not any(inside(n, b) for b in blocks)
    ]
    if names:
        materialize(teacher, weights, HOST, only=names)
