"""Building the student: decompose every planned layer (data-free or data-aware)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tnexp.factory.planning import (
    _Planned,
    _size_for,
    _weight_numel,
    _weight_params_after,
    count_parameters,
    lowrank_factors,
    plan_layers,
    solve_overall_cr,
)
from tnexp.factory.report import LayerReport, TensorizeReport
from tnexp.factory.spec import DATA_INITS, TensorizeSpec
from tnexp.tn.allocation import allocate_ranks, relative_tail_error
from tnexp.tn.datainit import (
    conv_weight_matrix,
    fisher_weights,
    input_on_first_site,
    mpo_als,
    mpo_contract,
    mpo_whiten,
    output_error,
    tucker2_als,
    weight_error,
    whitened_spectrum,
)
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import (
    CONTRACTION_ORDERS,
    MPOLinear,
    linear_weight_in_out,
    mpo_svd,
)
from tnexp.tn.ranks import (
    balanced_factors,
    mpo_bond_dim_for_cr,
    mpo_bonds,
    mpo_max_bonds,
)
from tnexp.tn.tucker import TuckerConv2d, check_tucker_order


# =========================================================================== tensorize
def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _needs_stats(item: _Planned) -> bool:
    return item.rule.init in DATA_INITS or item.layout == "auto"


def needs_input_stats(spec: TensorizeSpec) -> bool:
    """Whether ``tensorize(..., spec)`` needs the teacher's input statistics (init whiten /
    als, layout auto) or uses them (adaptive ranks of low-rank layers: whitened spectra)."""
    return spec.weighting == "fisher" or any(
        r.init in DATA_INITS
        or r.layout == "auto"
        or (spec.allocation == "adaptive" and r.layout == "lowrank")
        for r in spec.rules
    )


def _missing_stats(item: _Planned) -> TensorizationError:
    return TensorizationError(
        f"{item.name}: init {item.rule.init!r} / layout {item.layout!r} needs input "
        "statistics of the teacher. From Python pass stats=tnexp.calibration."
        "collect_input_stats(...); from the CLI set tensorize.calibration.num_batches > 0."
    )


def _stats_gram(stats: Any, item: _Planned) -> torch.Tensor:
    if stats is None:
        raise _missing_stats(item)
    return stats.gram(item.name)


def _missing_fisher() -> TensorizationError:
    return TensorizationError(
        "weighting 'fisher' needs the teacher's statistics with the output Fisher; from the "
        "CLI set tensorize.calibration.fisher_batches > 0, from Python pass stats with "
        "stats.fisher = tnexp.fisher.collect_output_fisher(...)."
    )


def _out_weights(stats: Any, name: str, spec: TensorizeSpec) -> torch.Tensor | None:
    """The layer's output-channel weights under ``spec.weighting`` (None: unweighted)."""
    if spec.weighting != "fisher":
        return None
    if stats is None:
        raise _missing_fisher()
    return fisher_weights(stats.output_fisher(name), spec.damping)


def _build_layer(
    item: _Planned, size: Mapping[str, Any], spec: TensorizeSpec, stats: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """The replacement layer and what its initialisation measured (errors, ALS sweeps)."""
    rule = item.rule
    init = rule.init
    # Only the whitened solve has a weighted form; every other init is unweighted, and the
    # report says so per layer.
    info: dict[str, Any] = {"weighting": "none"}
    if item.kind == "tucker":
        if init == "whiten":
            raise TensorizationError(
                f"{item.name}: init 'whiten' is exact only for an MPO whose input sits on one "
                "site; use init 'als' (data-aware Tucker-2 sweep) for convolutions."
            )
        layer = TuckerConv2d.from_conv(
            item.module,
            ranks=size["ranks"],
            init="svd" if init in ("als", "hooi") else init,
            method="hooi" if init == "hooi" else "hosvd",
            order=spec.tucker_order,
            calibrate=spec.order_timing != "off",
            name=item.name,
        )
        if init == "als":
            gram = _stats_gram(stats, item)
            factors, result = tucker2_als(
                item.module.weight.detach(),
                gram,
                layer.core.weight.detach(),
                layer.last.weight.detach()[:, :, 0, 0],
                layer.first.weight.detach()[:, :, 0, 0].t(),
                damping=spec.damping,
                max_sweeps=spec.als_sweeps,
                tol=spec.als_tol,
            )
            layer.set_factors(*factors)
            info["als_sweeps"] = result.sweeps
        return layer, info
    if init not in DATA_INITS:
        layer = MPOLinear.from_linear(
            item.module,
            bond_dim=size["bond_dim"],
            in_factors=item.in_factors,
            out_factors=item.out_factors,
            init=init,
            contraction=spec.contraction,
            calibrate=spec.order_timing == "all",
            name=item.name,
        )
        return layer, info
    weight = linear_weight_in_out(item.module)
    gram = _stats_gram(stats, item)
    layer = MPOLinear.empty_like(
        item.module,
        bond_dim=size["bond_dim"],
        in_factors=item.in_factors,
        out_factors=item.out_factors,
        contraction=spec.contraction,
        calibrate=spec.order_timing == "all",
    )
    if input_on_first_site(item.in_factors):
        # Exact minimiser for this layout; ALS would only confirm it.
        cores = mpo_whiten(
            weight,
            gram,
            item.in_factors,
            item.out_factors,
            layer.bonds,
            damping=spec.damping,
            out_weights=_out_weights(stats, item.name, spec),
            name=item.name,
        )
        info["weighting"] = spec.weighting
    elif init == "whiten":
        cores = mpo_whiten(  # raises the clear "use als or lowrank" error
            weight, gram, item.in_factors, item.out_factors, layer.bonds, name=item.name
        )
    else:
        start = mpo_svd(weight, item.in_factors, item.out_factors, layer.bonds)
        cores, result = mpo_als(
            weight,
            gram,
            start,
            item.in_factors,
            item.out_factors,
            damping=spec.damping,
            max_sweeps=spec.als_sweeps,
            tol=spec.als_tol,
        )
        info["als_sweeps"] = result.sweeps
    layer.set_cores(cores)
    return layer, info


def _approx_matrices(item: _Planned, new: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The original and the approximated weight as the matrices the Gram applies to."""
    with torch.no_grad():
        if item.kind == "tucker":
            kernel = item.module.weight.detach()
            return conv_weight_matrix(kernel), conv_weight_matrix(new.to_dense().detach())
        return linear_weight_in_out(item.module), new.weight_in_out().detach()


def _choose_layout(item: _Planned, cr: float, spec: TensorizeSpec, stats: Any) -> None:
    """layout auto: at equal parameters, keep the layout with the lower output error.

    The low-rank candidate is whitened (its exact optimum); the balanced one is the SVD
    truncation measured on the same inputs (running ALS for every candidate would cost
    more than the tensorization itself, and ALS only lowers the balanced error further
    when it is already the better choice).
    """
    weight = linear_weight_in_out(item.module)
    gram = _stats_gram(stats, item)
    weights = _out_weights(stats, item.name, spec)  # compared under the spec's weighting
    in_dim, out_dim = weight.shape
    balanced = (balanced_factors(in_dim, 2), balanced_factors(out_dim, 2))
    low = lowrank_factors(in_dim, out_dim)
    errors = {}
    for layout, (fin, fout) in (("lowrank", low), ("balanced", balanced)):
        bond = mpo_bond_dim_for_cr(fin, fout, cr, name=item.name)
        bonds = mpo_bonds(fin, fout, bond)
        if layout == "lowrank":
            cores = mpo_whiten(
                weight, gram, fin, fout, bonds, damping=spec.damping, out_weights=weights
            )
        else:
            cores = mpo_svd(weight, fin, fout, bonds)
        approx = mpo_contract(cores).to(weight.dtype)
        errors[layout] = output_error(weight, approx, gram, weights)
    chosen = min(errors, key=errors.__getitem__)
    item.layout = chosen
    item.in_factors, item.out_factors = low if chosen == "lowrank" else balanced


def _adaptive_sizes(
    model: nn.Module, planned: Sequence[_Planned], target: float, spec: TensorizeSpec, stats: Any
) -> dict[str, dict[str, Any]]:
    """Per-layer bond dimensions for ``overall_cr`` that minimise the summed relative error."""
    free = [p for p in planned if not p.rule.has_explicit_size]
    bad = [p.name for p in free if p.kind != "mpo" or len(p.in_factors) != 2]
    if bad:
        raise TensorizationError(
            f"allocation adaptive sizes 2-site MPO layers (lowrank, balanced or auto layout); "
            f"{bad[:3]} are Tucker or N-site layers. Use allocation: uniform for them."
        )
    total = count_parameters(model)
    fixed_after = total - sum(_weight_numel(p.module) for p in planned)
    fixed_after += sum(
        _weight_params_after(p, _size_for(p, None)) for p in planned if p.rule.has_explicit_size
    )
    budget = (1.0 - target) * total - fixed_after
    fisher = spec.weighting == "fisher"
    if fisher:
        not_lowrank = [p.name for p in free if p.layout != "lowrank"]
        if not_lowrank:
            raise TensorizationError(
                f"allocation adaptive with weighting fisher compares layers by their whitened, "
                f"Fisher-weighted spectra, which low-rank layers have; {not_lowrank[:3]} are "
                "balanced MPOs. Use layout lowrank for them or weighting: none."
            )
    spectra, costs, caps = [], [], []
    for item in free:
        weight = linear_weight_in_out(item.module)
        (i1, i2), (o1, o2) = item.in_factors, item.out_factors
        if fisher:
            # Absolute energies: s_j^2 of L^T W diag(f)^(1/2) estimates the loss increase of
            # dropping unit j (up to one factor shared by all layers), so the budget goes
            # where the loss feels the error.
            raw = stats.output_fisher(item.name).double()
            absolute = fisher_weights(raw, spec.damping) * float(raw.clamp_min(0.0).mean())
            spectrum = whitened_spectrum(
                weight, stats.gram(item.name), damping=spec.damping, out_weights=absolute
            )
        elif item.layout == "lowrank" and stats is not None and item.name in stats:
            spectrum = whitened_spectrum(weight, stats.gram(item.name), damping=spec.damping)
        else:  # data-free: the spectrum at the bond cut of the site-major weight
            site_major = weight.double().reshape(i1, i2, o1, o2).permute(0, 2, 1, 3)
            spectrum = torch.linalg.svdvals(site_major.reshape(i1 * o1, i2 * o2))
        spectra.append(spectrum)
        costs.append(i1 * o1 + i2 * o2)
        caps.append(max(mpo_max_bonds(item.in_factors, item.out_factors)))
    ranks = allocate_ranks(
        spectra, costs, budget, max_ranks=caps, names=[p.name for p in free], relative=not fisher
    )
    sizes = {p.name: {"bond_dim": r} for p, r in zip(free, ranks, strict=True)}
    for item, spectrum, rank in zip(free, spectra, ranks, strict=True):
        sizes[item.name]["predicted_error"] = relative_tail_error(spectrum, rank)
    return sizes


def tensorize(
    model: nn.Module,
    spec: TensorizeSpec | Mapping[str, Any],
    *,
    stats: Any = None,
    progress: bool = False,
) -> tuple[nn.Module, TensorizeReport]:
    """Return a tensorized deep copy of ``model`` and its report. ``model`` is not modified.

    ``stats`` (:class:`tnexp.calibration.InputStats`) holds the teacher's input Grams of the
    selected layers; it is required by init ``whiten`` / ``als`` and layout ``auto``, and
    with it the report gives every layer's relative output error on those inputs.
    """
    spec = TensorizeSpec.from_config(spec)
    planned = plan_layers(model, spec)
    needing = [p for p in planned if _needs_stats(p)]
    if needing and stats is None:
        raise _missing_stats(needing[0])
    if spec.weighting == "fisher" and stats is None:
        raise _missing_fisher()
    per_layer_cr = (
        solve_overall_cr(model, planned, spec.overall_cr) if spec.overall_cr is not None else None
    )
    for item in planned:
        if item.layout == "auto":
            cr = item.rule.cr if per_layer_cr is None else per_layer_cr
            _choose_layout(item, cr, spec, stats)
    sizes: dict[str, dict[str, Any]] = {}
    if spec.allocation == "adaptive":
        sizes = _adaptive_sizes(model, planned, spec.overall_cr, spec, stats)
    student = copy.deepcopy(model)
    total_before = count_parameters(model)
    reports: list[LayerReport] = []
    iterator: Iterable[_Planned] = planned
    if progress:
        from rich.progress import track

        iterator = track(planned, description="tensorizing", total=len(planned))
    for item in iterator:
        cr = item.rule.cr if per_layer_cr is None else per_layer_cr
        size = sizes.get(item.name) or _size_for(item, cr)
        # Decompose the *student's* copy so the teacher's tensors are never touched.
        item_student = dataclasses.replace(item, module=student.get_submodule(item.name))
        new, info = _build_layer(item_student, size, spec, stats)
        old = item_student.module
        original, approx = _approx_matrices(item_student, new)
        if stats is not None and item.name in stats:
            info["output_error"] = output_error(original, approx, stats.gram(item.name))
        info["weight_error"] = weight_error(original, approx)
        _set_submodule(student, item.name, new)
        weight_after = sum(
            p.numel() for n, p in new.named_parameters() if n != "bias" and "bias" not in n
        )
        reports.append(
            LayerReport(
                name=item.name,
                kind=item.kind,
                module_type=type(old).__name__,
                shape=list(old.weight.shape),
                params_before=sum(p.numel() for p in old.parameters()),
                params_after=sum(p.numel() for p in new.parameters()),
                weight_params_before=old.weight.numel(),
                weight_params_after=weight_after,
                cr_target=None if item.name in sizes else cr,  # adaptive: no per-layer target
                init=item.rule.init,
                ranks=list(new.ranks) if item.kind == "tucker" else None,
                bond_dim=new.bond_dim if item.kind == "mpo" else None,
                bonds=list(new.bonds) if item.kind == "mpo" else None,
                in_factors=new.in_factors if item.kind == "mpo" else None,
                out_factors=new.out_factors if item.kind == "mpo" else None,
                layout=item.layout,
                predicted_error=size.get("predicted_error"),
                rule=item.rule.pattern,
                **info,
            )
        )
    report = TensorizeReport(
        layers=reports,
        model_params_before=total_before,
        model_params_after=count_parameters(student),
        overall_cr_target=spec.overall_cr,
        per_layer_cr=per_layer_cr,
        contraction=spec.contraction,
        tucker_order=spec.tucker_order,
        order_timing=spec.order_timing,
        allocation=spec.allocation,
        weighting=spec.weighting,
        rules=[r.pattern for r in spec.rules],
    )
    return student, report


def tensorized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every TuckerConv2d / MPOLinear in ``model`` by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TuckerConv2d | MPOLinear)}


def set_contraction(model: nn.Module, order: str) -> None:
    """Force (or reset to 'auto') the contraction order of every MPO layer."""
    if order not in CONTRACTION_ORDERS:
        raise TensorizationError(f"contraction must be one of {CONTRACTION_ORDERS}, got {order!r}.")
    for module in model.modules():
        if isinstance(module, MPOLinear):
            module.contraction = order


def set_tucker_order(model: nn.Module, order: str) -> None:
    """Force (or reset to 'auto') the execution path of every TuckerConv2d."""
    check_tucker_order(order)
    for module in model.modules():
        if isinstance(module, TuckerConv2d):
            module.order = order


def merge_for_inference(model: nn.Module) -> None:
    """Store dense weights in every MPO layer (one GEMM per call; call unmerge to train)."""
    for module in model.modules():
        if isinstance(module, MPOLinear):
            module.merge_for_inference()
