"""The memory format a run's convolutions use: NCHW (``contiguous``) or NHWC (``channels_last``).

Why: on a CPU (oneDNN) and on NVIDIA GPUs (cuDNN, tensor cores) 2-D convolutions run
faster on channels-last tensors; Tucker-2's 1x1 factor convolutions in particular are a
plain GEMM over the channels in that layout (docs/benchmarks.md, "Memory format").

Only the *modules* are converted: a convolution whose weight is channels-last also makes
its output channels-last (oneDNN and cuDNN follow the weight), so images, cached slice
features and teacher features need no conversion of their own; the first convolution
reorders its input once. At the end of each stage the modules go back to contiguous
tensors, so checkpoints, safetensors exports and later stages see the usual layout.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import nn

from tnexp.errors import ConfigError

__all__ = [
    "MEMORY_FORMATS",
    "MemoryFormat",
    "align_optimizer_state",
    "has_convolutions",
    "memory_format_record",
    "module_layout",
    "resolve_memory_format",
    "to_layout",
]

log = logging.getLogger("tnexp")

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def has_convolutions(module: nn.Module) -> bool:
    """Whether ``module`` holds a 2-D convolution (Tucker-2 layers hold three)."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _check(setting: str) -> None:
    if setting not in MEMORY_FORMATS:
        raise ConfigError(
            f"runtime.memory_format must be one of {', '.join(MEMORY_FORMATS)}, got "
            f"{setting!r}; e.g. runtime.memory_format=channels_last."
        )


def resolve_memory_format(setting: str, module: nn.Module) -> str:
    """``channels_last`` or ``contiguous`` for ``module`` under ``runtime.memory_format``.

    ``auto`` means ``channels_last`` for a model with 2-D convolutions and ``contiguous``
    otherwise (a transformer has no 4-D weights, so the format changes nothing there).
    """
    _check(setting)
    if setting == "auto":
        return "channels_last" if has_convolutions(module) else "contiguous"
    return setting


def module_layout(module: nn.Module) -> torch.memory_format:
    """The layout ``module``'s 4-D weights are in now (``channels_last`` after the callback's
    ``setup``, ``contiguous_format`` otherwise), read from the first weight that tells the
    two apart (a 1x1 kernel or a single input channel is in both)."""
    for p in module.parameters():
        if p.dim() == 4:
            plain, last = p.is_contiguous(), p.is_contiguous(memory_format=torch.channels_last)
            if plain != last:
                return torch.channels_last if last else torch.contiguous_format
    return torch.contiguous_format


def to_layout(
    tensor: torch.Tensor, dtype: torch.dtype, layout: torch.memory_format
) -> torch.Tensor:
    """``tensor`` in ``dtype`` and, if 4-D, in ``layout``: one copy at most, none when it
    already is. Teacher and cached features are NCHW; fed as is to a channels_last student
    they would be reordered by its first convolution and mix layouts in the loss."""
    reorder = layout is not torch.contiguous_format and tensor.dim() == 4
    if reorder and not tensor.is_contiguous(memory_format=layout):
        return tensor.to(dtype, memory_format=layout)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _apply(module: nn.Module | None, fmt: str) -> None:
    if module is None:
        return
    layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    # nn.Module.to(memory_format=) rewrites 4-D parameters and buffers in place (the same
    # Parameter objects), so optimizers built before keep pointing at them.
    module.to(memory_format=layout)


class MemoryFormat(L.Callback):
    """Put the student (and the teacher, which is outside the module tree) in a memory format.

    ``memory_format``: ``auto`` | ``channels_last`` | ``contiguous`` (see
    :func:`resolve_memory_format`). The conversion happens in ``setup`` (before optimizers
    are built and a checkpoint restored) and is undone in ``teardown``.
    """

    def __init__(self, memory_format: str = "auto") -> None:
        _check(memory_format)
        self.memory_format = memory_format
        self.chosen: str | None = None  # while a stage runs
        self.used: str | None = None  # the format of the last stage (results.json)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.chosen = self.used = resolve_memory_format(self.memory_format, pl_module)
        if self.chosen == "contiguous":
            return
        _apply(pl_module, self.chosen)
        _apply(getattr(pl_module, "teacher", None), self.chosen)
        log.debug("memory format: %s (runtime.memory_format=%s)", self.chosen, self.memory_format)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after a checkpoint's optimizer state is restored (which keeps the layout it
        # was saved in, e.g. NCHW moments from a run before runtime.memory_format).
        for optimizer in trainer.optimizers:
            changed = align_optimizer_state(optimizer)
            if changed:
                log.info("optimizer state: %d tensors put in their parameters' layout", changed)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.chosen not in (None, "contiguous"):
            _apply(pl_module, "contiguous")
            _apply(getattr(pl_module, "teacher", None), "contiguous")
        self.chosen = None


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give every optimizer state tensor shaped like its parameter the parameter's strides.

    Why: torch's fused Adam/AdamW on the CPU walks parameter, gradient and moments as if they
    had the same strides; with a channels_last parameter and NCHW moments its updates are
    silently wrong (1.5e-3 off after one step at lr 1e-3, while foreach/for-loop Adam are
    exact). Returns how many tensors were rewritten.
    """
    changed = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            for key, value in (state or {}).items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == param.shape
                    and value.stride() != param.stride()
                ):
                    # empty_like keeps the parameter's strides (preserve_format)
                    aligned = torch.empty_like(param, dtype=value.dtype, device=value.device)
                    state[key] = aligned.copy_(value)
                    changed += 1
    return changed


def memory_format_record(trainer: L.Trainer) -> dict[str, str]:
    """``{"memory_format": ...}`` for results.json's ``runtime`` entry (empty without the
    callback, e.g. a config whose callbacks group drops it)."""
    for callback in trainer.callbacks:
        if isinstance(callback, MemoryFormat) and callback.used is not None:
            return {"memory_format": callback.used}
    return {}
