"""The teacher one block at a time: paged onto the device, probed for block inputs, verified."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tnexp.features import FeatureCapture
from tnexp.memory_bounded.blocks import StageShell
from tnexp.memory_bounded.config import HOST, BlockwiseError
from tnexp.memory_bounded.weights import WeightsFile, materialize, release
from tnexp.slicing import Slice, SlicePlan, SlicePlanError

__all__ = ["PrefixProbe", "TeacherBlocks", "verify_chain"]


class TeacherBlocks:
    """One teacher block at a time on the device: moved (offload=cpu) or read (disk)."""

    def __init__(self, model: nn.Module, weights: WeightsFile | None) -> None:
        self.model = model
        self.weights = weights

    def put(self, shell: nn.Module, device: torch.device) -> None:
        if self.weights is not None:
            materialize(shell, self.weights, device)
        else:
            shell.to(device)
        shell.eval().requires_grad_(False)

    def take_back(self, shell: nn.Module) -> None:
        if self.weights is not None:
            release(shell)
        else:
            shell.to(HOST)

    @contextmanager
    def paged(self, blocks: Sequence[str]) -> Iterator[None]:
        """While inside, each of ``blocks`` is put in host memory just when it runs."""
        shells: dict[str, StageShell] = {}

        def pre(path: str):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                shells[path] = StageShell(self.model, [path])
                self.put(shells[path], HOST)

            return hook

        def post(path: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                self.take_back(shells.pop(path))

            return hook

        handles = []
        for path in blocks:
            module = self.model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post(path)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for shell in shells.values():  # blocks whose forward was stopped or raised
                self.take_back(shell)


def verify_chain(teacher: TeacherBlocks, blocks: Sequence[str], inputs: Any) -> None:
    """One forward on one sample: each block's output must be the next block's input and
    every block must get the first block's extra arguments (they are replayed for all)."""
    plan = SlicePlan([Slice(path, (path,)) for path in blocks])
    capture = FeatureCapture(
        teacher.model,
        plan,
        capture_inputs=False,
        capture_outputs=False,
        stop_after_last=True,
        chain=True,
        device=HOST,
    )
    with teacher.paged(blocks):
        try:
            capture(inputs)
        except SlicePlanError as err:
            raise BlockwiseError(
                f"{err} The model cannot be run block by block; use the normal local mode "
                "(method.memory_bounded.enabled=false)."
            ) from None


class PrefixProbe:
    """Runs ``model`` up to its first block and returns that block's input and kwargs.

    The first block itself does not run (in disk mode its weights are not loaded).
    """

    def __init__(self, model: nn.Module, first_block: str) -> None:
        self.first_block = first_block
        self.capture = FeatureCapture(
            model,
            [Slice(first_block, (first_block,))],
            capture_outputs=False,
            stop_after_last=True,
            device=HOST,
        )

    def __call__(self, inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        try:
            features = self.capture(inputs)[self.first_block]
        except SlicePlanError as err:
            raise BlockwiseError(
                f"the first block {self.first_block!r} did not run in the model's forward; "
                f"is it part of the forward for these inputs? ({err})"
            ) from None
        return features.input, features.kwargs
