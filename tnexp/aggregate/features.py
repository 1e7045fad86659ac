"""Feature-matching tables (``task=features``): the student's outputs against the teacher's.

One table per data set; one row per (model, compared output, CR, method, training samples)
cell with the seeds of its best setting averaged, and a dense teacher row per (model,
output): the reference every metric is measured against (relative error 0, cosine 1).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tnexp.aggregate.common import METHOD_ORDER, get_path, mean, minutes, number, slug, stdev
from tnexp.aggregate.grouping import RunSets
from tnexp.aggregate.record import Run
from tnexp.aggregate.table import Column, Table

# The metrics of tnexp.tasks.FeatureMatchingTask, in the order of the table's columns, and
# the teacher's own value of each (it is the reference the student is compared with).
FEATURE_METRICS = {"rel_err": 0.0, "cosine": 1.0, "sim_corr": 1.0}
DENSE = "dense (teacher)"


class FeatureTables(RunSets):
    """Per data set, the feature-matching runs' relative error, cosine and similarity
    correlation at their best validation."""

    def _feature_row(self, members: list[Run]) -> dict[str, Any]:
        candidates = self.outside_sweeps(members)
        chosen, n_settings = self.choose(candidates)
        first = chosen[0]
        row: dict[str, Any] = {
            "dataset": first.dataset,
            "model": first.model,
            "output": first.feature_output,
            "cr": first.cr,
            "model_cr": mean(r.achieved_cr for r in chosen),
            "method": first.family,
            "samples": first.samples_label
            + (f" (smoke: {first.smoke_key})" if first.smoke else ""),
            "n": len(chosen),
            "time_min": minutes(mean(r.time_to_best_s for r in chosen)),
            "parallel_min": minutes(mean(r.parallel_s() for r in chosen)),
            "workers": first.workers if first.slice_jobs else None,
            "_runs": chosen,
        }
        sources = set()
        for name in FEATURE_METRICS:
            if f"val/{name}" == first.monitor:
                values = [r.best_value for r in chosen]
            else:
                found = [r.metric_at_best(f"val/{name}") for r in chosen]
                values = [v for v, _ in found]
                sources |= {src for v, src in found if v is not None}
            row[name] = mean(values)
            row[f"{name}_std"] = stdev(values)
            row[f"before_{name}"] = mean(
                number(get_path(r.results, f"metrics.before.val/{name}")) for r in chosen
            )
        notes = []
        if n_settings > 1:
            notes.append(f"best of {n_settings} settings")
        if len(candidates) < len(members):
            notes.append(f"{len(members) - len(candidates)} sweep run(s) in the sweep tables")
        elif any(self.in_sweep(r) for r in chosen):
            notes.append("from a sweep")
        if "final" in sources:
            notes.append("cosine / sim. corr. after training")
        if any(r.method == "assemble" for r in chosen):
            notes.append("slice jobs: time = serial sum")
        row["note"] = "; ".join(notes)
        return row

    def feature_rows(self, runs: list[Run]) -> list[dict[str, Any]]:
        """Rows of feature-matching runs: per (model, output) the dense teacher first, then
        one per (CR, method, samples, smoke) cell."""
        cells: dict[tuple, list[Run]] = defaultdict(list)
        for r in runs:
            if r.family in ("local", "global", "hybrid"):
                key = (
                    r.dataset,
                    r.model,
                    r.feature_output,
                    r.cr,
                    r.family,
                    r.samples_key,
                    r.smoke_key,
                )
                cells[key].append(r)
        rows = [self._feature_row(members) for members in cells.values()]
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            groups[(row["dataset"], row["model"], row["output"])].append(row)
        for (dataset, model, output), members in groups.items():
            teacher = {"dataset": dataset, "model": model, "output": output, "method": DENSE}
            for name, value in FEATURE_METRICS.items():
                # sim_corr exists only for per-sample embeddings: the teacher has it iff they do
                has = any(m[name] is not None for m in members)
                teacher[name] = value if has else None
            teacher["note"] = "the reference: the student's outputs are compared with its own"
            teacher["_runs"] = []
            rows.append(teacher)
        return sorted(rows, key=_row_order)

    def feature_tables(self) -> list[Table]:
        runs = self.feature_runs()
        tables: list[Table] = []
        for dataset in sorted({r.dataset for r in runs}):
            rows = self.feature_rows([r for r in runs if r.dataset == dataset])
            tables.append(
                Table(
                    f"features_{slug(dataset)}",
                    f"Feature matching on {dataset}: student vs teacher outputs",
                    self.feature_columns(),
                    rows,
                    [
                        "rel. error: ‖S − T‖ / ‖T‖ of the student's outputs against the "
                        "teacher's over the validation set, best validation during training "
                        "(mean ± std over seeds); cosine and sim. corr. (Pearson correlation of "
                        "pairwise cosine similarities, per-sample embeddings only) at that "
                        "validation. Several settings in one cell: the best is shown (note).",
                        "before recovery: the student as tensorized, before training. time: "
                        "optimisation time (forward + backward, no data loading or feature "
                        "capture) to the best rel. error.",
                    ],
                )
            )
        return tables

    @staticmethod
    def feature_columns() -> list[Column]:
        return [
            Column("dataset", "data", "s"),
            Column("model", "model", "s"),
            Column("output", "compared output", "s"),
            Column("cr", "CR", ".2f"),
            Column("model_cr", "model CR", ".3f", optional=True),
            Column("method", "method", "s"),
            Column("samples", "samples", "s"),
            Column("n", "runs", "d"),
            Column("rel_err", "rel. error", ".4f", std="rel_err_std"),
            Column("cosine", "cosine", ".4f", std="cosine_std"),
            Column("sim_corr", "sim. corr.", ".4f", std="sim_corr_std", optional=True),
            Column("before_rel_err", "rel. error before recovery", ".4f", optional=True),
            Column("before_cosine", "cosine before recovery", ".4f", optional=True),
            Column("time_min", "time to best (min)", "t"),
            Column("parallel_min", "ideal parallel (min)", "t", optional=True),
            Column("workers", "workers", "d", optional=True),
            Column("note", "note", "s", optional=True),
        ]


def _row_order(row: dict[str, Any]) -> tuple:
    return (
        str(row["model"]),
        str(row["output"]),
        row["method"] != DENSE,
        row.get("cr") is None,
        row.get("cr") or 0.0,
        METHOD_ORDER.get(row["method"], 9),
        str(row.get("samples")),
    )
