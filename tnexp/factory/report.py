"""What a tensorization did: per-layer and whole-model parameter counts, CRs and errors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tnexp.factory.spec import TensorizeRule, TensorizeSpec
from tnexp.tn.ranks import compression_rate


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
    # The output weighting the init minimised under: fisher, or none (also for layers whose
    # solver has no weighted form, e.g. ALS / Tucker-2, when the spec asked for fisher).
    weighting: str | None = None
    rule: str | None = None  # the pattern of the rule that selected this layer

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


@dataclass(frozen=True)
class RuleMatch:
    """What one rule selected: how many modules, and of which kinds and shapes.

    ``groups`` maps ``"<module type> <weight shape>"`` to a count, so a rule that also caught
    modules it was not meant for (another type or shape) shows as several groups.
    """

    pattern: str
    count: int
    groups: dict[str, int]

    @property
    def mixed(self) -> bool:
        """Whether the rule selected modules of more than one type or shape."""
        return len(self.groups) > 1

    def describe(self) -> str:
        if not self.count:
            return f"{self.pattern!r}: 0 modules (every match taken by an earlier rule)"
        groups = ", ".join(f"{n} x {g}" for g, n in self.groups.items())
        note = "  <- several kinds/shapes" if self.mixed else ""
        return f"{self.pattern!r}: {self.count} modules ({groups}){note}"


@dataclass
class TensorizeReport:
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    overall_cr_target: float | None
    per_layer_cr: float | None  # the uniform per-layer CR solved for overall_cr
    contraction: str = "auto"
    allocation: str = "uniform"
    weighting: str = "none"
    rules: list[str] = field(default_factory=list)  # the spec's patterns, in order
    tucker_order: str = "auto"
    order_timing: str = "tucker"

    def rule_matches(self) -> list[RuleMatch]:
        """Per rule (spec order): the number of layers it selected and their kinds/shapes."""
        patterns = list(self.rules) or list(dict.fromkeys(layer.rule for layer in self.layers))
        out = []
        for pattern in patterns:
            groups: dict[str, int] = {}
            for layer in self.layers:
                if layer.rule == pattern:
                    key = f"{layer.module_type} {'x'.join(map(str, layer.shape))}"
                    groups[key] = groups.get(key, 0) + 1
            out.append(RuleMatch(str(pattern), sum(groups.values()), groups))
        return out

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
        return TensorizeSpec(
            rules=rules,
            contraction=self.contraction,
            tucker_order=self.tucker_order,
            order_timing=self.order_timing,
        )

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
            "tucker_order": self.tucker_order,
            "order_timing": self.order_timing,
            "allocation": self.allocation,
            "weighting": self.weighting,
            "rules": [dataclasses.asdict(m) for m in self.rule_matches()],
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
            tucker_order=data.get("tucker_order", "auto"),
            order_timing=data.get("order_timing", "tucker"),
            allocation=data.get("allocation", "uniform"),
            weighting=data.get("weighting", "none"),
            rules=[r["pattern"] for r in data.get("rules", [])],
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
        table.add_section()
        for match in self.rule_matches():
            table.add_row(f"rule {match.describe()}", "", "", "", "", "", "")
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
