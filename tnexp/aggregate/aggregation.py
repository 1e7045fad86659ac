"""All tables of a set of runs: classification, LM, feature-matching and sweep tables, runs."""

from __future__ import annotations

from typing import Any

from tnexp.aggregate.accuracy import AccuracyTables
from tnexp.aggregate.common import TRAINING_METHODS, minutes, number
from tnexp.aggregate.features import FeatureTables
from tnexp.aggregate.lm import LmTables
from tnexp.aggregate.sweeps import SweepTables
from tnexp.aggregate.table import Column, Table


class Aggregation(AccuracyTables, LmTables, FeatureTables, SweepTables):
    """Tables and figures of a set of runs (see :func:`tnexp.aggregate.aggregate`)."""

    def runs_table(self) -> Table:
        rows: list[dict[str, Any]] = []
        for r in sorted(self.runs, key=lambda r: r.label):
            hyper = r.hyper()
            rows.append(
                {
                    "run": r.label,
                    "status": r.status,
                    "experiment": r.experiment,
                    "method": r.method,
                    "dataset": r.dataset,
                    "model": r.model,
                    "cr": r.cr,
                    "model_cr": r.achieved_cr,
                    "samples": r.samples_label if r.kind == "classification" else None,
                    "bs": "/".join(str(h["batch_size"]) for h in hyper.values()) or None,
                    "lr": "/".join(
                        f"{h['lr']:g}" if number(h["lr"]) else "?" for h in hyper.values()
                    )
                    or None,
                    "seed": r.seed,
                    "monitor": r.monitor if r.method in TRAINING_METHODS else None,
                    "best": r.best_value if r.method in TRAINING_METHODS else None,
                    "final": r.final_value,
                    "opt_min": minutes(r.optimization_s),
                    "best_min": minutes(r.time_to_best_s),
                    "smoke": "yes" if r.smoke else "",
                }
            )
        for i in sorted(self.incomplete, key=lambda i: i.label):
            rows.append({"run": i.label, "status": f"incomplete: {i.reason}"})
        return Table(
            "runs",
            "All runs",
            [
                Column("run", "run", "s"),
                Column("status", "status", "s"),
                Column("experiment", "experiment", "s"),
                Column("method", "method", "s"),
                Column("dataset", "data", "s"),
                Column("model", "model", "s"),
                Column("cr", "CR", ".2f"),
                Column("model_cr", "model CR", ".3f"),
                Column("samples", "samples", "s", optional=True),
                Column("bs", "batch size", "s"),
                Column("lr", "lr", "s"),
                Column("seed", "seed", "s"),
                Column("monitor", "monitor", "s"),
                Column("best", "best", "m"),
                Column("final", "final", "m"),
                Column("opt_min", "opt. time (min)", "t"),
                Column("best_min", "time to best (min)", "t"),
                Column("smoke", "smoke", "s", optional=True),
            ],
            rows,
            [f"{len(self.incomplete)} incomplete run folder(s)."] if self.incomplete else [],
        )

    # ------------------------------------------------------------------ everything
    def tables(self) -> list[Table]:
        return [
            *self.paper_tables(),
            *self.lm_tables(),
            *self.feature_tables(),
            *self.sweep_tables(),
            *self.accuracy_tables(),
            self.runs_table(),
        ]
