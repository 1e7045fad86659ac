"""Mean +- std over seeds of the error-propagation analyses (``method=analyze`` with
``method.propagation.enabled=true``), one group of run folders per label.

    uv run python experiments/propagation_seeds.py \
        local=/work/fmnist_runs/analysis/local-cr0.5-seed{0,1,2} \
        global=/work/fmnist_runs/analysis/global-cr0.5-seed{0,1,2}

Prints a Markdown table per group (per slice: error with teacher / student input,
amplification; then the progressive-replacement metric per step) and a summary line.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _fmt(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(label: str, folders: list[Path]) -> str:
    runs = [json.loads((f / "propagation.json").read_text()) for f in folders]
    per_slice: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for run in runs:
        for row in run["slices"]:
            if row["slice"] not in order:
                order.append(row["slice"])
            for key in ("teacher_input_error", "student_input_error", "amplification"):
                per_slice[row["slice"]][key].append(float(row[key]))
    lines = [
        f"**{label}** (n = {len(runs)})",
        "",
        "| slice | error, teacher input | error, student input | amplification |",
        "|---|---:|---:|---:|",
    ]
    for name in order:
        cells = per_slice[name]
        lines.append(
            f"| {name} | {_fmt(cells['teacher_input_error'])} | "
            f"{_fmt(cells['student_input_error'])} | {_fmt(cells['amplification'], 2)} |"
        )
    steps: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for step in run["replacement"]:
            steps[int(step["replaced"])].append(float(step["metric"]))
    ablation = ", ".join(_fmt(steps[k], 2) for k in sorted(steps))
    summary = {
        key: _fmt([float(run["summary"][key]) for run in runs])
        for key in (
            "teacher_input_error_mean",
            "student_input_error_mean",
            "amplification_mean",
            "last_slice_amplification",
        )
    }
    lines += [
        "",
        f"Progressive replacement ({runs[0]['metric']}, 0..{max(steps)} slices): {ablation}",
        "",
        "Summary: " + "; ".join(f"{k} {v}" for k, v in summary.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    groups: dict[str, list[Path]] = defaultdict(list)
    for arg in argv:
        label, sep, folder = arg.partition("=")
        if not sep:
            sys.exit(f"arguments are label=folder, got {arg!r}")
        path = Path(folder)
        if not (path / "propagation.json").is_file():
            sys.exit(f"{path}/propagation.json not found: run method=analyze with propagation")
        groups[label].append(path)
    print("\n\n".join(summarize(label, folders) for label, folders in groups.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
