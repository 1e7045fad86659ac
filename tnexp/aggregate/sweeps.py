"""Sweep tables: runs differing only in batch size and/or learning rate, beside appendix B."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tnexp.aggregate.common import mean, minutes, number, same, slug, stdev
from tnexp.aggregate.grouping import RunSets
from tnexp.aggregate.record import Run
from tnexp.aggregate.table import Column, Table


class SweepTables(RunSets):
    """One table per sweep group (one row per swept value)."""

    def sweep_tables(self) -> list[Table]:
        tables: list[Table] = []
        names: set[str] = set()
        for group in self.sweep_groups():
            runs: list[Run] = group["runs"]
            first = runs[0]
            params: list[tuple[str, str]] = group["params"]
            ref = self.ref_dataset(first)
            name = "sweep_" + "_".join(
                [slug(group["experiment"]), group["method"]]
                + [f"{ph}_{'bs' if p == 'batch_size' else p}" for ph, p in params]
            )
            base, i = name, 2
            while name in names:
                name, i = f"{base}_{i}", i + 1
            names.add(name)
            by_value: dict[tuple, list[Run]] = defaultdict(list)
            for r in runs:
                by_value[tuple(r.hyper()[ph][p] for ph, p in params)].append(r)
            rows = []
            for values in sorted(by_value, key=lambda v: tuple((x is None, x) for x in v)):
                members = by_value[values]
                row: dict[str, Any] = {
                    f"{ph}.{p}": v for (ph, p), v in zip(params, values, strict=True)
                }
                row["n"] = len(members)
                row["best"] = mean(r.best_value for r in members)
                row["best_std"] = stdev(r.best_value for r in members)
                if first.kind == "classification":
                    row["top5"] = mean(r.metric_at_best("val/top5")[0] for r in members)
                row["time_min"] = minutes(mean(r.time_to_best_s for r in members))
                row["paper"] = self._paper_sweep_value(ref, first.method, params, values)
                row["delta"] = (
                    None
                    if row["best"] is None or row["paper"] is None
                    else row["best"] - row["paper"]
                )
                row["_runs"] = members
                rows.append(row)
            cols = [
                Column(f"{ph}.{p}", f"{ph} {'batch size' if p == 'batch_size' else 'lr'}", "g")
                for ph, p in params
            ]
            cols += [
                Column("n", "runs", "d"),
                Column("best", f"best {first.monitor}", ".2f", std="best_std"),
                Column("top5", "top-5", ".2f", optional=True),
                Column("time_min", "time to best (min)", "t"),
                Column("paper", f"paper ({self.reference.label(ref)})" if ref else "paper", ".2f"),
                Column("delta", "Δ", "+.2f"),
            ]
            cr = f", CR {first.cr:g}" if first.cr is not None else ""
            source = {"local": "appendix B.2", "global": "appendix B.3"}.get(first.method)
            notes = [f"Runs: {', '.join(sorted(r.label for r in runs))}."]
            if ref and source:
                notes.insert(0, f"Paper: {source}, {self.reference.label(ref)}, CR 0.5.")
            tables.append(
                Table(
                    name,
                    f"Sweep: {group['experiment']} — {first.method} on {first.dataset}{cr}, "
                    f"{first.model}",
                    cols,
                    rows,
                    notes,
                    meta={
                        "params": params,
                        "ref": ref,
                        "method": first.method,
                        "monitor": first.monitor,
                    },
                )
            )
        return tables

    def _paper_sweep_value(
        self, ref: str | None, method: str, params: list[tuple[str, str]], values: tuple
    ) -> float | None:
        if ref is None or method not in ("local", "global"):
            return None
        chosen = self.reference.hyperparameters(ref, method)
        setting = dict(zip(params, values, strict=True))
        # A one-parameter sweep reads that curve; in a grid, a row is on the paper's
        # batch-size curve when its lr is the paper's choice, and vice versa.
        for (phase, param), value in setting.items():
            others = {k: v for k, v in setting.items() if k != (phase, param)}
            if all(same(number(v), number(chosen.get(p))) for (_, p), v in others.items()):
                curve = self.reference.sweep(ref, phase, param)
                for x, y in curve.items():
                    if number(value) is not None and same(x, float(value)):
                        return y
        return None
