"""Turn run directories into the paper's tables (Markdown + CSV) and figures (PNG).

Reads only the ``results.json`` each stage writes (``tnexp/run.py``), plus the paper's
published figures (``experiments/paper_reference.yaml``); no network, no W&B.

* Runs are found by walking the given paths for ``results.json`` (single runs, Hydra
  multirun sweep folders, whole ``outputs/`` trees, in any mix). A folder with ``.hydra``
  but no ``results.json`` anywhere below it is reported as *incomplete*.
* Classification runs are grouped by (data set, model, CR, method, training samples) into
  rows with our best top-1, top-5 at that point and optimisation time to best, beside the
  paper's figures for the paper data set the run is compared with (``config.compare_to``,
  else its own data set when the paper has it, else ``--compare-to``). Seeds of one
  setting are averaged; of several settings in one cell, the best is shown.
* Language-model runs give table 6 (token perplexity and lm-eval metrics, under lm-eval's
  names) and table 7 (optimisation time: local serial, local with N workers, global).
* Sweeps: runs of one experiment and method that differ only in the batch size and/or
  learning rate of the method's phase become one table (one row per value) and one plot,
  beside appendix B.2 / B.3.
* Every run, whatever its layout, appears in the ``runs`` table.

Command: ``uv run tnexp-aggregate <run dirs...> --out <dir>`` (see ``docs/aggregation.md``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from tnexp.plots import draw_recovery, hybrid_switch_epoch, share_y

__all__ = [
    "AggregateError",
    "Aggregation",
    "Column",
    "Incomplete",
    "Reference",
    "Run",
    "Table",
    "aggregate",
    "find_runs",
    "load_reference",
    "main",
]

RESULTS_FILE = "results.json"
DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent / "experiments" / "paper_reference.yaml"
# Folders a stage writes that never hold another run's results.json.
SKIP_DIRS = {".hydra", "wandb", "checkpoints", "csv", "student", "__pycache__", ".git"}
METHOD_ORDER = {"pretrain": 0, "local": 1, "global": 2, "hybrid": 3}
TRAINING_METHODS = ("pretrain", "local", "global", "hybrid", "assemble")
# Which optimiser phases (method.<phase>.batch_size / optimizer.lr) a method trains with.
PHASES = {
    "local": ("local",),
    "assemble": ("local",),
    "global": ("global",),
    "pretrain": ("global",),
    "hybrid": ("local", "global"),
}
# Config entries that do not change what a run computes (or differ by construction between
# the jobs of one sweep): left out when deciding whether two runs are the same setting.
# experiment_name stays in: a sweep's job is not another seed of a paper-table run.
IGNORED_KEYS = {"seed", "tags", "resume", "run_name", "teacher.path"}
IGNORED_PREFIXES = (
    "paths.",
    "logger.",
    "callbacks.",
    "hydra.",
    "method.cache.",
    "data.root",
    "data.download",
    "data.num_workers",
    "runtime.",  # torch threads: the same setting computed with other float summation orders
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "eval.lm_eval.include_path",
)
# The swept hyperparameters of appendix B (raw config keys; data.batch_size is the
# fallback when method.<phase>.batch_size is null).
SWEEP_KEYS = (
    "method.local.batch_size",
    "method.local.optimizer.lr",
    "method.global.batch_size",
    "method.global.optimizer.lr",
    "data.batch_size",
)
COLORS = {"pretrain": "k", "local": "C0", "global": "C1", "hybrid": "C2"}


class AggregateError(ValueError):
    """Bad input to the aggregation (no runs, unknown table, missing reference...)."""


# ============================================================================ helpers
def _get(d: Any, dotted: str, default: Any = None) -> Any:
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return default if cur is None else cur


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(".seed") or key.startswith(IGNORED_PREFIXES)


def _freeze(items: dict[str, Any]) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in items.items()))


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) < 1e-6


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _std(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) > 1 else None


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 60.0


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(text)).strip("_").replace(".", "p") or "x"


def makespan(times: Sequence[float], workers: int) -> float:
    """Ideal parallel time of independent jobs on ``workers`` equal workers.

    Longest-processing-time-first assignment (each job to the least loaded worker); with
    at least as many workers as jobs it is the longest job, with one worker the sum.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    loads = [0.0] * min(workers, max(len(times), 1))
    for t in sorted(times, reverse=True):
        i = loads.index(min(loads))
        loads[i] += t
    return max(loads) if loads else 0.0


# ============================================================================ reference
class Reference:
    """The paper's published figures (``experiments/paper_reference.yaml``)."""

    def __init__(self, data: dict[str, Any], source: Path | None = None) -> None:
        self.data = data
        self.source = source
        self.classification: dict[str, Any] = data.get("classification") or {}
        self.language_model: dict[str, Any] = data.get("language_model") or {}
        self.views: dict[str, Any] = data.get("tables") or {}

    def has_dataset(self, name: str | None) -> bool:
        return name is not None and name in self.classification

    def label(self, name: str) -> str:
        return str(self.classification.get(name, {}).get("label", name))

    def full_samples(self, name: str) -> int | None:
        return self.classification.get(name, {}).get("full_train_samples")

    def paper_samples(self, name: str | None, samples_key: Any) -> Any:
        """Our samples key ("full" or a count) as the paper's training-sample count."""
        if name is None:
            return None
        if samples_key == "full":
            return self.full_samples(name)
        return samples_key

    def row(self, name: str | None, cr: float | None, method: str, samples: Any) -> dict | None:
        if name is None:
            return None
        for entry in self.classification.get(name, {}).get("rows", []):
            if (
                _same(entry.get("cr"), cr)
                and entry.get("method") == method
                and entry.get("samples") == samples
            ):
                return entry
        return None

    def rows(self, name: str) -> list[dict[str, Any]]:
        return list(self.classification.get(name, {}).get("rows", []))

    def dense(self, name: str | None) -> dict[str, Any]:
        return dict(self.classification.get(name, {}).get("dense") or {}) if name else {}

    def hyperparameters(self, name: str | None, phase: str) -> dict[str, Any]:
        if name is None:
            return {}
        return dict(self.classification.get(name, {}).get("hyperparameters", {}).get(phase, {}))

    def sweep(self, name: str | None, phase: str, param: str) -> dict[float, float]:
        """Appendix B curve: {value: top-1} for a data set, phase and parameter."""
        if name is None:
            return {}
        raw = self.classification.get(name, {}).get("sweeps", {}).get(phase, {}).get(param, {})
        return {float(k): float(v) for k, v in (raw or {}).items()}

    def lm(self, key: str = "gpt2_xl") -> dict[str, Any]:
        return dict(self.language_model.get(key) or {})


def load_reference(path: str | Path | None = None) -> Reference:
    """Read the paper figures (default: ``experiments/paper_reference.yaml``)."""
    p = Path(path) if path is not None else DEFAULT_REFERENCE
    if not p.is_file():
        raise AggregateError(
            f"paper reference file {p} not found; pass --reference <paper_reference.yaml> "
            "(the repository's experiments/paper_reference.yaml)."
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise AggregateError(f"paper reference file {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise AggregateError(f"paper reference file {p} must hold a mapping at the top level.")
    return Reference(data, p)


# ============================================================================ runs
@dataclass
class Incomplete:
    """A run folder without (readable) results: still running, failed or killed."""

    path: Path
    reason: str
    label: str = ""


@dataclass
class Run:
    """One stage's ``results.json`` and what the tables need from it."""

    path: Path
    results: dict[str, Any]
    label: str = ""
    sweep_dir: Path | None = None

    # ------------------------------------------------------------------ identity
    @property
    def config(self) -> dict[str, Any]:
        cfg = self.results.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def method(self) -> str:
        return str(self.results.get("method") or "?")

    @property
    def family(self) -> str:
        """The method a table row counts it as (assembled slice jobs are local)."""
        return "local" if self.method == "assemble" else self.method

    @cached_property
    def problems(self) -> list[str]:
        """Missing parts of the results.json layout the tables rely on (empty: fine)."""
        need = ["method", "config", "metrics"]
        if self.method in TRAINING_METHODS:
            need.append("time")
        missing = [k for k in need if not isinstance(self.results.get(k), dict | str)]
        # (an assembled model may only carry final_eval metrics: no monitor value needed)
        trained = self.method in TRAINING_METHODS and self.method != "assemble"
        if not missing and trained and self.best_value is None:
            missing.append(f"metrics.best[{self.monitor}]")
        return missing

    @property
    def is_slice_job(self) -> bool:
        """A local run that trained only some slices (a per-slice job, or method.slices).

        Its full-model accuracy is not a result: the other slices are untrained. The
        ``assemble`` run over the jobs' outputs is what the tables show.
        """
        method = self.config.get("method")
        if self.method != "local" or not isinstance(method, dict):
            return False
        return method.get("slices") is not None or _get(method, "slice_jobs.dir") is not None

    @property
    def status(self) -> str:
        if self.results.get("skipped"):
            return "skipped (slice job already done)"
        if self.results.get("status") == "failed":  # written by tnexp.run on a failed fit
            error = self.results.get("error") or {}
            return f"failed ({error.get('type', 'error')}: {str(error.get('message'))[:80]})"
        if self.problems:
            return f"unknown layout (no {', '.join(self.problems)})"
        if self.is_slice_job:
            return "slice job (tabulated through its assemble run)"
        return "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def kind(self) -> str:
        """classification | lm | profile | analyze | unknown (the last three: no table row)."""
        if self.method in ("profile", "analyze"):
            return self.method
        task = _get(self.config, "data.info.task")
        monitor = _get(self.results, "task.monitor")
        if task == "causal_lm" or monitor == "val/ppl":
            return "lm"
        if task == "classification" or monitor == "val/top1":
            return "classification"
        if _get(self.config, "data.info.num_classes") is not None:
            return "classification"
        return "unknown"

    @property
    def experiment(self) -> str:
        return str(self.results.get("experiment") or self.config.get("experiment_name") or "")

    @property
    def dataset(self) -> str:
        return str(
            _get(self.results, "data.name") or _get(self.config, "data.info.name") or "unknown"
        )

    @property
    def model(self) -> str:
        m = self.config.get("model") or {}
        if not isinstance(m, dict):
            return "unknown"
        if m.get("name"):
            return str(m["name"])
        return str(m.get("_target_", "unknown")).rsplit(".", 1)[-1]

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def smoke(self) -> bool:
        return bool(self.config.get("smoke", False))

    @property
    def smoke_key(self) -> str | None:
        """Smoke runs shrink every row to the same tiny subset: keep rows apart by name."""
        return str(self.config.get("run_name") or self.label) if self.smoke else None

    @property
    def compare_to(self) -> str | None:
        value = self.config.get("compare_to")
        return str(value) if value else None

    # ------------------------------------------------------------------ setting
    @property
    def cr(self) -> float | None:
        """The CR the run asked for (overall CR if set, else the per-layer rule CR)."""
        if self.method in ("pretrain", "profile"):
            return None
        t = self.config.get("tensorize") or {}
        for value in (t.get("overall_cr"), t.get("cr")):
            if _num(value) is not None:
                return float(value)
        achieved = self.achieved_cr
        return None if achieved is None else round(achieved, 2)

    @property
    def achieved_cr(self) -> float | None:
        return _num(_get(self.results, "tensorize.totals.model_cr"))

    @property
    def full_data(self) -> bool:
        return _get(self.config, "data.train_subset") is None

    @property
    def train_samples(self) -> int | None:
        n = _get(self.results, "data.train_samples")
        if n is None:
            n = _get(self.config, "data.train_subset")
        return int(n) if _num(n) is not None else None

    @property
    def samples_key(self) -> Any:
        """ "full" or the number of training samples (data.train_subset)."""
        if self.full_data:
            return "full"
        return int(_get(self.config, "data.train_subset"))

    @property
    def samples_label(self) -> str:
        n = self.train_samples
        if self.full_data:
            return "full" if n is None else f"full ({n:,})"
        return f"{n:,}"

    def hyper(self) -> dict[str, dict[str, Any]]:
        """Effective batch size and learning rate per optimiser phase of the method."""
        out: dict[str, dict[str, Any]] = {}
        data_bs = _get(self.config, "data.batch_size")
        for phase in PHASES.get(self.method, ()):
            node = _get(self.config, f"method.{phase}") or {}
            out[phase] = {
                "batch_size": node.get("batch_size") or data_bs,
                "lr": _get(node, "optimizer.lr"),
            }
        return out

    @cached_property
    def signature(self) -> tuple:
        """The setting: resolved config minus seeds, paths and logging."""
        return _freeze({k: v for k, v in _flatten(self.config).items() if not _ignored(k)})

    @cached_property
    def sweep_signature(self) -> tuple:
        """The setting without the swept hyperparameters (batch sizes, learning rates)."""
        return _freeze(
            {
                k: v
                for k, v in _flatten(self.config).items()
                if not _ignored(k) and k not in SWEEP_KEYS
            }
        )

    # ------------------------------------------------------------------ metrics
    @property
    def monitor(self) -> str:
        default = "val/ppl" if self.kind == "lm" else "val/top1"
        return str(_get(self.results, "task.monitor") or default)

    @property
    def mode(self) -> str:
        default = "min" if self.kind == "lm" else "max"
        return str(_get(self.results, "task.mode") or default)

    @property
    def final(self) -> dict[str, Any]:
        final = _get(self.results, "metrics.final")
        return final if isinstance(final, dict) else {}

    @property
    def best_value(self) -> float | None:
        best = _get(self.results, "metrics.best")
        if isinstance(best, dict) and _num(best.get(self.monitor)) is not None:
            return float(best[self.monitor])
        if _num(_get(self.results, "time.best_value")) is not None:
            return float(_get(self.results, "time.best_value"))
        # assembled models are only evaluated once, at the end
        return _num(self.final.get(self.monitor))

    @property
    def final_value(self) -> float | None:
        return _num(self.final.get(self.monitor))

    @property
    def history(self) -> list[dict[str, Any]]:
        hist = _get(self.results, "time.history")
        return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []

    @property
    def before_value(self) -> float | None:
        """The monitored metric of the student as tensorized, before recovery (if measured)."""
        return _num(_get(self.results, f"metrics.before.{self.monitor}"))

    def _best_entry(self) -> dict[str, Any] | None:
        best = self.best_value
        step = _get(self.results, "time.step_at_best")
        candidates = [h for h in self.history if _same(_num(h.get("value")), best)]
        for h in candidates:
            if step is None or h.get("step") == step:
                return h
        return candidates[0] if candidates else None

    def metric_at_best(self, name: str) -> tuple[float | None, str]:
        """A validation metric at the best-monitor validation, and where it came from.

        Older results.json files have no per-validation metrics in ``time.history``; then
        the value after training is used and the source says ``final``.
        """
        entry = self._best_entry()
        if entry is not None and isinstance(entry.get("metrics"), dict):
            value = _num(entry["metrics"].get(name))
            if value is not None:
                return value, "best"
        value = _num(self.final.get(name))
        return value, ("final" if value is not None else "")

    # ------------------------------------------------------------------ times
    @property
    def slice_jobs(self) -> dict[str, Any]:
        jobs = _get(self.results, "time.slice_jobs")
        return jobs if isinstance(jobs, dict) else {}

    @property
    def slice_times(self) -> list[float]:
        """Per-slice optimisation seconds of assembled slice jobs (if recorded)."""
        per = self.slice_jobs.get("per_slice")
        items = per.values() if isinstance(per, dict) else per if isinstance(per, list) else []
        times = []
        jobs_seen = set()
        for item in items:
            # Slices trained in one job (slice_jobs.group > 1) share that job's time: once.
            job = item.get("job") if isinstance(item, dict) else None
            if job is not None:
                if job in jobs_seen:
                    continue
                jobs_seen.add(job)
            value = _num(item)
            if value is None and isinstance(item, dict):
                value = _num(item.get("optimization_s"))
                if value is None:
                    value = _num(_get(item, "time.optimization_s"))
            if value is not None:
                times.append(value)
        return times

    @property
    def optimization_s(self) -> float | None:
        """Total optimisation time; for assembled slice jobs, their serial sum."""
        if self.slice_jobs and _num(self.slice_jobs.get("sum_optimization_s")) is not None:
            return float(self.slice_jobs["sum_optimization_s"])
        if self.slice_times:
            return sum(self.slice_times)
        return _num(_get(self.results, "time.optimization_s"))

    @property
    def time_to_best_s(self) -> float | None:
        value = _num(_get(self.results, "time.time_to_best_s"))
        if value is None and self.slice_jobs:
            return self.optimization_s  # an assembled model is measured once, at the end
        return value

    @property
    def workers(self) -> int | None:
        for value in (
            self.slice_jobs.get("workers"),
            _get(self.results, "time.workers"),
            self.results.get("workers"),
            self.slice_jobs.get("jobs"),  # one worker per job: the ideal parallel case
            self.slice_jobs.get("count"),
        ):
            if _num(value) is not None and value >= 1:
                return int(value)
        return None

    def parallel_s(self, workers: int | None = None) -> float | None:
        """Ideal parallel optimisation time of the slice jobs with ``workers`` workers."""
        if not self.slice_jobs:
            return None
        workers = workers or self.workers
        times = self.slice_times
        if times and workers:
            return makespan(times, workers)
        return _num(self.slice_jobs.get("max_optimization_s"))

    # ------------------------------------------------------------------ LM metrics
    def lm_metrics(self, stage: str) -> dict[str, float]:
        """Numbers of ``metrics.<stage>`` (final_eval | teacher | before), lm-eval names.

        ``lm_eval/<task>/<metric>`` becomes ``<task>/<metric>`` (a trailing ``,none``
        filter is dropped); stderr entries are left out.
        """
        raw = _get(self.results, f"metrics.{stage}")
        out: dict[str, float] = {}
        if not isinstance(raw, dict):
            return out
        for key, value in raw.items():
            value = _num(value)
            if value is None or "stderr" in key or key in ("token_nll", "ppl_tokens"):
                continue
            name = key.removeprefix("lm_eval/")
            name = name[: -len(",none")] if name.endswith(",none") else name
            out[name] = value
        return out


def _read_results(path: Path) -> dict[str, Any] | str:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        return f"results.json unreadable ({err})"
    except json.JSONDecodeError as err:
        return f"results.json is not valid JSON ({err}); the run was probably interrupted"
    if not isinstance(data, dict):
        return "results.json does not hold a JSON object"
    return data


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
        data = _read_results(path)
        if isinstance(data, str):
            incomplete.append(Incomplete(path.parent, data))
        else:
            runs.append(Run(path.parent, data, sweep_dir=sweep))
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


# ============================================================================ tables
@dataclass
class Column:
    """A table column: ``key`` in the row dicts, Markdown header, number format.

    ``std`` names the key of a standard deviation shown as ``mean ± std``; ``optional``
    columns are dropped when no row has a value.
    """

    key: str
    header: str
    fmt: str = ""
    std: str | None = None
    optional: bool = False


@dataclass
class Table:
    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # what a figure of this table needs (sweeps: parameters, method, paper data set)
    meta: dict[str, Any] = field(default_factory=dict)

    def visible_columns(self) -> list[Column]:
        return [
            c
            for c in self.columns
            if not c.optional or any(r.get(c.key) not in (None, "") for r in self.rows)
        ]

    def to_markdown(self) -> str:
        cols = self.visible_columns()
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(c.header for c in cols) + " |")
        lines.append("|" + "|".join("---" if c.fmt == "s" else "---:" for c in cols) + "|")
        for row in self.rows:
            cells = []
            for c in cols:
                text = _format(row.get(c.key), c.fmt)
                if c.std and row.get(c.std) is not None and row.get(c.key) is not None:
                    text += f" ± {_format(row[c.std], c.fmt)}"
                cells.append(text.replace("|", "\\|"))
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> Path:
        cols = self.visible_columns()
        keys: list[str] = []
        for c in cols:
            keys.append(c.key)
            if c.std:
                keys.append(c.std)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            for row in self.rows:
                writer.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
        return path


def _format(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "–"
    if fmt == "t":  # minutes: 2 decimals, or 3 significant digits below one minute
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    if fmt == "m":  # LM metrics: perplexities run from ~10 to millions
        return f"{value:,.0f}" if abs(value) >= 10000 else f"{value:.2f}"
    if fmt not in ("", "s") and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return format(value, fmt)
        except ValueError:  # e.g. "d" given a float
            return format(value, "g")
    return str(value)


# ============================================================================ aggregation
class Aggregation:
    """Tables and figures of a set of runs (see :func:`aggregate`)."""

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

    # ------------------------------------------------------------------ run sets
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

    def teacher_run(self, run: Run) -> Run | None:
        """The pretrain run behind ``config.teacher.path`` (its results.json), if any."""
        path = _get(run.config, "teacher.path")
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
                data = (
                    _read_results(folder / RESULTS_FILE)
                    if (folder / RESULTS_FILE).is_file()
                    else None
                )
                self._teacher_cache[folder] = (
                    Run(folder, data, label=str(folder)) if isinstance(data, dict) else None
                )
        return self._teacher_cache[folder]

    def outside_sweeps(self, runs: list[Run]) -> list[Run]:
        """The runs that are not a sweep's jobs, or all of them if every one is.

        A sweep's jobs belong in its sweep table; in a table cell they only stand in when
        no other run (e.g. the table's own configuration) fills it.
        """
        if self._sweep_runs is None:
            self._sweep_runs = {id(r) for g in self.sweep_groups() for r in g["runs"]}
        rest = [r for r in runs if id(r) not in self._sweep_runs]
        return rest or runs

    @staticmethod
    def choose(runs: list[Run]) -> tuple[list[Run], int]:
        """Seeds of one setting are averaged; of several settings, the best one is kept."""
        settings: dict[tuple, list[Run]] = defaultdict(list)
        for r in runs:
            settings[r.signature].append(r)
        mode = runs[0].mode
        sign = 1.0 if mode == "max" else -1.0

        def score(members: list[Run]) -> float:
            value = _mean(r.best_value for r in members)
            return -math.inf if value is None else sign * value

        best = max(settings.values(), key=score)
        return best, len(settings)

    # ------------------------------------------------------------------ accuracy rows
    def _accuracy_row(self, members: list[Run], ref: str | None) -> dict[str, Any]:
        candidates = self.outside_sweeps(members)
        chosen, n_settings = self.choose(candidates)
        first = chosen[0]
        top5 = [r.metric_at_best("val/top5") for r in chosen]
        row: dict[str, Any] = {
            "dataset": first.dataset,
            "model": first.model,
            "cr": first.cr,
            "model_cr": _mean(r.achieved_cr for r in chosen),
            "method": first.family,
            "samples": first.samples_label
            + (f" (smoke: {first.smoke_key})" if first.smoke else ""),
            "n": len(chosen),
            "top1": _mean(r.best_value for r in chosen),
            "top1_std": _std(r.best_value for r in chosen),
            "top5": _mean(v for v, _ in top5),
            "time_min": _minutes(_mean(r.time_to_best_s for r in chosen)),
            "parallel_min": _minutes(_mean(r.parallel_s() for r in chosen)),
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
        elif any(id(r) in (self._sweep_runs or ()) for r in chosen):
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
        row["paper_top1"] = _num(paper.get("top1"))
        row["paper_top5"] = _num(paper.get("top5"))
        row["paper_time_min"] = _num(paper.get("time_min"))
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
                    f"accuracy_{_slug(dataset)}",
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
                    _same(c[0], key[0]) and c[1:] == key[1:] for c in covered
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
        if crs is not None and not any(_same(cr, c) for c in crs):
            return False
        full = self.reference.full_samples(view.get("dataset"))
        return not (view.get("samples") == "full" and samples != full)

    # ------------------------------------------------------------------ tables 6-7
    def lm_groups(self) -> dict[tuple[str, str], list[Run]]:
        groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
        for r in self.lm_runs():
            if r.family in ("local", "global", "hybrid"):
                groups[(r.dataset, r.model)].append(r)
        return dict(sorted(groups.items()))

    def _lm_choice(self, runs: list[Run]) -> dict[str, list[Run]]:
        """The runs shown per method column: the seeds of the best setting (by the
        validation monitor), averaged in the table.

        Assembled slice jobs and a one-process local run both count as local; the
        assembled one is preferred, as it is the paper's setting.
        """
        out: dict[str, list[Run]] = {}
        for family in ("local", "global", "hybrid"):
            members = self.outside_sweeps([r for r in runs if r.family == family])
            assembled = [r for r in members if r.method == "assemble"]
            if members:
                out[family], _ = self.choose(assembled or members)
        return out

    def lm_tables(self) -> list[Table]:
        tables: list[Table] = []
        groups = self.lm_groups()
        paper = self.reference.lm()
        paper_metrics: dict[str, Any] = paper.get("metrics") or {}
        for (dataset, model), runs in groups.items():
            suffix = "" if len(groups) == 1 else f"_{_slug(model)}_{_slug(dataset)}"
            chosen = self._lm_choice(runs)
            teacher = next((r.lm_metrics("teacher") for r in runs if r.lm_metrics("teacher")), {})
            before = next((r.lm_metrics("before") for r in runs if r.lm_metrics("before")), {})
            # Per method, every seed's metrics: the table shows mean ± std over them.
            seeds = {
                fam: [r.lm_metrics("final_eval") for r in members]
                for fam, members in chosen.items()
            }
            names = ["token_ppl", *paper_metrics]
            found = {k for m in [teacher, *(m for ms in seeds.values() for m in ms)] for k in m}
            extra = sorted(found - set(names))
            rows = []
            for name in names + extra:
                spec = paper_metrics.get(name, {})
                scale = 100.0 if _is_accuracy(name) else 1.0

                def pct(value: float | None, scale: float = scale) -> float | None:
                    return None if value is None else value * scale

                row = {
                    "benchmark": spec.get("label")
                    or ("token perplexity (validation, tnexp)" if name == "token_ppl" else name),
                    "metric": name,
                    "dense": pct(teacher.get(name)),
                    "paper_dense": spec.get("dense"),
                    "before": pct(before.get(name)),
                    "paper_local": spec.get("local"),
                    "paper_global": spec.get("global"),
                }
                for fam in ("local", "global", "hybrid"):
                    values = [pct(m.get(name)) for m in seeds.get(fam, [])]
                    row[fam] = _mean(values)
                    row[f"{fam}_std"] = _std(values)
                if any(row[k] is not None for k in ("dense", "before", "local", "global")) or spec:
                    rows.append(row)
            label = paper.get("label", "paper")
            cols = [
                Column("benchmark", "benchmark", "s"),
                Column("metric", "metric (lm-eval name)", "s"),
                Column("dense", "dense (ours)", "m"),
                Column("paper_dense", f"dense ({label})", "m"),
                Column("before", "tensorized, before recovery", "m", optional=True),
                Column("local", "local (ours)", "m", std="local_std"),
                Column("paper_local", f"local ({label})", "m"),
                Column("global", "global (ours)", "m", std="global_std"),
                Column("paper_global", f"global ({label})", "m"),
                Column("hybrid", "hybrid (ours)", "m", std="hybrid_std", optional=True),
            ]
            runs_used = ", ".join(
                f"{fam}: {', '.join(r.label for r in members)} (n={len(members)})"
                for fam, members in chosen.items()
            )
            tables.append(
                Table(
                    f"table6{suffix}",
                    f"Table 6 analog: {model} on {dataset} — ours vs {label}",
                    cols,
                    rows,
                    [
                        "token_ppl is tnexp's sliding-window token perplexity on the validation "
                        "split; lm-eval's wikitext/c4 figures are word perplexities and "
                        "lambada_openai/perplexity is the last-word token perplexity — "
                        "each under its own name. Accuracies in %.",
                        "ours: mean ± std over the seeds of one setting (n per method below; "
                        "no ± with one seed).",
                        f"Runs: {runs_used}.",
                    ],
                )
            )
            tables.append(self._time_table(suffix, model, dataset, runs, paper))
        return tables

    def _time_table(
        self, suffix: str, model: str, dataset: str, runs: list[Run], paper: dict[str, Any]
    ) -> Table:
        ptime = paper.get("time_min") or {}
        rows: list[dict[str, Any]] = []
        for family in ("local", "global", "hybrid"):
            members = [r for r in runs if r.family == family]
            for sub in (
                [r for r in members if r.method != "assemble"],
                [r for r in members if r.method == "assemble"],
            ):
                if not sub:
                    continue
                chosen, _ = self.choose(self.outside_sweeps(sub))
                r = chosen[0]
                assembled = r.method == "assemble"
                jobs = r.slice_jobs.get("jobs") or r.slice_jobs.get("count")
                slices = r.slice_jobs.get("count")
                what = f"{jobs or '?'} slice jobs" + (
                    f", {slices} slices" if slices and slices != jobs else ""
                )
                rows.append(
                    {
                        "method": family,
                        "setting": (
                            f"serial (sum of {what})"
                            if assembled
                            else "one process, all slices together"
                            if family == "local"
                            else "one process"
                        ),
                        "workers": 1,
                        "time_min": _minutes(r.optimization_s),
                        "paper_workers": 1 if family in ("local", "global") else None,
                        "paper_time_min": ptime.get(
                            "local_serial" if family == "local" else family
                        ),
                        "run": r.label,
                    }
                )
                if assembled:
                    rows.append(
                        {
                            "method": family,
                            "setting": "ideal parallel (slowest worker)",
                            "workers": r.workers,
                            "time_min": _minutes(r.parallel_s()),
                            "paper_workers": ptime.get("local_parallel_workers"),
                            "paper_time_min": ptime.get("local_parallel"),
                            "run": r.label,
                        }
                    )
        label = paper.get("label", "paper")
        return Table(
            f"table7{suffix}",
            f"Table 7 analog: optimisation time, {model} on {dataset} — ours vs {label}",
            [
                Column("method", "method", "s"),
                Column("setting", "setting", "s"),
                Column("workers", "workers", "d"),
                Column("time_min", "ours (min)", "t"),
                Column("paper_workers", "paper workers", "d"),
                Column("paper_time_min", f"{label} (min)", ".2f"),
                Column("run", "run", "s"),
            ],
            rows,
            [
                "Optimisation time = forward + backward of the training steps (no data "
                "loading, no teacher feature capture). Ideal parallel: the slice jobs' times "
                "packed onto the workers (longest first); the paper's 13.4 min is 48 MLP "
                "slices on 48 GPUs.",
            ],
        )

    # ------------------------------------------------------------------ sweeps
    def sweep_groups(self) -> list[dict[str, Any]]:
        """Runs of one experiment/method differing only in batch size and/or lr."""
        groups: dict[tuple, list[Run]] = defaultdict(list)
        for r in self.runs:
            if r.ok and r.method in PHASES and r.kind in ("classification", "lm"):
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

    def sweep_tables(self) -> list[Table]:
        tables: list[Table] = []
        names: set[str] = set()
        for group in self.sweep_groups():
            runs: list[Run] = group["runs"]
            first = runs[0]
            params: list[tuple[str, str]] = group["params"]
            ref = self.ref_dataset(first)
            name = "sweep_" + "_".join(
                [_slug(group["experiment"]), group["method"]]
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
                row["best"] = _mean(r.best_value for r in members)
                row["best_std"] = _std(r.best_value for r in members)
                if first.kind == "classification":
                    row["top5"] = _mean(r.metric_at_best("val/top5")[0] for r in members)
                row["time_min"] = _minutes(_mean(r.time_to_best_s for r in members))
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
            if all(_same(_num(v), _num(chosen.get(p))) for (_, p), v in others.items()):
                curve = self.reference.sweep(ref, phase, param)
                for x, y in curve.items():
                    if _num(value) is not None and _same(x, float(value)):
                        return y
        return None

    # ------------------------------------------------------------------ runs table
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
                    "lr": "/".join(f"{h['lr']:g}" if _num(h["lr"]) else "?" for h in hyper.values())
                    or None,
                    "seed": r.seed,
                    "monitor": r.monitor if r.method in TRAINING_METHODS else None,
                    "best": r.best_value if r.method in TRAINING_METHODS else None,
                    "final": r.final_value,
                    "opt_min": _minutes(r.optimization_s),
                    "best_min": _minutes(r.time_to_best_s),
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
            *self.sweep_tables(),
            *self.accuracy_tables(),
            self.runs_table(),
        ]


def _is_accuracy(name: str) -> bool:
    return name.rsplit("/", 1)[-1].split("@")[0] in ("acc", "acc_norm")


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
        "paper_top1": _num(entry.get("top1")),
        "paper_top5": _num(entry.get("top5")),
        "paper_time_min": _num(entry.get("time_min")),
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


# ============================================================================ figures
def _time_axis(seconds: Iterable[float | None]) -> tuple[float, str]:
    longest = max((s for s in seconds if s is not None), default=0.0)
    return (60.0, "min") if longest > 300 else (1.0, "s")


def _new_figure(n_panels: int, width: float = 5.2, height: float = 3.9):
    from matplotlib.figure import Figure

    ncols = min(n_panels, 2)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def figure_accuracy_vs_time(agg: Aggregation, path: Path) -> Path | None:
    """Paper figure 2: top-1 vs optimisation time per method, one panel per (data, CR)."""
    runs = agg.classification_runs()
    rows = [r for r in agg.accuracy_rows(runs) if r["_runs"]]
    dense = {(r["dataset"]): r for r in rows if str(r["method"]).startswith("dense")}
    rows = [r for r in rows if not str(r["method"]).startswith("dense")]
    panels = sorted({(r["dataset"], r["cr"]) for r in rows}, key=lambda k: (k[0], k[1] or 0))
    if not panels:
        return None
    all_runs = [run for r in rows for run in r["_runs"]]
    scale, unit = _time_axis(
        [h.get("optimization_s") for run in all_runs for h in run.history]
        + [run.optimization_s for run in all_runs]
    )
    fig, axes = _new_figure(len(panels))
    for ax, (dataset, cr) in zip(axes, panels, strict=True):
        ref = None
        markers: set[str] = set()  # legend entries of the before / switch markers, once
        for row in rows:
            if row["dataset"] != dataset or not _same(row["cr"], cr):
                continue
            ref = row["_ref"] or ref
            color = COLORS.get(row["method"])
            label = row["method"] + ("" if row["_samples_key"] == "full" else f" {row['samples']}")
            style = "-" if row["_samples_key"] == "full" else ":"
            for i, run in enumerate(row["_runs"]):
                history = [
                    h
                    for h in run.history
                    if _num(h.get("value")) is not None
                    and _num(h.get("optimization_s")) is not None
                ]
                if history:
                    draw_recovery(
                        ax,
                        history,
                        before=run.before_value,
                        switch_epoch=hybrid_switch_epoch(run.results),
                        scale=scale,
                        label=label if i == 0 else None,
                        labels_done=markers,
                        ls=style,
                        color=color,
                    )
                if run.slice_jobs and run.best_value is not None:
                    ax.scatter(
                        [run.optimization_s / scale],
                        [run.best_value],
                        marker="s",
                        color=color,
                        label=f"{label}, slice jobs serial" if i == 0 else None,
                    )
                    par = run.parallel_s()
                    if par is not None:
                        ax.scatter(
                            [par / scale],
                            [run.best_value],
                            marker="^",
                            color=color,
                            label=f"{label}, {run.workers} workers (ideal)" if i == 0 else None,
                        )
            if row["paper_top1"] is not None and row["_samples_key"] == "full":
                ax.axhline(
                    row["paper_top1"],
                    color=color,
                    ls="--",
                    lw=1,
                    alpha=0.6,
                    label=f"paper {row['method']} (best)",
                )
        d = dense.get(dataset)
        if d is not None and d["top1"] is not None:
            ax.axhline(d["top1"], color="k", ls=":", lw=1, label="dense teacher (ours)")
        paper_dense = agg.reference.dense(ref).get("top1")
        if paper_dense is not None:
            ax.axhline(paper_dense, color="grey", ls="--", lw=1, label="dense (paper)")
        vs = f" (paper: {agg.reference.label(ref)})" if ref and ref != dataset else ""
        ax.set_title(f"{dataset}, CR {cr:g}{vs}" if cr is not None else dataset)
        ax.set_xlabel(f"optimisation time ({unit})")
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    share_y(axes)  # methods and CRs compare at a glance
    return _save(fig, path)


def figure_lm_vs_time(agg: Aggregation, runs: list[Run], path: Path, title: str) -> Path | None:
    """Paper figure 3: LM metrics vs optimisation time; local serial curve, N-worker points."""
    paper = agg.reference.lm()
    paper_metrics = paper.get("metrics") or {}
    finals = {k for r in runs for k in r.lm_metrics("final_eval")}
    names = [n for n in ["token_ppl", *paper_metrics] if n in finals]
    names += sorted(finals - set(names))
    panels = ["val/ppl", *names[:5]]
    scale, unit = _time_axis([r.optimization_s for r in runs])
    teacher = next((r.lm_metrics("teacher") for r in runs if r.lm_metrics("teacher")), {})
    fig, axes = _new_figure(len(panels))
    for ax, name in zip(axes, panels, strict=True):
        mult = 100.0 if _is_accuracy(name) else 1.0
        for r in sorted(runs, key=lambda r: (r.family, r.label)):
            color = COLORS.get(r.family)
            label = r.family + (" (1 process)" if r.method != "assemble" else " (slice jobs)")
            if name == "val/ppl":
                pts = [
                    (h["optimization_s"] / scale, h["value"])
                    for h in r.history
                    if _num(h.get("value")) is not None
                ]
                if pts and r.method != "assemble":
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, "-o", ms=3, color=color, label=label)
                value = r.final_value if r.method == "assemble" else None
            else:
                value = r.lm_metrics("final_eval").get(name)
                if value is not None and r.method != "assemble" and r.optimization_s is not None:
                    ax.scatter([r.optimization_s / scale], [value * mult], color=color, label=label)
            if r.method == "assemble" and value is not None:
                times = r.slice_times
                top = r.workers or len(times) or 1
                # without per-slice times only the serial sum and the slowest job are known
                powers = [2**k for k in range(1, 12) if 2**k < top] if times else []
                levels = sorted({1, *powers, top})
                xs = [(r.optimization_s if n == 1 else r.parallel_s(n)) for n in levels]
                pts = [
                    (x / scale, value * mult, n)
                    for x, n in zip(xs, levels, strict=True)
                    if x is not None
                ]
                ax.scatter(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="^",
                    color=color,
                    label="local: N workers (ideal)",
                )
                for x, y, n in pts:
                    ax.annotate(
                        str(n), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points"
                    )
        if name in teacher:
            ax.axhline(teacher[name] * mult, color="k", ls=":", lw=1, label="dense (ours)")
        for fam in ("dense", "local", "global"):
            value = (paper_metrics.get(name) or {}).get(fam)
            if value is not None:
                ax.axhline(
                    value,
                    color=COLORS.get(fam, "grey"),
                    ls="--",
                    lw=1,
                    alpha=0.5,
                    label=f"{fam} ({paper.get('label', 'paper')})",
                )
        ax.set_title(name)
        ax.set_xlabel(f"optimisation time ({unit})")
        ax.grid(alpha=0.3)
        if "ppl" in name or "perplexity" in name:
            ax.set_yscale("log")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def figure_sweep(agg: Aggregation, table: Table, path: Path) -> Path | None:
    """Appendix B: accuracy vs batch size / learning rate, ours vs paper."""
    params: list[tuple[str, str]] = table.meta["params"]
    ref = table.meta["ref"]
    (phase, param), rest = params[0], params[1:]
    fig, axes = _new_figure(1, width=6.0)
    ax = axes[0]
    lines: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in table.rows:
        lines[tuple(row[f"{ph}.{p}"] for ph, p in rest)].append(row)
    for other, rows in sorted(lines.items(), key=lambda kv: str(kv[0])):
        pts = sorted(
            (float(r[f"{phase}.{param}"]), r["best"], r.get("best_std") or 0.0)
            for r in rows
            if _num(r[f"{phase}.{param}"]) is not None and r["best"] is not None
        )
        if not pts:
            continue
        xs, ys, es = zip(*pts, strict=True)
        suffix = ", ".join(f"{ph} {p}={v}" for (ph, p), v in zip(rest, other, strict=True))
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            marker="o",
            capsize=3,
            label=f"ours{' (' + suffix + ')' if suffix else ''}",
        )
    curve = agg.reference.sweep(ref, phase, param)
    if curve and table.meta["method"] in ("local", "global"):
        xs = sorted(curve)
        ax.plot(
            xs,
            [curve[x] for x in xs],
            "--s",
            color="grey",
            label=f"paper ({agg.reference.label(ref)}, CR 0.5)",
        )
    ax.set_xscale("log", base=2 if param == "batch_size" else 10)
    ticks = sorted(
        {
            *curve,
            *(
                float(r[f"{phase}.{param}"])
                for r in table.rows
                if _num(r[f"{phase}.{param}"]) is not None
            ),
        }
    )
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"{phase} {'batch size' if param == 'batch_size' else 'learning rate'}")
    ax.set_ylabel(f"best {table.meta['monitor']}")
    ax.set_title(table.title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ============================================================================ driver
TABLE_GROUPS = (
    "table1",
    "table2",
    "table3",
    "table4",
    "table6",
    "table7",
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
        tables: "all" or names among table1-4, table6, table7, sweeps, accuracy, runs.
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
        suffix = "" if len(groups) == 1 else f"_{_slug(model)}_{_slug(dataset)}"
        paths.append(
            figure_lm_vs_time(
                agg, runs, folder / f"fig3_lm_vs_time{suffix}.png", f"{model} on {dataset}"
            )
        )
    for t in tables:
        if t.name.startswith("sweep_"):
            paths.append(figure_sweep(agg, t, folder / f"{t.name}.png"))
    return [p for p in paths if p is not None]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tnexp-aggregate",
        description="Aggregate tnexp run folders (results.json) into the paper's tables "
        "(Markdown + CSV) and figures (PNG), beside the paper's published figures.",
    )
    p.add_argument("paths", nargs="+", help="run folders, multirun folders or trees of them")
    p.add_argument("--out", required=True, help="output folder (tables/, figures/)")
    p.add_argument(
        "--tables",
        default="all",
        help=f"'all' or a comma-separated list among: {', '.join(TABLE_GROUPS)}",
    )
    p.add_argument(
        "--compare-to",
        default=None,
        help="paper data set (cifar10, cifar100) for classification runs that set no "
        "compare_to and whose data set is not in the paper",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="paper figures YAML (default: experiments/paper_reference.yaml)",
    )
    p.add_argument("--no-figures", action="store_true", help="write tables only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tnexp-aggregate``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        result = aggregate(
            args.paths,
            args.out,
            tables=args.tables,
            compare_to=args.compare_to,
            reference=args.reference,
            figures=not args.no_figures,
        )
    except AggregateError as err:
        print(f"tnexp-aggregate: error: {err}", file=sys.stderr)
        return 2
    print(result.markdown)
    for i in result.incomplete:
        print(f"tnexp-aggregate: incomplete run {i.path}: {i.reason}", file=sys.stderr)
    if not any(not r.problems for r in result.runs):
        # Scripts and CI must see that there was nothing to aggregate.
        found = len(result.incomplete) + len(result.runs)
        print(
            f"tnexp-aggregate: error: none of the {found} run folder(s) under "
            f"{' '.join(args.paths)} finished (no complete results.json); fix or rerun them "
            "(resume=auto continues a run from its folder).",
            file=sys.stderr,
        )
        return 1
    print(f"tables: {Path(args.out) / 'tables'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
