"""The chain of blocks: cutting a model into stages, and addressing a stage's modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tnexp.memory_bounded.config import BlockwiseError, Stage
from tnexp.slicing import SlicePlan, decoder_layers, first_tensor, residual_blocks
from tnexp.tn.mpo import MPOLinear
from tnexp.tn.tucker import TuckerConv2d

__all__ = [
    "StageShell",
    "attach_module",
    "inside",
    "placeholder_layer",
    "plan_stages",
    "set_module",
    "swapped",
]


def inside(path: str, block: str) -> bool:
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
        return next((i for i, b in enumerate(blocks) if inside(path, b)), None)

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


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def attach_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at dotted ``path`` under ``root``, creating empty parents."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(leaf, module)


class StageShell(nn.Module):
    """The blocks of one stage at their full paths (the same module objects), run in order.

    Keeping the full paths lets slice plans, tensorization rules and state-dict names of
    the whole model address the stage unchanged.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        super().__init__()
        self.block_paths = tuple(paths)
        for path in self.block_paths:
            attach_module(self, path, model.get_submodule(path))

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x = hidden_states
        for path in self.block_paths:
            x = first_tensor(self.get_submodule(path)(x, **kwargs))
        return x


@contextlib.contextmanager
def swapped(root: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Temporarily put ``modules`` at their paths in ``root``."""
    old = {path: root.get_submodule(path) for path in modules}
    try:
        for path, module in modules.items():
            set_module(root, path, module)
        yield
    finally:
        for path, module in old.items():
            set_module(root, path, module)


def placeholder_layer(item: Any) -> nn.Module:
    """A parameter-free stand-in of the layer the factory will build (for slice planning)."""
    if item.kind == "mpo":
        bias = getattr(item.module, "bias", None) is not None
        return MPOLinear(item.in_factors, item.out_factors, 1, bias=bias, device="meta")
    conv = item.module
    return TuckerConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, (1, 1), device="meta"
    )
