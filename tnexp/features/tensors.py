"""Tensor plumbing shared by feature capture and its users: device moves, identity, fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "attention_mask",
    "detach",
    "model_device",
    "same_tensor",
    "same_value",
    "teacher_fingerprint",
    "to_device",
]


def attention_mask(inputs: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of model inputs (a dict such as a tokenizer's output), if any."""
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None
    return None


def detach(value: Any) -> Any:
    """``value`` with every tensor (nested in tuples / lists) detached."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(detach(v) for v in value)
    return value


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same data (one object, or views of equal layout)."""
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def same_value(a: Any, b: Any) -> bool:
    """Equality of call arguments: tensors by identity or content, containers element-wise."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return same_tensor(a, b) or (a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (or buffer); None for an empty module."""
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
