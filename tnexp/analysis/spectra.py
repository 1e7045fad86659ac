"""Bond spectra and entanglement entropy of the layers a tensor network replaces.

A bond of an MPO is a cut of the weight's site-major tensor ``(i1, o1, i2, o2, ...)``
into ``(sites <= k | sites > k)``; the singular values of that unfolding say how much
the bond dimension there can be truncated, and their entropy says how much "correlation"
the layer carries across the cut - the physics view of a layer that ordinary pruning or
low-rank tools do not give. For a Tucker-2 convolution the cuts are the mode-0 (output
channels) and mode-1 (input channels) unfoldings of the kernel.

For every cut: the singular values, the entanglement entropy ``S = -sum p log p`` with
``p = s^2 / sum s^2`` (natural log: an ``n x n`` identity has ``S = log n``), the ranks
holding 90% / 99% of the energy, and - with a chosen rank (the factory's, from a spec or
a tensorized layer) - the relative Frobenius truncation error of that cut. With the
teacher's input statistics, the whitened spectrum of the low-rank cut ``(in | out)``
gives the *output* error of the best rank-r map (see :mod:`tnexp.tn.datainit`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tnexp.factory import (
    DATA_INITS,
    TensorizeSpec,
    supported_kind,
    tensorize,
    tensorized_modules,
)
from tnexp.tn.datainit import conv_weight_matrix, whitened_spectrum
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import MPOLinear, linear_weight_in_out, site_major
from tnexp.tn.ranks import balanced_factors
from tnexp.tn.tucker import TuckerConv2d

__all__ = [
    "CutSpectrum",
    "LayerSpectrum",
    "analyze_spectra",
    "energy_rank",
    "entanglement_entropy",
    "layer_group",
    "mpo_cut_spectra",
    "truncation_error",
    "tucker_mode_spectra",
]

ENERGY_LEVELS = (0.9, 0.99)


# --------------------------------------------------------------------------- scalars
def entanglement_entropy(singular_values: torch.Tensor) -> float:
    """``-sum p log p`` with ``p = s^2 / sum s^2`` (natural log); 0 for a zero matrix."""
    s2 = singular_values.double().pow(2)
    total = float(s2.sum())
    if total <= 0.0:
        return 0.0
    p = s2[s2 > 0] / total
    return max(0.0, float(-(p * p.log()).sum()))  # clamp -0.0 / rounding below zero


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest rank whose singular values hold ``fraction`` of ``sum s^2`` (0 if all zero)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    s2 = singular_values.double().pow(2)
    total = float(s2.sum())
    if total <= 0.0:
        return 0
    cumulative = torch.cumsum(s2, 0) / total
    # A tolerance so that fraction 1.0 is reached despite rounding in the cumulative sum.
    return int((cumulative < fraction - 1e-12).sum()) + 1


def truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation: ``||s_>r|| / ||s||``."""
    s2 = singular_values.double().pow(2)
    total = float(s2.sum())
    if total <= 0.0:
        return 0.0
    return math.sqrt(float(s2[rank:].sum()) / total)


# --------------------------------------------------------------------------- cuts
def mpo_cut_spectra(
    weight_in_out: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int]
) -> list[torch.Tensor]:
    """Singular values (float64, descending) at every bond cut of the MPO factorisation."""
    if len(in_factors) != len(out_factors):
        raise TensorizationError(
            f"in_factors {list(in_factors)} and out_factors {list(out_factors)} differ in length."
        )
    tensor = site_major(weight_in_out.detach().double(), in_factors, out_factors)
    sites = [i * o for i, o in zip(in_factors, out_factors, strict=True)]
    return [
        torch.linalg.svdvals(tensor.reshape(math.prod(sites[: k + 1]), -1))
        for k in range(len(sites) - 1)
    ]


def tucker_mode_spectra(kernel: torch.Tensor) -> list[torch.Tensor]:
    """Singular values of the mode-0 (output) and mode-1 (input) unfoldings of a kernel."""
    w = kernel.detach().double()
    c_out, c_in = w.shape[:2]
    return [
        torch.linalg.svdvals(w.reshape(c_out, -1)),
        torch.linalg.svdvals(w.transpose(0, 1).reshape(c_in, -1)),
    ]


# --------------------------------------------------------------------------- records
@dataclass
class CutSpectrum:
    """One cut of one layer: its spectrum and what follows from it."""

    cut: str  # "bond 1", ..., "mode-0 (out)", "mode-1 (in)", "whitened (in|out)"
    singular_values: list[float]
    entropy: float
    max_entropy: float  # log(number of singular values): a flat spectrum
    rank_90: int
    rank_99: int
    rank: int | None = None  # the chosen bond dimension / Tucker rank at this cut
    truncation_error: float | None = None  # relative, at ``rank``

    @classmethod
    def from_values(cls, cut: str, values: torch.Tensor, rank: int | None = None) -> CutSpectrum:
        s = values.detach().double().flatten().sort(descending=True).values
        return cls(
            cut=cut,
            singular_values=[float(v) for v in s],
            entropy=entanglement_entropy(s),
            max_entropy=math.log(len(s)) if len(s) else 0.0,
            rank_90=energy_rank(s, ENERGY_LEVELS[0]),
            rank_99=energy_rank(s, ENERGY_LEVELS[1]),
            rank=rank,
            truncation_error=None if rank is None else truncation_error(s, rank),
        )


@dataclass
class LayerSpectrum:
    """Every cut of one tensorizable layer (dense, or its tensorized reconstruction)."""

    name: str
    kind: str  # mpo | tucker
    module_type: str
    source: str  # dense | tensorized
    shape: list[int]  # the weight as the module stores it
    in_factors: list[int] | None
    out_factors: list[int] | None
    cuts: list[CutSpectrum]
    # With input statistics: the whitened low-rank cut (in | out); its truncation_error is
    # the relative output error of the best rank-``lowrank_rank`` map on those inputs.
    whitened: CutSpectrum | None = None
    lowrank_rank: int | None = None  # rank of a U V map with the chosen parameter count
    lowrank_weight_error: float | None = None  # data-free error of that rank (weight space)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return layer_group(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "group": self.group}


def layer_group(name: str) -> str:
    """A layer's role: its path with block indices as ``*`` (``layers.*.mlp.up_proj``)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


# --------------------------------------------------------------------------- analysis
def analyze_spectra(
    model: nn.Module,
    spec: TensorizeSpec | Mapping[str, Any] | None = None,
    *,
    stats: Any = None,
    num_sites: int = 2,
) -> list[LayerSpectrum]:
    """Bond / mode spectra, entropies and truncation errors of every tensorizable layer.

    * A tensorized model (MPOLinear / TuckerConv2d inside): each such layer, from its
      dense reconstruction, cut with its own factors; the chosen ranks are its bonds.
    * A dense model with ``spec``: the layers the spec selects, cut with the factory's
      factors, and the ranks the factory would choose (the spec's CR / overall CR).
    * A dense model without ``spec``: every nn.Linear / HF Conv1D / nn.Conv2d, MPOs with
      balanced factors over ``num_sites`` sites, no chosen rank (no truncation error).

    ``stats`` (:class:`tnexp.calibration.InputStats`) adds each covered layer's whitened
    spectrum of the low-rank cut and its data-aware error at the equal-parameter rank.
    """
    tensorized = tensorized_modules(model)
    if tensorized:
        return [_tensorized_layer(name, m, stats) for name, m in tensorized.items()]
    if spec is not None:
        return _planned_layers(model, TensorizeSpec.from_config(spec), stats)
    layers = [(n, m) for n, m in model.named_modules() if n and supported_kind(m)]
    if not layers:
        raise TensorizationError(
            f"{type(model).__name__} has no tensorizable layer (nn.Linear, transformers' "
            "Conv1D, nn.Conv2d, or already tensorized MPOLinear / TuckerConv2d); nothing to "
            "analyse. Pass the model that holds them."
        )
    result = []
    for name, module in layers:
        if supported_kind(module) == "mpo":
            w = linear_weight_in_out(module)
            factors = (
                balanced_factors(w.shape[0], num_sites),
                balanced_factors(w.shape[1], num_sites),
            )
            result.append(_mpo_layer(name, module, w, *factors, None, "dense", stats))
        else:
            result.append(_tucker_layer(name, module, module.weight, None, "dense", stats))
    return result


def _planned_layers(model: nn.Module, spec: TensorizeSpec, stats: Any) -> list[LayerSpectrum]:
    """Dense layers of a spec with the sizes the factory chooses for them.

    The factory itself solves the sizes (per-layer CR, overall CR, adaptive allocation,
    layout auto); data-aware inits are swapped for SVD because the init does not change a
    size and an ALS sweep per layer would only cost time here.
    """
    cheap = dataclasses.replace(
        spec,
        rules=[
            dataclasses.replace(r, init="svd") if r.init in DATA_INITS else r for r in spec.rules
        ],
        # Without statistics (method.data_aware=false) the output Fisher is unknown: the
        # sizes are then those of the unweighted allocation.
        weighting=spec.weighting if stats is not None and stats.fisher else "none",
    )
    _, report = tensorize(model, cheap, stats=stats)
    modules = dict(model.named_modules())
    result = []
    for layer in report.layers:
        module = modules[layer.name]
        if layer.kind == "mpo":
            w = linear_weight_in_out(module)
            entry = _mpo_layer(
                layer.name,
                module,
                w,
                layer.in_factors,
                layer.out_factors,
                layer.bonds,
                "dense",
                stats,
            )
        else:
            entry = _tucker_layer(layer.name, module, module.weight, layer.ranks, "dense", stats)
        entry.extra = {
            "cr": layer.cr,
            "layout": layer.layout,
            "params_after": layer.weight_params_after,
        }
        _add_lowrank(entry, _weight_matrix(module), layer.weight_params_after, stats)
        result.append(entry)
    return result


def _tensorized_layer(name: str, module: nn.Module, stats: Any) -> LayerSpectrum:
    with torch.no_grad():
        if isinstance(module, MPOLinear):
            w = module.weight_in_out()
            entry = _mpo_layer(
                name,
                module,
                w,
                module.in_factors,
                module.out_factors,
                module.bonds,
                "tensorized",
                stats,
            )
            matrix = w
        else:
            assert isinstance(module, TuckerConv2d)
            kernel = module.to_dense()
            entry = _tucker_layer(name, module, kernel, list(module.ranks), "tensorized", stats)
            matrix = conv_weight_matrix(kernel)
    params = sum(p.numel() for n, p in module.named_parameters() if "bias" not in n)
    entry.extra = {"params_after": params}
    _add_lowrank(entry, matrix, params, stats)
    return entry


def _mpo_layer(
    name: str,
    module: nn.Module,
    weight_in_out: torch.Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    bonds: Sequence[int] | None,
    source: str,
    stats: Any,
) -> LayerSpectrum:
    spectra = mpo_cut_spectra(weight_in_out, in_factors, out_factors)
    cuts = [
        CutSpectrum.from_values(f"bond {k + 1}", s, None if bonds is None else int(bonds[k]))
        for k, s in enumerate(spectra)
    ]
    entry = LayerSpectrum(
        name=name,
        kind="mpo",
        module_type=type(module).__name__,
        source=source,
        shape=_stored_shape(module, weight_in_out),
        in_factors=list(in_factors),
        out_factors=list(out_factors),
        cuts=cuts,
    )
    if bonds is None:  # no chosen size: still give the whitened spectrum when possible
        _add_lowrank(entry, weight_in_out, None, stats)
    return entry


def _tucker_layer(
    name: str,
    module: nn.Module,
    kernel: torch.Tensor,
    ranks: Sequence[int] | None,
    source: str,
    stats: Any,
) -> LayerSpectrum:
    mode0, mode1 = tucker_mode_spectra(kernel)
    entry = LayerSpectrum(
        name=name,
        kind="tucker",
        module_type=type(module).__name__,
        source=source,
        shape=list(kernel.shape),
        in_factors=None,
        out_factors=None,
        cuts=[
            CutSpectrum.from_values(
                "mode-0 (out)", mode0, None if ranks is None else int(ranks[0])
            ),
            CutSpectrum.from_values("mode-1 (in)", mode1, None if ranks is None else int(ranks[1])),
        ],
    )
    if ranks is None:
        _add_lowrank(entry, conv_weight_matrix(kernel.detach()), None, stats)
    return entry


def _stored_shape(module: nn.Module, weight_in_out: torch.Tensor) -> list[int]:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return list(weight.shape)
    rows, cols = weight_in_out.shape  # MPOLinear: report the replaced layer's layout
    return [cols, rows] if getattr(module, "weight_layout", "linear") == "linear" else [rows, cols]


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(in, out)`` matrix whose low-rank cut the input statistics whiten."""
    if isinstance(module, nn.Conv2d):
        return conv_weight_matrix(module.weight.detach())
    return linear_weight_in_out(module)


def _add_lowrank(
    entry: LayerSpectrum, matrix: torch.Tensor, params: int | None, stats: Any
) -> None:
    """Equal-parameter low-rank rank, its weight error and (with stats) its output error."""
    rows, cols = matrix.shape
    rank = None
    if params is not None:
        # A U V map of rank r has r * (rows + cols) parameters: the rank at equal budget.
        rank = max(1, min(rows, cols, round(params / (rows + cols))))
        entry.lowrank_rank = rank
        entry.lowrank_weight_error = truncation_error(
            torch.linalg.svdvals(matrix.detach().double()), rank
        )
    if stats is not None and entry.name in stats:
        gram = stats.gram(entry.name)
        if gram.shape[0] != rows:
            raise TensorizationError(
                f"{entry.name}: the input Gram is {tuple(gram.shape)} but the layer has {rows} "
                "inputs; the statistics belong to another model. Recollect them."
            )
        # Damped like the factory's allocation, so directions never seen stay finite.
        spectrum = whitened_spectrum(matrix.detach(), gram.to(matrix.device))
        entry.whitened = CutSpectrum.from_values("whitened (in|out)", spectrum, rank)
