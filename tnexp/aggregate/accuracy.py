"""Classification tables: one row per (data, model, CR, method, samples) cell; paper tables 1-4."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tnexp.aggregate.common import METHOD_ORDER, mean, minutes, number, same, slug, stdev
from tnexp.aggregate.grouping import RunSets
from tnexp.aggregate.record import Run
from tnexp.aggregate.reference import Reference
from tnexp.aggregate.table import Column, Table


class AccuracyTables(RunSets):
    """Accuracy rows of classification runs beside the paper's, per data set and per paper table."""

    def _accuracy_row(self, members: list[Run], ref: str | None) -> dict[str, Any]:
        candidates = self.outside_sweeps(members)
        chosen, n_settings = self.choose(candidates)
        first = chosen[0]
        top5 = [r.metric_at_best("val/top5") for r in chosen]
        row: dict[str, Any] = {
            "dataset": first.dataset,
            "model": first.model,
            "cr": first.cr,
            "model_cr": mean(r.achieved_cr for r in chosen),
            "method": first.family,
            "samples": first.samples_label
            + (f" (smoke: {first.smoke_key})" if first.smoke else ""),
            "n": len(chosen),
            "top1": mean(r.best_value for r in chosen),
            "top1_std": stdev(r.best_value for r in chosen),
            "top5": mean(v for v, _ in top5),
            "time_min": minutes(mean(r.time_to_best_s for r in chosen)),
            "parallel_min": minutes(mean(r.parallel_s() for r in chosen)),
            "workers": first.workers if first.slice_jobs else None,
            "vs": self.reference.label(ref) if ref else None,
            "_runs": chosen,
            "_ref": ref,
            "_samples_key": first.samples_key,
        }
        notes = []
        if n_settings > 1:
            notes.append(f"best of {n_settings} settings")
        if len(candidates) < len(members):
            notes.append(f"{len(members) - len(candidates)} sweep run(s) in the sweep tables")
        elif any(self.in_sweep(r) for r in chosen):
            notes.append("from a sweep")
        if any(src == "final" for _, src in top5):
            notes.append("top-5 after training")
        if any(r.method == "assemble" for r in chosen):
            notes.append("slice jobs: time = serial sum")
        row["note"] = "; ".join(notes)
        if first.family == "pretrain":
            paper: dict[str, Any] = self.reference.dense(ref)
        else:
            paper = (
                self.reference.row(
                    ref,
                    first.cr,
                    first.family,
                    self.reference.paper_samples(ref, first.samples_key),
                )
                or {}
            )
        row["paper_top1"] = number(paper.get("top1"))
        row["paper_top5"] = number(paper.get("top5"))
        row["paper_time_min"] = number(paper.get("time_min"))
        row["source"] = paper.get("source")
        row["delta_top1"] = (
            None
            if row["top1"] is None or row["paper_top1"] is None
            else row["top1"] - row["paper_top1"]
        )
        return row

    def accuracy_rows(self, runs: list[Run]) -> list[dict[str, Any]]:
        """Rows (dense first) for classification runs, one per (data, model, CR, method,
        samples, smoke) cell."""
        cells: dict[tuple, list[Run]] = defaultdict(list)
        for r in runs:
            if r.family in ("local", "global", "hybrid", "pretrain"):
                key = (r.dataset, r.model, r.cr, r.family, r.samples_key, r.smoke_key)
                cells[key].append(r)
        rows = [self._accuracy_row(m, self.ref_dataset(m[0])) for m in cells.values()]
        # A dense row for every (data, model) that has tensorized rows but no pretrain run
        # among the inputs: the teacher's own results.json (config.teacher.path).
        have_dense = {(r["dataset"], r["model"]) for r in rows if r["method"] == "pretrain"}
        teachers: dict[tuple, list[Run]] = defaultdict(list)
        for r in runs:
            key = (r.dataset, r.model)
            if r.family != "pretrain" and key not in have_dense:
                t = self.teacher_run(r)
                if t is not None and t.ok and t not in teachers[key]:
                    teachers[key].append(t)
        for members in teachers.values():
            row = self._accuracy_row(members, self.ref_dataset(members[0]))
            row["note"] = "; ".join(filter(None, ["teacher.path", row["note"]]))
            rows.append(row)
        for row in rows:
            if row["method"] == "pretrain":
                row["method"] = "dense (teacher)"
                row["cr"] = None
        return sorted(rows, key=_row_order)

    # ------------------------------------------------------------------ tables 1-4
    def accuracy_columns(self) -> list[Column]:
        return [
            Column("dataset", "data", "s"),
            Column("model", "model", "s"),
            Column("cr", "CR", ".2f"),
            Column("model_cr", "model CR", ".3f", optional=True),
            Column("method", "method", "s"),
            Column("samples", "samples", "s"),
            Column("n", "runs", "d"),
            Column("top1", "top-1", ".2f", std="top1_std"),
            Column("top5", "top-5", ".2f"),
            Column("time_min", "time to best (min)", "t"),
            Column("parallel_min", "ideal parallel (min)", "t", optional=True),
            Column("workers", "workers", "d", optional=True),
            Column("vs", "paper data", "s", optional=True),
            Column("paper_top1", "paper top-1", ".2f"),
            Column("paper_top5", "paper top-5", ".2f"),
            Column("paper_time_min", "paper time (min)", ".2f"),
            Column("delta_top1", "Δ top-1", "+.2f"),
            Column("source", "paper source", "s", optional=True),
            Column("note", "note", "s", optional=True),
        ]

    def accuracy_tables(self) -> list[Table]:
        runs = self.classification_runs()
        tables: list[Table] = []
        for dataset in sorted({r.dataset for r in runs}):
            rows = self.accuracy_rows([r for r in runs if r.dataset == dataset])
            refs = sorted({r["_ref"] for r in rows if r["_ref"]})
            vs = f" (paper: {', '.join(self.reference.label(x) for x in refs)})" if refs else ""
            tables.append(
                Table(
                    f"accuracy_{slug(dataset)}",
                    f"All results on {dataset}{vs}",
                    self.accuracy_columns(),
                    rows,
                    self._accuracy_notes(paper=bool(refs)),
                )
            )
        return tables

    def _accuracy_notes(self, paper: bool = True) -> list[str]:
        notes = [
            "top-1: best validation top-1 during training (mean ± std over seeds); top-5 at "
            "that validation; time: optimisation time (forward + backward, no data loading "
            "or feature capture) to the best top-1. Several settings in one cell: the best "
            "is shown (note).",
        ]
        if paper:
            notes.append(
                "Paper times were measured on one A10G GPU (tables 2, 4; unit taken as "
                "minutes); compare time ratios between methods, not absolute times."
            )
        return notes

    def paper_tables(self) -> list[Table]:
        """Tables 1-4: the rows of a paper data set, filtered as the paper's table is."""
        runs = self.classification_runs()
        tables: list[Table] = []
        for name, view in self.reference.views.items():
            ref = view.get("dataset")
            members = [r for r in runs if self.ref_dataset(r) == ref]
            if not members:
                continue
            rows = []
            covered = set()
            for row in self.accuracy_rows(members):
                samples = self.reference.paper_samples(ref, row["_samples_key"])
                if self._in_view(view, row["cr"], samples, row["method"]):
                    rows.append(row)
                    covered.add((row["cr"], row["method"], samples))
            for entry in self.reference.rows(ref):
                key = (entry["cr"], entry["method"], entry["samples"])
                if self._in_view(view, key[0], key[2], key[1]) and not any(
                    same(c[0], key[0]) and c[1:] == key[1:] for c in covered
                ):
                    rows.append(_paper_only_row(entry, ref, self.reference))
            if not any(r["method"].startswith("dense") for r in rows):
                dense = self.reference.dense(ref)
                full = self.reference.full_samples(ref)
                if dense:
                    rows.append(
                        _paper_only_row(
                            {**dense, "method": "dense (teacher)", "cr": None, "samples": full},
                            ref,
                            self.reference,
                        )
                    )
            rows.sort(key=_row_order)
            tables.append(
                Table(
                    name,
                    f"{view.get('title', name)} — ours vs paper ({self.reference.label(ref)})",
                    self.accuracy_columns(),
                    rows,
                    [
                        *self._accuracy_notes(),
                        "Rows with data '(paper)' have no run of ours yet.",
                    ],
                )
            )
        return tables

    def _in_view(self, view: dict[str, Any], cr: float | None, samples: Any, method: str) -> bool:
        """Whether a row (CR, paper samples, method) belongs in a paper table view."""
        if method.startswith("dense"):
            return True
        crs = view.get("cr")
        if crs is not None and not any(same(cr, c) for c in crs):
            return False
        full = self.reference.full_samples(view.get("dataset"))
        return not (view.get("samples") == "full" and samples != full)


def _paper_only_row(entry: dict[str, Any], ref: str, reference: Reference) -> dict[str, Any]:
    samples = entry.get("samples")
    full = reference.full_samples(ref)
    return {
        "dataset": "(paper)",
        "model": reference.classification[ref].get("model"),
        "cr": entry.get("cr"),
        "method": entry["method"],
        "samples": "full" if samples == full else f"{samples:,}" if samples else None,
        "vs": reference.label(ref),
        "paper_top1": number(entry.get("top1")),
        "paper_top5": number(entry.get("top5")),
        "paper_time_min": number(entry.get("time_min")),
        "source": entry.get("source"),
        "_runs": [],
        "_ref": ref,
        "_samples_key": "full" if samples == full else samples,
    }


def _row_order(row: dict[str, Any]) -> tuple:
    dense = str(row["method"]).startswith("dense")
    key = row.get("_samples_key")
    return (
        not dense,
        row["cr"] is None,
        row["cr"] or 0.0,
        METHOD_ORDER.get(row["method"], 9),
        key != "full",
        -(key if isinstance(key, int) else 0),
        row["dataset"] == "(paper)",
        str(row["dataset"]),
        str(row.get("model")),
        str(row.get("samples")),
    )
