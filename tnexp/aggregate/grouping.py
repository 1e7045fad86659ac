"""Grouping runs: paper data set per run, the seeds of a setting, LM groups and sweeps."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tnexp.aggregate.common import (
    METHOD_ORDER,
    PHASES,
    RESULTS_FILE,
    AggregateError,
    get_path,
    mean,
)
from tnexp.aggregate.record import Incomplete, Run, UnreadableRecord, load_run_record
from tnexp.aggregate.reference import Reference


class RunSets:
    """The runs of an aggregation and how they group: cells, seeds, sweeps, teachers."""

    def __init__(
        self,
        runs: list[Run],
        incomplete: list[Incomplete],
        reference: Reference,
        compare_to: str | None = None,
    ) -> None:
        if compare_to is not None and not reference.has_dataset(compare_to):
            known = ", ".join(sorted(reference.classification)) or "none"
            raise AggregateError(
                f"--compare-to {compare_to!r} is not a paper data set; choose one of: {known}."
            )
        self.runs = runs
        self.incomplete = incomplete
        self.reference = reference
        self.compare_to = compare_to
        self._teacher_cache: dict[Path, Run | None] = {}
        self._sweep_runs: set[int] | None = None

    def ref_dataset(self, run: Run) -> str | None:
        """The paper data set whose figures sit beside this run (None: no counterpart)."""
        if run.kind != "classification":
            return None
        if run.compare_to:
            return run.compare_to if self.reference.has_dataset(run.compare_to) else None
        if self.reference.has_dataset(run.dataset):
            return run.dataset
        return self.compare_to

    def classification_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok and r.kind == "classification"]

    def lm_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok and r.kind == "lm"]

    def feature_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok and r.kind == "features"]

    def teacher_run(self, run: Run) -> Run | None:
        """The pretrain run behind ``config.teacher.path`` (its results.json), if any."""
        path = get_path(run.config, "teacher.path")
        if not path:
            return None
        p = Path(str(path))
        folder = p.parent if p.suffix == ".safetensors" else p
        folder = folder.resolve() if folder.exists() else folder
        if folder not in self._teacher_cache:
            for r in self.runs:
                if r.path == folder:
                    self._teacher_cache[folder] = r
                    break
            else:
                self._teacher_cache[folder] = _teacher_from(folder)
        return self._teacher_cache[folder]

    def outside_sweeps(self, runs: list[Run]) -> list[Run]:
        """The runs that are not a sweep's jobs, or all of them if every one is.

        A sweep's jobs belong in its sweep table; in a table cell they only stand in when
        no other run (e.g. the table's own configuration) fills it.
        """
        rest = [r for r in runs if not self.in_sweep(r)]
        return rest or runs

    def in_sweep(self, run: Run) -> bool:
        """Whether ``run`` is one of a sweep's jobs."""
        if self._sweep_runs is None:
            self._sweep_runs = {id(r) for g in self.sweep_groups() for r in g["runs"]}
        return id(run) in self._sweep_runs

    @staticmethod
    def choose(runs: list[Run]) -> tuple[list[Run], int]:
        """Seeds of one setting are averaged; of several settings, the best one is kept."""
        settings: dict[tuple, list[Run]] = defaultdict(list)
        for r in runs:
            settings[r.signature].append(r)
        mode = runs[0].mode
        sign = 1.0 if mode == "max" else -1.0

        def score(members: list[Run]) -> float:
            value = mean(r.best_value for r in members)
            return -math.inf if value is None else sign * value

        best = max(settings.values(), key=score)
        return best, len(settings)

    def lm_groups(self) -> dict[tuple[str, str], list[Run]]:
        groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
        for r in self.lm_runs():
            if r.family in ("local", "global", "hybrid"):
                groups[(r.dataset, r.model)].append(r)
        return dict(sorted(groups.items()))

    def sweep_groups(self) -> list[dict[str, Any]]:
        """Runs of one experiment/method differing only in batch size and/or lr."""
        groups: dict[tuple, list[Run]] = defaultdict(list)
        for r in self.runs:
            if r.ok and r.method in PHASES and r.kind in ("classification", "lm", "features"):
                # The jobs of one Hydra multirun are one sweep (the paper configs share
                # experiment_name across a table's rows and its sweeps); other runs group
                # by their settings alone.
                sweep = str(r.sweep_dir) if r.sweep_dir is not None else None
                groups[(r.experiment, r.method, r.sweep_signature, sweep)].append(r)
        out = []
        for (experiment, method, _, _), members in groups.items():
            params = [
                (phase, p)
                for phase in PHASES[method]
                for p in ("batch_size", "lr")
                if len({json.dumps(r.hyper()[phase][p]) for r in members}) > 1
            ]
            if params:
                out.append(
                    {"experiment": experiment, "method": method, "params": params, "runs": members}
                )
        return sorted(out, key=lambda g: (g["experiment"], METHOD_ORDER.get(g["method"], 9)))


def _teacher_from(folder: Path) -> Run | None:
    """The run of a teacher folder outside the inputs (None: no readable results.json)."""
    if not (folder / RESULTS_FILE).is_file():
        return None
    try:
        return Run(folder, load_run_record(folder / RESULTS_FILE), label=str(folder))
    except UnreadableRecord:
        return None
