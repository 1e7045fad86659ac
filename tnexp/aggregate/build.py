"""aggregate(): find the runs, build the selected tables and figures, write them to a folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tnexp.aggregate.aggregation import Aggregation
from tnexp.aggregate.common import AggregateError, slug
from tnexp.aggregate.discovery import find_runs
from tnexp.aggregate.figures import (
    figure_accuracy_vs_time,
    figure_features_vs_time,
    figure_lm_vs_time,
    figure_sweep,
)
from tnexp.aggregate.record import Incomplete, Run
from tnexp.aggregate.reference import Reference, load_reference
from tnexp.aggregate.table import Table

TABLE_GROUPS = (
    "table1",
    "table2",
    "table3",
    "table4",
    "table6",
    "table7",
    "features",
    "sweeps",
    "accuracy",
    "runs",
)


def _selected(name: str, wanted: set[str] | None) -> bool:
    if wanted is None:
        return True
    if name.startswith("sweep_") and "sweeps" in wanted:
        return True
    return any(name == w or name.startswith(w + "_") for w in wanted)


@dataclass
class AggregateResult:
    tables: list[Table]
    figures: list[Path]
    incomplete: list[Incomplete]
    runs: list[Run]
    notes: list[str]

    @property
    def markdown(self) -> str:
        parts = [t.to_markdown() for t in self.tables]
        if self.figures:
            parts.append("Figures:\n" + "\n".join(f"- {p}" for p in self.figures) + "\n")
        if self.incomplete:
            parts.append(
                "Incomplete runs (left out of the tables):\n"
                + "\n".join(f"- {i.label}: {i.reason}" for i in self.incomplete)
                + "\n"
            )
        if self.notes:
            parts.append("\n".join(f"Note: {n}" for n in self.notes) + "\n")
        return "\n".join(parts)


def aggregate(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    tables: str | Sequence[str] = "all",
    compare_to: str | None = None,
    reference: str | Path | Reference | None = None,
    figures: bool = True,
) -> AggregateResult:
    """Aggregate the runs under ``paths``; write ``<out>/tables`` and ``<out>/figures``.

    Args:
        paths: run folders, multirun sweep folders or trees of them (or results.json files).
        out: output folder (None: nothing is written, tables are only returned).
        tables: "all" or names among table1-4, table6, table7, features, sweeps, accuracy,
            runs.
        compare_to: paper data set for classification runs that name none themselves.
        reference: the paper figures (path or loaded :class:`Reference`).
        figures: also draw the PNG figures.
    """
    if isinstance(tables, str):
        tables = [t.strip() for t in tables.split(",") if t.strip()]
    wanted = None if not tables or "all" in tables else set(tables)
    unknown = sorted((wanted or set()) - set(TABLE_GROUPS))
    if unknown:
        raise AggregateError(
            f"unknown table(s) {unknown}; choose 'all' or among {', '.join(TABLE_GROUPS)}."
        )
    ref = reference if isinstance(reference, Reference) else load_reference(reference)
    runs, incomplete = find_runs(paths)
    agg = Aggregation(runs, incomplete, ref, compare_to)
    built = [t for t in agg.tables() if _selected(t.name, wanted)]
    notes = []
    for w in sorted(wanted or ()):
        if not any(_selected(t.name, {w}) for t in built):
            notes.append(f"{w}: no matching runs among the inputs (nothing to tabulate).")
    written: list[Path] = []
    if out is not None:
        out = Path(out)
        (out / "tables").mkdir(parents=True, exist_ok=True)
        for t in built:
            (out / "tables" / f"{t.name}.md").write_text(t.to_markdown())
            t.write_csv(out / "tables" / f"{t.name}.csv")
        if figures:
            (out / "figures").mkdir(parents=True, exist_ok=True)
            written = _figures(agg, built, out / "figures")
    return AggregateResult(built, written, incomplete, runs, notes)


def _figures(agg: Aggregation, tables: list[Table], folder: Path) -> list[Path]:
    paths: list[Path | None] = []
    if agg.classification_runs():
        paths.append(figure_accuracy_vs_time(agg, folder / "fig2_top1_vs_time.png"))
    groups = agg.lm_groups()
    for (dataset, model), runs in groups.items():
        suffix = "" if len(groups) == 1 else f"_{slug(model)}_{slug(dataset)}"
        paths.append(
            figure_lm_vs_time(
                agg, runs, folder / f"fig3_lm_vs_time{suffix}.png", f"{model} on {dataset}"
            )
        )
    if agg.feature_runs():
        paths.append(figure_features_vs_time(agg, folder / "fig_features_vs_time.png"))
    for t in tables:
        if t.name.startswith("sweep_"):
            paths.append(figure_sweep(agg, t, folder / f"{t.name}.png"))
    return [p for p in paths if p is not None]
