"""Slice plans: how a tensorized network is cut into independently distilled slices.

A :class:`Slice` is a list of module paths applied one after another (one path for a
layer, a residual block or a transformer MLP; several for a group of consecutive blocks).
Plans are made from the *tensorized student* (which knows which layers were replaced) but
hold only module paths, so the same plan addresses the teacher, whose modules carry the
same names.

Granularities (paper section 3: a slice is a layer, a block, or a group of blocks):

* ``"layer"`` - every tensorized layer (TuckerConv2d / MPOLinear) is a slice;
* ``"block"`` - residual blocks (torchvision BasicBlock / Bottleneck) of CNNs; the
  feed-forward block of each encoder layer (BERT / RoBERTa-style ``intermediate`` +
  ``output``, one slice whose ``output`` also gets the slice input as its residual); or the
  MLP of each transformer layer (paths ending in ``.mlp``: GPT-2, Llama, ViT);
* ``"block:<pattern>"`` - every module whose path matches ``<pattern>`` (the factory's
  pattern syntax: ``*`` within one dotted component, ``**`` across) is one slice, e.g.
  ``block:encoder.layer.*.attention``;
* ``"decoder"`` - whole transformer decoder layers (GPT-2 ``transformer.h.N``, Llama
  ``model.layers.N``);
* ``"group:k"`` - k consecutive residual blocks (CNNs) or decoder layers (transformers);
* an explicit list: each item a module path, or a list of paths applied in order.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tnexp.factory import tensorized_modules

__all__ = [
    "GRANULARITIES",
    "Slice",
    "SlicePlan",
    "SlicePlanError",
    "decoder_layers",
    "encoder_ffns",
    "first_tensor",
    "make_slice_plan",
    "residual_blocks",
    "transformer_mlps",
]

GRANULARITIES = (
    "layer",
    "block",
    "block:<pattern>",
    "decoder",
    "group:<k>",
    "<explicit list of paths>",
)


class SlicePlanError(ValueError):
    """A slice plan that cannot be built or used as given (the message names the fix)."""


def first_tensor(value: Any) -> torch.Tensor:
    """``value`` itself if it is a tensor, else the first tensor of a tuple/list/ModelOutput.

    Transformer layers return tuples (hidden states first) in some library versions and
    plain tensors in others; slices always hand on the hidden states.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, tuple | list):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    raise SlicePlanError(
        f"a slice module returned {type(value).__name__} without any tensor; slices must end "
        "in a module that returns a tensor (or a tuple whose first tensor is the output)."
    )


def _inside(path: str, other: str) -> bool:
    """Whether module ``path`` is ``other`` or lives inside it (``''`` is the root)."""
    return other == "" or path == other or path.startswith(other + ".")


# =========================================================================== Slice
@dataclass(frozen=True)
class Slice:
    """One distillation unit: modules at ``paths``, applied in order to the slice input."""

    name: str
    paths: tuple[str, ...]
    # The last module also takes the slice input as its second argument: BERT's
    # ``output(hidden_states, input_tensor)`` adds the residual and normalises.
    residual: bool = False

    def __post_init__(self) -> None:
        # Accept lists (from JSON / Hydra) but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if not self.paths:
            raise SlicePlanError(f"slice {self.name!r} has no module paths.")

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """The slice's modules in ``model``, in forward order."""
        return [model.get_submodule(p) for p in self.paths]

    def forward(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the slice of ``model`` on ``x``.

        ``kwargs`` (attention masks, position embeddings captured by
        :class:`tnexp.features.FeatureCapture`) go to every member: the decoder layers of
        one transformer all receive the same masks and positions.
        """
        modules = self.modules(model)
        h = x
        for index, module in enumerate(modules):
            if self.residual and index == len(modules) - 1:
                h = first_tensor(module(h, x, **kwargs))
            else:
                h = first_tensor(module(h, **kwargs))
        return h

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter of the slice (deduplicated, in module order)."""
        return _unique(p for m in self.modules(model) for p in m.parameters())

    def tensorized_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Only the parameters of the TuckerConv2d / MPOLinear layers inside the slice."""
        return _unique(
            p
            for m in self.modules(model)
            for layer in tensorized_modules(m).values()
            for p in layer.parameters()
        )

    def tensorized_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """TuckerConv2d / MPOLinear layers inside the slice, by full module path."""
        found: dict[str, nn.Module] = {}
        for path, module in zip(self.paths, self.modules(model)):
            for sub, layer in tensorized_modules(module).items():
                found[f"{path}.{sub}" if sub else path] = layer  # sub == '': the path itself
        return found

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "paths": list(self.paths)}
        if self.residual:  # only then: older plans (cache manifests) keep their hash
            out["residual"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Slice:
        return cls(str(data["name"]), tuple(data["paths"]), bool(data.get("residual", False)))


def _is_tensorized(module: nn.Module) -> bool:
    from tnexp.tn import MPOLinear, TuckerConv2d

    return isinstance(module, TuckerConv2d | MPOLinear)


def _unique(params: Any) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# =========================================================================== SlicePlan
@dataclass
class SlicePlan:
    """An ordered list of non-overlapping slices (forward order)."""

    slices: list[Slice]
    granularity: str = "explicit"
    _by_name: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.slices = [s if isinstance(s, Slice) else Slice.from_dict(s) for s in self.slices]
        self._by_name = {}
        for i, s in enumerate(self.slices):
            if s.name in self._by_name:
                raise SlicePlanError(f"slice name {s.name!r} appears twice in the plan.")
            self._by_name[s.name] = i

    def names(self) -> list[str]:
        return [s.name for s in self.slices]

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self) -> Iterator[Slice]:
        return iter(self.slices)

    def __getitem__(self, key: int | str) -> Slice:
        return self.slices[self._index_of(key)]

    def _index_of(self, key: int | str) -> int:
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise SlicePlanError(f"slices are selected by index or name, got {key!r}.")
        if isinstance(key, int):
            n = len(self.slices)
            if not -n <= key < n:
                raise SlicePlanError(
                    f"slice index {key} is out of range: this plan has {n} slices "
                    f"(valid indices 0..{n - 1}, or names {self._name_hint()})."
                )
            return key % n
        if key not in self._by_name:
            close = difflib.get_close_matches(key, self.names(), n=5, cutoff=0.3)
            hint = f" Close names: {close}." if close else ""
            raise SlicePlanError(
                f"no slice named {key!r} in this {self.granularity!r} plan.{hint} "
                f"Valid names: {self._name_hint()} (or indices 0..{len(self.slices) - 1})."
            )
        return self._by_name[key]

    def _name_hint(self, limit: int = 12) -> str:
        names = self.names()
        shown = ", ".join(names[:limit])
        return f"[{shown}{', ...' if len(names) > limit else ''}]"

    def select(self, which: Sequence[int | str] | int | str | None) -> SlicePlan:
        """The sub-plan of the slices named or indexed in ``which`` (``None``: all).

        Slices keep the plan's forward order whatever the order of ``which``, so a sub-plan
        can still be captured in one teacher forward and propagated front to back.
        """
        if which is None:
            return SlicePlan(list(self.slices), self.granularity)
        if isinstance(which, int | str):
            which = [which]
        picked = sorted({self._index_of(k) for k in which})
        if not picked:
            raise SlicePlanError(f"select() got an empty selection; valid: {self._name_hint()}.")
        return SlicePlan([self.slices[i] for i in picked], self.granularity)

    def to_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "slices": [s.to_dict() for s in self.slices]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SlicePlan:
        return cls(
            [Slice.from_dict(s) for s in data["slices"]], str(data.get("granularity", "explicit"))
        )

    def validate(self, model: nn.Module) -> None:
        """Check that every path exists in ``model`` and that no two slices overlap."""
        _validate_paths(model, self.slices)


# =========================================================================== discovery
def residual_blocks(model: nn.Module) -> list[str]:
    """Paths of torchvision BasicBlock / Bottleneck modules, in forward (definition) order."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return []
    return [n for n, m in model.named_modules() if n and isinstance(m, BasicBlock | Bottleneck)]


def encoder_ffns(model: nn.Module) -> list[tuple[str, str]]:
    """``(intermediate, output)`` paths of BERT / RoBERTa-style encoder feed-forward blocks.

    Such a layer has an ``intermediate`` child (dense + activation) and an ``output`` child
    whose forward takes ``(hidden_states, input_tensor)``: it projects back, adds the
    residual (the intermediate's input) and normalises.
    """
    found = []
    for name, module in model.named_modules():
        intermediate = getattr(module, "intermediate", None)
        output = getattr(module, "output", None)
        if not isinstance(intermediate, nn.Module) or not isinstance(output, nn.Module):
            continue
        params = list(inspect.signature(output.forward).parameters)
        if len(params) >= 2 and params[1] in ("input_tensor", "residual", "hidden_states_residual"):
            prefix = f"{name}." if name else ""
            found.append((f"{prefix}intermediate", f"{prefix}output"))
    return found


def matching_blocks(model: nn.Module, pattern: str) -> list[str]:
    """Paths of the outermost modules matching ``pattern`` (factory pattern syntax)."""
    from tnexp.factory import match_pattern

    matched = [n for n, _ in model.named_modules() if n and match_pattern(n, pattern)]
    return [n for n in matched if not any(_inside(n, o) and n != o for o in matched)]


def transformer_mlps(model: nn.Module) -> list[str]:
    """Paths of transformer MLP blocks (``transformer.h.N.mlp``, ``model.layers.N.mlp``)."""
    return [n for n, _ in model.named_modules() if n == "mlp" or n.endswith(".mlp")]


def decoder_layers(model: nn.Module) -> list[str]:
    """Paths of the children of the ModuleList that holds a transformer's decoder layers.

    That list is the largest (by parameters) ``nn.ModuleList`` whose children all share one
    class: GPT-2's ``transformer.h``, Llama's ``model.layers``, and the same for other HF
    decoders, without a table of architecture names.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if any(_is_tensorized(m) for m in module):  # a list of layers, not of blocks
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        return []
    _, name, module = best
    return [f"{name}.{i}" if name else str(i) for i in range(len(module))]


def _short(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _contains_tensorized(path: str, layers: Sequence[str]) -> bool:
    return any(_inside(layer, path) for layer in layers)


# =========================================================================== make plan
_GROUP = re.compile(r"^group:(\d+)$")


def make_slice_plan(
    model: nn.Module, granularity: str | Sequence[str | Sequence[str]]
) -> SlicePlan:
    """Cut the tensorized ``model`` into slices at ``granularity`` (see the module docstring).

    Blocks / decoder layers / groups without any tensorized layer are skipped (nothing to
    train there); an explicit slice without one is an error.
    """
    layers = list(tensorized_modules(model))
    if not layers:
        raise SlicePlanError(
            "the model has no tensorized layer (TuckerConv2d / MPOLinear); slice plans are made "
            "from the tensorized student: pass the model returned by tnexp.factory.tensorize."
        )
    if isinstance(granularity, str):
        plan = _plan_from_string(model, granularity.strip(), layers)
    elif hasattr(granularity, "__iter__"):  # list, tuple, OmegaConf ListConfig
        plan = _plan_from_list(model, list(granularity), layers)
    else:
        raise SlicePlanError(
            f"granularity must be a string or a list of module paths, got {type(granularity)}. "
            f"Valid: {', '.join(GRANULARITIES)}."
        )
    _validate_paths(model, plan.slices)
    return plan


def _plan_from_string(model: nn.Module, granularity: str, layers: list[str]) -> SlicePlan:
    if granularity == "layer":
        return SlicePlan([Slice(n, (n,)) for n in layers], "layer")
    if granularity.startswith("block:"):
        pattern = granularity.split(":", 1)[1].strip()
        blocks = matching_blocks(model, pattern) if pattern else []
        if not blocks:
            raise SlicePlanError(
                f"granularity {granularity!r}: no module path matches {pattern!r} ('*' within "
                "one dotted component, '**' across). Module paths look like "
                f"{_short([n for n, _ in model.named_modules() if n])}."
            )
        slices = [Slice(b, (b,)) for b in blocks]
        return _skip_empty(slices, layers, granularity, f"modules matching {pattern!r}")
    match = _GROUP.match(granularity)
    if granularity not in ("block", "decoder") and match is None:
        raise SlicePlanError(
            f"unknown slice granularity {granularity!r}. Valid: 'layer', 'block', "
            "'block:<pattern>', 'decoder', "
            "'group:<k>' (k consecutive blocks, e.g. 'group:2'), or an explicit list of module "
            "paths / lists of paths."
        )
    if granularity == "block":
        slices = [Slice(b, (b,)) for b in residual_blocks(model)]
        kind = "residual blocks"
        if not slices:
            ffns = encoder_ffns(model)
            slices = [Slice(f"{i.rpartition('.')[0]}.ffn", (i, o), residual=True) for i, o in ffns]
            kind = "encoder feed-forward blocks"
        if not slices:
            slices, kind = [Slice(b, (b,)) for b in transformer_mlps(model)], "transformer MLPs"
        if not slices:
            raise SlicePlanError(
                "granularity 'block' found no residual blocks (torchvision BasicBlock / "
                "Bottleneck), encoder feed-forward blocks (intermediate + output) or "
                "transformer MLPs (modules named '*.mlp'). Use 'layer', 'block:<pattern>' "
                "(e.g. 'block:encoder.layer.*.attention') or an explicit list of module paths."
            )
        return _skip_empty(slices, layers, "block", kind)
    if granularity == "decoder":
        blocks = decoder_layers(model)
        if not blocks:
            raise SlicePlanError(
                "granularity 'decoder' found no decoder layers (a ModuleList of identical "
                "blocks, e.g. GPT-2's transformer.h or Llama's model.layers). For CNNs use "
                "'block' or 'group:<k>'."
            )
        return _skip_empty([Slice(b, (b,)) for b in blocks], layers, "decoder", "decoder layers")
    k = int(match.group(1))  # type: ignore[union-attr]
    if k < 1:
        raise SlicePlanError(f"group size must be >= 1, got {granularity!r}.")
    blocks, kind = residual_blocks(model), "residual blocks"
    if not blocks:
        blocks, kind = decoder_layers(model), "decoder layers"
    if not blocks:
        raise SlicePlanError(
            f"granularity {granularity!r} groups residual blocks (CNNs) or decoder layers "
            "(transformers) and found neither. Use 'layer' or an explicit list of groups."
        )
    # Group over *all* blocks (not only tensorized ones) so every group stays contiguous
    # in the data flow; groups without a tensorized layer are then dropped.
    groups = [tuple(blocks[i : i + k]) for i in range(0, len(blocks), k)]
    return _skip_empty([Slice("+".join(g), g) for g in groups], layers, granularity, kind)


def _skip_empty(slices: list[Slice], layers: list[str], granularity: str, kind: str) -> SlicePlan:
    kept = [s for s in slices if any(_contains_tensorized(p, layers) for p in s.paths)]
    if not kept:
        raise SlicePlanError(
            f"granularity {granularity!r}: none of the {len(slices)} {kind} contains a "
            f"tensorized layer (tensorized: {_short(layers)}). Use 'layer' or check the "
            "tensorization spec."
        )
    return SlicePlan(kept, granularity)


def _plan_from_list(model: nn.Module, items: list[Any], layers: list[str]) -> SlicePlan:
    if not items:
        raise SlicePlanError("an explicit slice list is empty; give at least one module path.")
    slices = []
    for item in items:
        if isinstance(item, str):
            paths: tuple[str, ...] = (item,)
        elif hasattr(item, "__iter__"):
            paths = tuple(str(p) for p in item)
            if not paths:
                raise SlicePlanError("an explicit slice group is empty; give its module paths.")
        else:
            raise SlicePlanError(
                f"explicit slices are module paths or lists of paths, got {item!r}."
            )
        slices.append(Slice("+".join(paths), paths))
    _validate_paths(model, slices)
    for s in slices:
        if not any(_contains_tensorized(p, layers) for p in s.paths):
            raise SlicePlanError(
                f"slice {s.name!r} contains no tensorized layer, so there is nothing to "
                f"distill in it. Tensorized layers are {_short(layers)}; pick slices that "
                "contain some, or widen the tensorization spec."
            )
    return SlicePlan(slices, "explicit")


def _validate_paths(model: nn.Module, slices: Sequence[Slice]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    for s in slices:
        for path in s.paths:
            if path not in known:
                close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
                hint = (
                    f" Close names: {close}." if close else f" Module paths look like {names[:6]}."
                )
                raise SlicePlanError(f"slice {s.name!r}: no module at path {path!r}.{hint}")
    owners = [(path, s.name) for s in slices for path in s.paths]
    for i, (a, owner_a) in enumerate(owners):
        for b, owner_b in owners[i + 1 :]:
            if _inside(a, b) or _inside(b, a):
                where = (
                    "in one slice" if owner_a == owner_b else f"(slices {owner_a!r}, {owner_b!r})"
                )
                if a == b:
                    relation = f"{a!r} is listed twice"
                else:
                    inner, outer = (a, b) if _inside(a, b) else (b, a)
                    relation = f"{inner!r} is inside {outer!r}"
                raise SlicePlanError(
                    f"slices overlap: {relation} {where}. A module may belong to one "
                    "slice only; remove one of them or use a coarser / finer granularity."
                )
