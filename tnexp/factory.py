"""The one tensorized-model factory.

``tensorize(model, spec)`` returns a tensorized deep copy of ``model`` (the teacher is never
modified) and a :class:`TensorizeReport`. Every training method in tnexp builds its student
through this function, and ``load_tensorized`` rebuilds a saved student through it too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.errors import IntegrityError
from tnexp.integrity import atomic_write_json, checksum_matches, file_checksum
from tnexp.tn.allocation import allocate_ranks, relative_tail_error
from tnexp.tn.datainit import (
    DEFAULT_DAMPING,
    conv_weight_matrix,
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
    is_hf_conv1d,
    linear_weight_in_out,
    mpo_svd,
)
from tnexp.tn.ranks import (
    balanced_factors,
    check_cr,
    check_factors,
    compression_rate,
    mpo_bond_dim_for_cr,
    mpo_bonds,
    mpo_max_bonds,
    mpo_params,
    tucker2_params,
    tucker2_ranks_for_cr,
)
from tnexp.tn.tucker import TuckerConv2d

METHODS = ("auto", "tucker", "mpo")
INITS = ("svd", "random", "whiten", "als")
DATA_INITS = ("whiten", "als")  # need input statistics of the teacher (tnexp.calibration)
LAYOUTS = ("balanced", "lowrank", "auto")
ALLOCATIONS = ("uniform", "adaptive")
SPEC_FILE = "tensorize.json"
WEIGHTS_FILE = "model.safetensors"


# =========================================================================== spec
@dataclass
class TensorizeRule:
    """Which modules to replace and how. ``pattern`` is a glob over module paths."""

    pattern: str
    method: str = "auto"  # tucker for Conv2d, mpo for Linear / Conv1D
    cr: float | None = None
    ranks: tuple[int, int] | None = None  # Tucker (r_out, r_in)
    bond_dim: int | None = None  # MPO
    num_sites: int = 2
    in_factors: list[int] | None = None
    out_factors: list[int] | None = None
    init: str = "svd"  # svd | random | whiten | als (the last two need input statistics)
    layout: str = "balanced"  # MPO only: balanced | lowrank | auto

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TensorizationError(
                f"rule {self.pattern!r}: method must be one of {METHODS}, got {self.method!r}."
            )
        if self.init not in INITS:
            raise TensorizationError(
                f"rule {self.pattern!r}: init must be one of {INITS}, got {self.init!r}."
            )
        if self.layout not in LAYOUTS:
            raise TensorizationError(
                f"rule {self.pattern!r}: layout must be one of {LAYOUTS}, got {self.layout!r}."
            )
        if self.layout != "balanced" and (self.in_factors or self.out_factors):
            raise TensorizationError(
                f"rule {self.pattern!r}: layout {self.layout!r} chooses the factors itself; "
                "remove in_factors/out_factors or use layout: balanced."
            )
        if self.layout != "balanced" and self.num_sites != 2:
            raise TensorizationError(
                f"rule {self.pattern!r}: layout {self.layout!r} is a 2-site MPO; remove "
                f"num_sites={self.num_sites} or use layout: balanced."
            )
        if self.cr is not None:
            self.cr = check_cr(self.cr, what=f"rule {self.pattern!r}: cr")
        if self.ranks is not None:
            self.ranks = tuple(int(r) for r in self.ranks)
        for attr in ("in_factors", "out_factors"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, [int(v) for v in value])
        if sum(x is not None for x in (self.ranks, self.bond_dim)) > 1:
            raise TensorizationError(f"rule {self.pattern!r}: give ranks= or bond_dim=, not both.")
        if self.cr is not None and self.has_explicit_size:
            # Which one wins is not obvious, so neither is silently dropped.
            given = "ranks" if self.ranks is not None else "bond_dim"
            raise TensorizationError(
                f"rule {self.pattern!r}: cr={self.cr} and {given}= both set the layer size; "
                f"keep one of them (cr solves the {given} from the compression rate)."
            )

    @property
    def has_explicit_size(self) -> bool:
        return self.ranks is not None or self.bond_dim is not None


@dataclass
class TensorizeSpec:
    """Rules (first match wins), exclusions, and an optional whole-model CR target.

    With ``overall_cr`` set, rules leave ``cr`` empty: one uniform per-layer CR is solved
    so that the whole model (every parameter, tensorized or not) loses ``overall_cr`` of
    its parameters.
    """

    rules: list[TensorizeRule]
    exclude: list[str] = field(default_factory=list)
    overall_cr: float | None = None
    contraction: str = "auto"
    # uniform: one per-layer CR; adaptive: per-layer ranks that minimise the summed
    # relative output error under the overall_cr budget (2-site MPO layers).
    allocation: str = "uniform"
    damping: float = DEFAULT_DAMPING  # of the input Gram, relative to its mean diagonal
    als_sweeps: int = 4
    als_tol: float = 1e-4

    def __post_init__(self) -> None:
        self.rules = [rule_from_config(r, i) for i, r in enumerate(self.rules)]
        self.exclude = [str(e) for e in self.exclude]
        if not self.rules:
            raise TensorizationError("a tensorization spec needs at least one rule.")
        if self.allocation not in ALLOCATIONS:
            raise TensorizationError(
                f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}."
            )
        if self.allocation == "adaptive" and self.overall_cr is None:
            raise TensorizationError(
                "allocation adaptive distributes an overall_cr budget across layers; set "
                "overall_cr (and no per-rule cr) or use allocation: uniform."
            )
        if not 0.0 <= float(self.damping) < 1e3:
            raise TensorizationError(f"damping must be >= 0, got {self.damping}.")
        if int(self.als_sweeps) < 1:
            raise TensorizationError(f"als_sweeps must be >= 1, got {self.als_sweeps}.")
        if self.contraction not in CONTRACTION_ORDERS:
            raise TensorizationError(
                f"contraction must be one of {CONTRACTION_ORDERS}, got {self.contraction!r}."
            )
        if self.overall_cr is not None:
            self.overall_cr = check_cr(self.overall_cr, what="overall_cr")
            given = [r.pattern for r in self.rules if r.cr is not None]
            if given:
                raise TensorizationError(
                    f"overall_cr is set, so the per-layer CR is solved; remove cr from rules "
                    f"{given}."
                )
        else:
            missing = [r.pattern for r in self.rules if r.cr is None and not r.has_explicit_size]
            if missing:
                raise TensorizationError(
                    f"rules {missing} give neither cr, ranks nor bond_dim; set one of them or "
                    "set overall_cr for the whole model."
                )

    @classmethod
    def from_config(cls, cfg: Any) -> TensorizeSpec:
        """Build from a dict or an OmegaConf/Hydra config (``rules``, ``exclude``, ...)."""
        if isinstance(cfg, TensorizeSpec):
            return cfg
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf ships with hydra
            pass
        if not isinstance(cfg, Mapping):
            raise TensorizationError(f"a tensorization spec must be a mapping, got {type(cfg)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known - {"_target_"}
        if unknown:
            raise TensorizationError(
                f"unknown tensorization spec keys {sorted(unknown)}; known: {sorted(known)}."
            )
        if not isinstance(cfg.get("rules"), Sequence) or isinstance(cfg.get("rules"), str):
            raise TensorizationError(
                f"a tensorization spec needs a list of rules, got rules={cfg.get('rules')!r}; "
                "e.g. rules: [{pattern: 'layer*.*.conv*', cr: 0.5}]."
            )
        rules = [rule_from_config(r, i) for i, r in enumerate(cfg["rules"])]
        return cls(**{**{k: v for k, v in cfg.items() if k in known}, "rules": rules})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rule_from_config(rule: Any, index: int = 0) -> TensorizeRule:
    """A :class:`TensorizeRule` from a mapping, refusing unknown keys and a missing pattern.

    Errors name the rule (its index and pattern) and list the keys a rule may have.
    """
    if isinstance(rule, TensorizeRule):
        return rule
    if not isinstance(rule, Mapping):
        raise TensorizationError(
            f"rule {index} must be a mapping such as {{pattern: 'layer*.*.conv*', cr: 0.5}}, "
            f"got {rule!r}."
        )
    known = [f.name for f in dataclasses.fields(TensorizeRule)]
    pattern = rule.get("pattern")
    label = f"rule {index} ({pattern!r})" if isinstance(pattern, str) else f"rule {index}"
    unknown = [k for k in rule if k not in known]
    if unknown:
        close = {k: difflib.get_close_matches(str(k), known, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
        raise TensorizationError(
            f"{label}: unknown key(s) {unknown}{' (' + hints + ')' if hints else ''}. A rule "
            f"takes {known}."
        )
    if not isinstance(pattern, str) or not pattern or pattern.lower() in ("none", "null"):
        raise TensorizationError(
            f"{label}: pattern is missing or empty (got {pattern!r}); give a glob over module "
            "paths, e.g. pattern: 'layer*.*.conv*' or 'transformer.h.*.mlp.c_fc'."
        )
    try:
        return TensorizeRule(**dict(rule))
    except TensorizationError:
        raise
    except (TypeError, ValueError) as err:  # e.g. ranks: 3 or cr: "half"
        raise TensorizationError(
            f"{label}: {err}. Check the value types: cr a float in (0, 1), ranks [r_out, "
            "r_in], bond_dim an int, in_factors/out_factors lists of ints."
        ) from None


# =========================================================================== report
@dataclass
class LayerReport:
    name: str
    kind: str  # "tucker" | "mpo"
    module_type: str
    shape: list[int]  # weight shape in the original layer's layout
    params_before: int
    params_after: int
    weight_params_before: int
    weight_params_after: int
    cr_target: float | None
    init: str
    ranks: list[int] | None = None
    bond_dim: int | None = None
    bonds: list[int] | None = None
    in_factors: list[int] | None = None
    out_factors: list[int] | None = None
    layout: str | None = None  # MPO: balanced | lowrank (after auto's choice)
    # Relative output error ||X(W-W')|| / ||XW|| on the calibration inputs (None without
    # input statistics) and relative weight error ||W-W'|| / ||W|| of the initialisation.
    output_error: float | None = None
    weight_error: float | None = None
    predicted_error: float | None = None  # adaptive allocation: from the spectrum's tail
    als_sweeps: int | None = None

    @property
    def cr(self) -> float:
        """Achieved CR of the decomposed weight (paper eq. 9)."""
        return compression_rate(self.weight_params_before, self.weight_params_after)

    def structure(self) -> dict[str, Any]:
        """What is needed to rebuild this layer's shapes without the teacher."""
        if self.kind == "tucker":
            return {"method": "tucker", "ranks": self.ranks}
        return {
            "method": "mpo",
            "bond_dim": self.bond_dim,
            "in_factors": self.in_factors,
            "out_factors": self.out_factors,
        }


@dataclass
class TensorizeReport:
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    overall_cr_target: float | None
    per_layer_cr: float | None  # the uniform per-layer CR solved for overall_cr
    contraction: str = "auto"
    allocation: str = "uniform"

    @property
    def tensorized_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def tensorized_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def tensorized_cr(self) -> float:
        """CR over the replaced layers only (their weights and biases)."""
        return compression_rate(self.tensorized_params_before, self.tensorized_params_after)

    @property
    def model_cr(self) -> float:
        """CR of the whole model: every parameter, tensorized or not."""
        return compression_rate(self.model_params_before, self.model_params_after)

    def resolved_spec(self) -> TensorizeSpec:
        """An explicit per-layer spec that rebuilds exactly these shapes (random init)."""
        rules = [
            TensorizeRule(pattern=layer.name, init="random", **_rule_kwargs(layer))
            for layer in self.layers
        ]
        return TensorizeSpec(rules=rules, contraction=self.contraction)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [{**dataclasses.asdict(layer), "cr": layer.cr} for layer in self.layers],
            "totals": {
                "num_layers": len(self.layers),
                "tensorized_params_before": self.tensorized_params_before,
                "tensorized_params_after": self.tensorized_params_after,
                "tensorized_cr": self.tensorized_cr,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "model_cr": self.model_cr,
                "overall_cr_target": self.overall_cr_target,
                "per_layer_cr": self.per_layer_cr,
            },
            "contraction": self.contraction,
            "allocation": self.allocation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorizeReport:
        fields = {f.name for f in dataclasses.fields(LayerReport)}
        layers = [
            LayerReport(**{k: v for k, v in d.items() if k in fields}) for d in data["layers"]
        ]
        totals = data["totals"]
        return cls(
            layers=layers,
            model_params_before=totals["model_params_before"],
            model_params_after=totals["model_params_after"],
            overall_cr_target=totals.get("overall_cr_target"),
            per_layer_cr=totals.get("per_layer_cr"),
            contraction=data.get("contraction", "auto"),
            allocation=data.get("allocation", "uniform"),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def table(self, max_rows: int | None = 40):
        """A rich Table: one row per replaced layer, then the totals."""
        from rich.table import Table

        table = Table(title="tensorization report", show_lines=False)
        for col in ("layer", "kind", "shape", "ranks / bond", "params", "tensorized", "CR"):
            table.add_column(
                col, justify="right" if col in ("params", "tensorized", "CR") else "left"
            )
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for layer in rows:
            size = (
                f"r={tuple(layer.ranks)}"
                if layer.kind == "tucker"
                else f"D={layer.bond_dim} {'x'.join(map(str, layer.in_factors))}->"
                f"{'x'.join(map(str, layer.out_factors))}"
            )
            table.add_row(
                layer.name,
                layer.kind,
                "x".join(map(str, layer.shape)),
                size,
                f"{layer.params_before:,}",
                f"{layer.params_after:,}",
                f"{layer.cr:.3f}",
            )
        if max_rows is not None and len(self.layers) > max_rows:
            table.add_row(f"... {len(self.layers) - max_rows} more", "", "", "", "", "", "")
        table.add_section()
        table.add_row(
            f"tensorized layers ({len(self.layers)})",
            "",
            "",
            "",
            f"{self.tensorized_params_before:,}",
            f"{self.tensorized_params_after:,}",
            f"{self.tensorized_cr:.3f}",
        )
        table.add_row(
            "whole model",
            "",
            "",
            "",
            f"{self.model_params_before:,}",
            f"{self.model_params_after:,}",
            f"{self.model_cr:.3f}",
        )
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=_NullFile())
        console.print(self.table())
        return console.export_text()


class _NullFile:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _rule_kwargs(layer: LayerReport) -> dict[str, Any]:
    structure = layer.structure()
    method = structure.pop("method")
    if method == "mpo":
        structure["num_sites"] = len(structure["in_factors"])
    return {"method": method, **structure}


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


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _no_match_error(what: str, pattern: str, candidates: Sequence[str]) -> TensorizationError:
    close = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.3)
    hint = f" Close names: {close}." if close else ""
    sample = list(candidates[:8])
    return TensorizationError(
        f"{what} {pattern!r} matches no tensorizable module (nn.Conv2d, nn.Linear, Conv1D).{hint}"
        f" Module paths look like {sample}; patterns are globs such as 'layer*.*.conv*' or "
        "'transformer.h.*.mlp.c_fc'."
    )


def plan_layers(model: nn.Module, spec: TensorizeSpec) -> list[_Planned]:
    """Select the modules to replace: first matching rule wins, exclusions removed."""
    candidates = [(n, m) for n, m in model.named_modules() if n and supported_kind(m)]
    names = [n for n, _ in candidates]
    for rule in spec.rules:
        if not any(_matches(n, rule.pattern) for n in names):
            raise _no_match_error("pattern", rule.pattern, names)
    for pattern in spec.exclude:
        if not any(_matches(n, pattern) for n in names):
            raise _no_match_error("exclusion", pattern, names)
    planned: list[_Planned] = []
    for name, module in candidates:
        if any(_matches(name, p) for p in spec.exclude):
            continue
        rule = next((r for r in spec.rules if _matches(name, r.pattern)), None)
        if rule is None:
            continue
        kind = supported_kind(module)
        if rule.method != "auto" and rule.method != kind:
            raise TensorizationError(
                f"{name}: rule {rule.pattern!r} asks for {rule.method}, but this module is a "
                f"{type(module).__name__} (supported: tucker for nn.Conv2d, mpo for nn.Linear / "
                "Conv1D). Narrow the pattern or use method: auto."
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
    return any(
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


def _build_layer(
    item: _Planned, size: Mapping[str, Any], spec: TensorizeSpec, stats: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """The replacement layer and what its initialisation measured (errors, ALS sweeps)."""
    rule = item.rule
    init = rule.init
    info: dict[str, Any] = {}
    if item.kind == "tucker":
        if init == "whiten":
            raise TensorizationError(
                f"{item.name}: init 'whiten' is exact only for an MPO whose input sits on one "
                "site; use init 'als' (data-aware Tucker-2 sweep) for convolutions."
            )
        layer = TuckerConv2d.from_conv(
            item.module,
            ranks=size["ranks"],
            init="svd" if init == "als" else init,
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
            name=item.name,
        )
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
    in_dim, out_dim = weight.shape
    balanced = (balanced_factors(in_dim, 2), balanced_factors(out_dim, 2))
    low = lowrank_factors(in_dim, out_dim)
    errors = {}
    for layout, (fin, fout) in (("lowrank", low), ("balanced", balanced)):
        bond = mpo_bond_dim_for_cr(fin, fout, cr, name=item.name)
        bonds = mpo_bonds(fin, fout, bond)
        if layout == "lowrank":
            cores = mpo_whiten(weight, gram, fin, fout, bonds, damping=spec.damping)
        else:
            cores = mpo_svd(weight, fin, fout, bonds)
        errors[layout] = output_error(weight, mpo_contract(cores).to(weight.dtype), gram)
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
    spectra, costs, caps = [], [], []
    for item in free:
        weight = linear_weight_in_out(item.module)
        (i1, i2), (o1, o2) = item.in_factors, item.out_factors
        if item.layout == "lowrank" and stats is not None and item.name in stats:
            spectrum = whitened_spectrum(weight, stats.gram(item.name), damping=spec.damping)
        else:  # data-free: the spectrum at the bond cut of the site-major weight
            site_major = weight.double().reshape(i1, i2, o1, o2).permute(0, 2, 1, 3)
            spectrum = torch.linalg.svdvals(site_major.reshape(i1 * o1, i2 * o2))
        spectra.append(spectrum)
        costs.append(i1 * o1 + i2 * o2)
        caps.append(max(mpo_max_bonds(item.in_factors, item.out_factors)))
    ranks = allocate_ranks(spectra, costs, budget, max_ranks=caps, names=[p.name for p in free])
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
        allocation=spec.allocation,
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


def merge_for_inference(model: nn.Module) -> None:
    """Store dense weights in every MPO layer (one GEMM per call; call unmerge to train)."""
    for module in model.modules():
        if isinstance(module, MPOLinear):
            module.merge_for_inference()


# =========================================================================== save / load
def save_tensorized(
    model: nn.Module,
    report: TensorizeReport,
    directory: str | Path,
    *,
    base_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``tensorize.json`` (report + how to build the base).

    ``base_config`` is a Hydra-style ``{"_target_": ..., ...}`` that builds the dense
    architecture; with it, :func:`load_tensorized` needs nothing but the directory.
    """
    import os

    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    tmp = directory / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_model(model, str(tmp))  # handles tied weights
    os.replace(tmp, weights)  # never a half-written weights file under the real name
    payload = {
        "report": report.to_dict(),
        "base_config": dict(base_config or {}) or None,
        # Written last: the JSON is the commit marker and carries the weights' checksum.
        "weights_checksum": file_checksum(weights),
    }
    atomic_write_json(directory / SPEC_FILE, payload, default=_json_default)
    return directory


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj)}")


def load_tensorized(
    directory: str | Path, base: nn.Module | None = None
) -> tuple[nn.Module, TensorizeReport]:
    """Rebuild a saved tensorized model: build (or take) the dense base, re-tensorize with
    the recorded shapes (random init, no SVD), then load the weights strictly.

    Nothing in the folder is executed: the base is built only by one of tnexp's own model
    builders (:mod:`tnexp.models.builders`), and the weights are safetensors whose checksum
    (recorded in ``tensorize.json``) is verified first.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    resave = "re-save the model (or copy the folder again from a good source)"
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {directory} is not a saved tensorized model "
                "(expected files written by tnexp.factory.save_tensorized)."
            )
    try:
        payload = json.loads(spec_path.read_text())
        report = TensorizeReport.from_dict(payload["report"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise IntegrityError(
            f"{spec_path} is not a readable tensorize.json ({type(err).__name__}: {err}); {resave}."
        ) from None
    recorded = payload.get("weights_checksum")
    if recorded is not None and not checksum_matches(weights_path, recorded):
        raise IntegrityError(
            f"{weights_path} fails the checksum recorded in {spec_path}: the weights were "
            f"damaged or replaced after saving; {resave}."
        )
    if base is None:
        if not payload.get("base_config"):
            raise TensorizationError(
                f"{spec_path} records no base_config; pass the dense architecture as base=."
            )
        from tnexp.models.builders import build_registered

        if not isinstance(payload["base_config"], Mapping):
            raise IntegrityError(f"{spec_path}: base_config is not a mapping; {resave}.")
        base = build_registered(payload["base_config"], source=str(spec_path))
    with torch.random.fork_rng(devices=[]):
        student, _ = tensorize(base, report.resolved_spec())
    try:
        load_model(student, str(weights_path), strict=True)
    except RuntimeError as err:
        raise TensorizationError(
            f"the weights in {weights_path} do not fit the rebuilt model ({err}). Was the "
            "base architecture the one used when saving?"
        ) from None
    except Exception as err:  # safetensors' own error types: truncated or corrupt header
        raise IntegrityError(
            f"{weights_path} is not a readable safetensors file ({type(err).__name__}: "
            f"{err}); {resave}."
        ) from None
    return student, report


__all__ = [
    "LayerReport",
    "TensorizeReport",
    "TensorizeRule",
    "TensorizeSpec",
    "count_parameters",
    "load_tensorized",
    "merge_for_inference",
    "needs_input_stats",
    "plan_layers",
    "rule_from_config",
    "save_tensorized",
    "set_contraction",
    "solve_overall_cr",
    "supported_kind",
    "tensorize",
    "tensorized_modules",
]
