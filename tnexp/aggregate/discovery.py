"""Finding the runs (and the incomplete run folders) under the given paths."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tnexp.aggregate.common import RESULTS_FILE, SKIP_DIRS, AggregateError
from tnexp.aggregate.record import Incomplete, Run, UnreadableRecord, load_run_record


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[Incomplete]]:
    """Every ``results.json`` under ``paths`` (files or folders, walked recursively).

    Folders with a ``.hydra`` subfolder but no ``results.json`` anywhere below them are
    returned as :class:`Incomplete`, as are unreadable results files.
    """
    if not paths:
        raise AggregateError("no run directories given; pass one or more folders of runs.")
    found: dict[Path, Path | None] = {}  # results.json -> multirun sweep dir
    incomplete: list[Incomplete] = []
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise AggregateError(f"{root} does not exist; pass existing run directories.")
        if root.is_file():
            if root.name != RESULTS_FILE:
                raise AggregateError(f"{root} is a file but not a {RESULTS_FILE}.")
            found.setdefault(root.resolve(), None)
            continue
        # One pruned top-down walk; then children before parents (reversed), so a folder
        # knows whether any run below it wrote results.
        walked = []
        for dirpath, dirnames, filenames in os.walk(root, topdown=True):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            walked.append(
                (dirpath, list(dirnames), set(filenames), Path(dirpath, ".hydra").is_dir())
            )
        sweep_dirs = {d for d, _, files, _ in walked if "multirun.yaml" in files}
        has_results: dict[str, bool] = {}
        for dirpath, dirnames, filenames, hydra in reversed(walked):
            here = RESULTS_FILE in filenames
            below = any(has_results.get(os.path.join(dirpath, d), False) for d in dirnames)
            has_results[dirpath] = here or below
            if here:
                parent = os.path.dirname(dirpath)
                sweep = Path(parent).resolve() if parent in sweep_dirs else None
                found.setdefault((Path(dirpath) / RESULTS_FILE).resolve(), sweep)
            elif not below and hydra:
                log = sorted(Path(dirpath).glob("*.log"))
                hint = f"; see {log[0]}" if log else ""
                incomplete.append(
                    Incomplete(
                        Path(dirpath).resolve(),
                        f"no results.json (still running, failed or killed){hint}",
                    )
                )
    runs: list[Run] = []
    for path, sweep in sorted(found.items()):
        try:
            runs.append(Run(path.parent, load_run_record(path), sweep_dir=sweep))
        except UnreadableRecord as err:
            incomplete.append(Incomplete(path.parent, str(err)))
    if not runs and not incomplete:
        raise AggregateError(
            f"no {RESULTS_FILE} found under {', '.join(str(p) for p in paths)}; pass the "
            "output folders of tnexp runs (a run folder, a multirun sweep folder, or a tree "
            "such as outputs/ or multirun/ that contains them)."
        )
    _label(runs, incomplete)
    return runs, incomplete


def _label(runs: list[Run], incomplete: list[Incomplete]) -> None:
    dirs = [r.path for r in runs] + [i.path for i in incomplete]
    common = Path(os.path.commonpath([str(d) for d in dirs])) if dirs else Path()
    # relative to the parent of what the runs share: "sweep/0", not a bare "0"
    base = common.parent
    for item in [*runs, *incomplete]:
        rel = os.path.relpath(item.path, base)
        item.label = item.path.name if rel == "." else rel
