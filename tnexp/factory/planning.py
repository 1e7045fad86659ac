"""Planning: which modules a spec selects, their MPO factors and their sizes at a CR."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from tnexp.factory.patterns import match_pattern, no_match_error
from tnexp.factory.spec import TensorizeRule, TensorizeSpec
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import (
    is_hf_conv1d,
    linear_weight_in_out,
)
from tnexp.tn.ranks import (
    balanced_factors,
    check_factors,
    compression_rate,
    mpo_bond_dim_for_cr,
    mpo_params,
    tucker2_params,
    tucker2_ranks_for_cr,
)


# =========================================================================== planning
def supported_kind(module: nn.Module) -> str | None:
    """'tucker' for nn.Conv2d, 'mpo' for nn.Linear and HF Conv1D, else None."""
    if isinstance(module, nn.Conv2d):
        return "tucker"
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "mpo"
    return None


@dataclass
class _Planned:
    name: str
    module: nn.Module
    kind: str
    rule: TensorizeRule
    in_factors: list[int] | None = None
    out_factors: list[int] | None = None
    layout: str | None = None  # MPO: balanced | lowrank | auto (resolved by tensorize)


def plan_layers(model: nn.Module, spec: TensorizeSpec) -> list[_Planned]:
    """Select the modules to replace: first matching rule wins, exclusions removed."""
    candidates = [(n, m) for n, m in model.named_modules() if n and supported_kind(m)]
    names = [n for n, _ in candidates]
    for rule in spec.rules:
        if not any(match_pattern(n, rule.pattern) for n in names):
            raise no_match_error("pattern", rule.pattern, names)
    for pattern in spec.exclude:
        if not any(match_pattern(n, pattern) for n in names):
            raise no_match_error("exclusion", pattern, names)
    planned: list[_Planned] = []
    for name, module in candidates:
        if any(match_pattern(name, p) for p in spec.exclude):
            continue
        rule = next((r for r in spec.rules if match_pattern(name, r.pattern)), None)
        if rule is None:
            continue
        kind = supported_kind(module)
        if rule.method != "auto" and rule.method != kind:
            raise TensorizationError(
                f"{name}: rule {rule.pattern!r} asks for {rule.method}, but this module is a "
                f"{type(module).__name__} (supported: tucker for nn.Conv2d, mpo for nn.Linear / "
                "Conv1D). Narrow the pattern or use method: auto."
            )
        if rule.init == "hooi" and kind != "tucker":
            raise TensorizationError(
                f"{name}: init 'hooi' refines a Tucker-2 decomposition of a convolution; this "
                f"{type(module).__name__} becomes an MPO, whose svd init (TT-SVD) is already the "
                "best 2-site truncation. Use init: svd (or als with input statistics) here."
            )
        item = _Planned(name, module, kind, rule)
        if kind == "mpo":
            _check_factor_lists(name, rule)
            in_dim, out_dim = linear_weight_in_out(module).shape
            item.layout = rule.layout
            if rule.layout == "lowrank":
                item.in_factors, item.out_factors = lowrank_factors(in_dim, out_dim)
                planned.append(item)
                continue
            sites = len(rule.in_factors or rule.out_factors or []) or rule.num_sites
            item.in_factors = (
                check_factors(in_dim, rule.in_factors, what=f"{name}: input")
                if rule.in_factors
                else balanced_factors(in_dim, sites)
            )
            item.out_factors = (
                check_factors(out_dim, rule.out_factors, what=f"{name}: output")
                if rule.out_factors
                else balanced_factors(out_dim, sites)
            )
        planned.append(item)
    if not planned:
        raise TensorizationError(
            "the spec selects no module: every match was excluded. Check `exclude`."
        )
    return planned


def _check_factor_lists(name: str, rule: TensorizeRule) -> None:
    """One input and one output factor per MPO site: the lists and num_sites must agree."""
    lengths = [len(v) for v in (rule.in_factors, rule.out_factors) if v]
    where = f"{name} (rule {rule.pattern!r})"
    if len(set(lengths)) > 1:
        raise TensorizationError(
            f"{where}: in_factors {rule.in_factors} and out_factors {rule.out_factors} have "
            "different lengths; an MPO has one input and one output factor per site, so give "
            "lists of equal length (or one of them only)."
        )
    if lengths and rule.num_sites != 2 and rule.num_sites != lengths[0]:
        raise TensorizationError(
            f"{where}: num_sites={rule.num_sites} but the factor lists have {lengths[0]} "
            "entries; drop num_sites or make them agree."
        )


def lowrank_factors(in_dim: int, out_dim: int) -> tuple[list[int], list[int]]:
    """2-site MPO factors that make it a rank-D product ``U V`` (input on site 1)."""
    return [in_dim, 1], [1, out_dim]


def _size_for(item: _Planned, cr: float | None) -> dict[str, Any]:
    """Ranks / bond dimension of a planned layer at ``cr`` (or its rule's explicit size)."""
    rule = item.rule
    if item.kind == "tucker":
        if rule.ranks is not None:
            return {"ranks": rule.ranks}
        return {
            "ranks": tucker2_ranks_for_cr(
                item.module.out_channels,
                item.module.in_channels,
                item.module.kernel_size,
                cr,
                name=item.name,
            )
        }
    if rule.bond_dim is not None:
        return {"bond_dim": rule.bond_dim}
    return {"bond_dim": mpo_bond_dim_for_cr(item.in_factors, item.out_factors, cr, name=item.name)}


def _weight_params_after(item: _Planned, size: Mapping[str, Any]) -> int:
    if item.kind == "tucker":
        m = item.module
        return tucker2_params(m.out_channels, m.in_channels, m.kernel_size, size["ranks"])
    return mpo_params(item.in_factors, item.out_factors, size["bond_dim"])


def _weight_numel(module: nn.Module) -> int:
    return module.weight.numel()


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights, e.g. GPT-2's lm_head and wte, are counted once)."""
    return sum(p.numel() for p in model.parameters())


def solve_overall_cr(model: nn.Module, planned: Sequence[_Planned], target: float) -> float:
    """Uniform per-layer CR that brings the whole model's CR closest to ``target``.

    Only parameter counts are evaluated (no decomposition), so the bisection is cheap.
    """
    total = count_parameters(model)
    fixed_after = total - sum(_weight_numel(p.module) for p in planned)

    def model_cr_at(cr: float) -> float:
        after = fixed_after + sum(_weight_params_after(p, _size_for(p, cr)) for p in planned)
        return compression_rate(total, after)

    free = [p for p in planned if not p.rule.has_explicit_size]
    if not free:
        raise TensorizationError(
            "overall_cr is set but every selected layer has explicit ranks/bond_dim; "
            "nothing is left to solve."
        )
    share = sum(_weight_numel(p.module) for p in free) / total
    smallest = {"tucker": {"ranks": (1, 1)}, "mpo": {"bond_dim": 1}}
    reachable = compression_rate(
        total,
        fixed_after
        + sum(
            _weight_params_after(
                p, _size_for(p, None) if p.rule.has_explicit_size else smallest[p.kind]
            )
            for p in planned
        ),
    )
    if reachable < target:
        raise TensorizationError(
            f"overall_cr {target} is out of reach: the selected layers hold {share:.1%} of the "
            f"model's parameters, so even rank-1 layers remove only {reachable:.3f}. Select more "
            "layers or lower overall_cr."
        )
    lo, hi = 1e-4, 1.0 - 1e-4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        try:
            value = model_cr_at(mid)
        except TensorizationError:  # ranks below 1: too aggressive
            hi = mid
            continue
        if value < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda c: abs(model_cr_at(c) - target))
    return round(best, 6)
