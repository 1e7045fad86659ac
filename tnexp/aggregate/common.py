"""Constants and small value helpers shared by the aggregator's modules."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCE = REPO_ROOT / "experiments" / "paper_reference.yaml"
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
    "trainer._target_",  # configs before the trainer group named its class have none
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
# The monitored metric of feature-matching runs (tnexp.tasks.FeatureMatchingTask).
FEATURES_MONITOR = "val/rel_err"
COLORS = {"pretrain": "k", "local": "C0", "global": "C1", "hybrid": "C2"}


class AggregateError(ValueError):
    """Bad input to the aggregation (no runs, unknown table, missing reference...)."""


def get_path(d: Any, dotted: str, default: Any = None) -> Any:
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return default if cur is None else cur


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(".seed") or key.startswith(IGNORED_PREFIXES)


def freeze(items: dict[str, Any]) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in items.items()))


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) < 1e-6


def mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def stdev(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) > 1 else None


def minutes(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 60.0


def slug(text: Any) -> str:
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


def is_accuracy(name: str) -> bool:
    return name.rsplit("/", 1)[-1].split("@")[0] in ("acc", "acc_norm")
