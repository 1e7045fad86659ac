"""One run's record: reading its results.json, and what the tables need from it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tnexp.aggregate.common import (
    FEATURES_MONITOR,
    PHASES,
    SWEEP_KEYS,
    TRAINING_METHODS,
    flatten,
    freeze,
    get_path,
    is_ignored,
    makespan,
    number,
    same,
)
from tnexp.results import ResultsFileError, read_results


class UnreadableRecord(Exception):
    """A results.json that cannot be read as a run record; the message says why."""


def load_run_record(path: Path) -> dict[str, Any]:
    """The record a stage wrote to ``path`` (results.json, read through tnexp.results).

    Raises :class:`UnreadableRecord` (the reason, for the incomplete-runs list) when the
    file cannot be read, is not JSON or holds no JSON object.
    """
    try:
        return read_results(path).to_dict()  # the versioned schema, older files included
    except ResultsFileError as err:
        # The folder is listed as incomplete with the reason, not raised.
        raise UnreadableRecord(str(err).replace(f"{path} ", "results.json ", 1)) from None


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
        return method.get("slices") is not None or get_path(method, "slice_jobs.dir") is not None

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
        """classification | lm | features | profile | analyze | unknown (the last three: no
        table row).

        ``features``: a feature-matching run (``task=features``), whatever its data set's own
        task (text data is causal LM, images classification): the student was measured
        against the teacher's outputs, not on the data set's labels.
        """
        if self.method in ("profile", "analyze"):
            return self.method
        monitor = get_path(self.results, "task.monitor")
        if get_path(self.config, "task.name") == "features" or monitor == FEATURES_MONITOR:
            return "features"
        task = get_path(self.config, "data.info.task")
        if task == "causal_lm" or monitor == "val/ppl":
            return "lm"
        if task == "classification" or monitor == "val/top1":
            return "classification"
        if get_path(self.config, "data.info.num_classes") is not None:
            return "classification"
        return "unknown"

    @property
    def feature_output(self) -> str:
        """What a feature-matching run compared (``task.output``: pooled, last_hidden_state...)."""
        return str(get_path(self.config, "task.output") or "last_hidden_state")

    @property
    def experiment(self) -> str:
        return str(self.results.get("experiment") or self.config.get("experiment_name") or "")

    @property
    def dataset(self) -> str:
        return str(
            get_path(self.results, "data.name")
            or get_path(self.config, "data.info.name")
            or "unknown"
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
            if number(value) is not None:
                return float(value)
        achieved = self.achieved_cr
        return None if achieved is None else round(achieved, 2)

    @property
    def achieved_cr(self) -> float | None:
        return number(get_path(self.results, "tensorize.totals.model_cr"))

    @property
    def full_data(self) -> bool:
        return get_path(self.config, "data.train_subset") is None

    @property
    def train_samples(self) -> int | None:
        n = get_path(self.results, "data.train_samples")
        if n is None:
            n = get_path(self.config, "data.train_subset")
        return int(n) if number(n) is not None else None

    @property
    def samples_key(self) -> Any:
        """ "full" or the number of training samples (data.train_subset)."""
        if self.full_data:
            return "full"
        return int(get_path(self.config, "data.train_subset"))

    @property
    def samples_label(self) -> str:
        n = self.train_samples
        if self.full_data:
            return "full" if n is None else f"full ({n:,})"
        return f"{n:,}"

    def hyper(self) -> dict[str, dict[str, Any]]:
        """Effective batch size and learning rate per optimiser phase of the method."""
        out: dict[str, dict[str, Any]] = {}
        data_bs = get_path(self.config, "data.batch_size")
        for phase in PHASES.get(self.method, ()):
            node = get_path(self.config, f"method.{phase}") or {}
            out[phase] = {
                "batch_size": node.get("batch_size") or data_bs,
                "lr": get_path(node, "optimizer.lr"),
            }
        return out

    @cached_property
    def signature(self) -> tuple:
        """The setting: resolved config minus seeds, paths and logging."""
        return freeze({k: v for k, v in flatten(self.config).items() if not is_ignored(k)})

    @cached_property
    def sweep_signature(self) -> tuple:
        """The setting without the swept hyperparameters (batch sizes, learning rates)."""
        return freeze(
            {
                k: v
                for k, v in flatten(self.config).items()
                if not is_ignored(k) and k not in SWEEP_KEYS
            }
        )

    # ------------------------------------------------------------------ metrics
    @property
    def monitor(self) -> str:
        default = {"lm": "val/ppl", "features": FEATURES_MONITOR}.get(self.kind, "val/top1")
        return str(get_path(self.results, "task.monitor") or default)

    @property
    def mode(self) -> str:
        default = "min" if self.kind in ("lm", "features") else "max"
        return str(get_path(self.results, "task.mode") or default)

    @property
    def final(self) -> dict[str, Any]:
        final = get_path(self.results, "metrics.final")
        return final if isinstance(final, dict) else {}

    @property
    def best_value(self) -> float | None:
        best = get_path(self.results, "metrics.best")
        if isinstance(best, dict) and number(best.get(self.monitor)) is not None:
            return float(best[self.monitor])
        if number(get_path(self.results, "time.best_value")) is not None:
            return float(get_path(self.results, "time.best_value"))
        # assembled models are only evaluated once, at the end
        return number(self.final.get(self.monitor))

    @property
    def final_value(self) -> float | None:
        return number(self.final.get(self.monitor))

    @property
    def history(self) -> list[dict[str, Any]]:
        hist = get_path(self.results, "time.history")
        return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []

    @property
    def before_value(self) -> float | None:
        """The monitored metric of the student as tensorized, before recovery (if measured)."""
        return number(get_path(self.results, f"metrics.before.{self.monitor}"))

    def _best_entry(self) -> dict[str, Any] | None:
        best = self.best_value
        step = get_path(self.results, "time.step_at_best")
        candidates = [h for h in self.history if same(number(h.get("value")), best)]
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
            value = number(entry["metrics"].get(name))
            if value is not None:
                return value, "best"
        value = number(self.final.get(name))
        return value, ("final" if value is not None else "")

    # ------------------------------------------------------------------ times
    @property
    def slice_jobs(self) -> dict[str, Any]:
        jobs = get_path(self.results, "time.slice_jobs")
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
            value = number(item)
            if value is None and isinstance(item, dict):
                value = number(item.get("optimization_s"))
                if value is None:
                    value = number(get_path(item, "time.optimization_s"))
            if value is not None:
                times.append(value)
        return times

    @property
    def optimization_s(self) -> float | None:
        """Total optimisation time; for assembled slice jobs, their serial sum."""
        if self.slice_jobs and number(self.slice_jobs.get("sum_optimization_s")) is not None:
            return float(self.slice_jobs["sum_optimization_s"])
        if self.slice_times:
            return sum(self.slice_times)
        return number(get_path(self.results, "time.optimization_s"))

    @property
    def time_to_best_s(self) -> float | None:
        value = number(get_path(self.results, "time.time_to_best_s"))
        if value is None and self.slice_jobs:
            return self.optimization_s  # an assembled model is measured once, at the end
        return value

    @property
    def workers(self) -> int | None:
        for value in (
            self.slice_jobs.get("workers"),
            get_path(self.results, "time.workers"),
            self.results.get("workers"),
            self.slice_jobs.get("jobs"),  # one worker per job: the ideal parallel case
            self.slice_jobs.get("count"),
        ):
            if number(value) is not None and value >= 1:
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
        return number(self.slice_jobs.get("max_optimization_s"))

    # ------------------------------------------------------------------ LM metrics
    def lm_metrics(self, stage: str) -> dict[str, float]:
        """Numbers of ``metrics.<stage>`` (final_eval | teacher | before), lm-eval names.

        ``lm_eval/<task>/<metric>`` becomes ``<task>/<metric>`` (a trailing ``,none``
        filter is dropped); stderr entries are left out.
        """
        raw = get_path(self.results, f"metrics.{stage}")
        out: dict[str, float] = {}
        if not isinstance(raw, dict):
            return out
        for key, value in raw.items():
            value = number(value)
            if value is None or "stderr" in key or key in ("token_nll", "ppl_tokens"):
                continue
            name = key.removeprefix("lm_eval/")
            name = name[: -len(",none")] if name.endswith(",none") else name
            out[name] = value
        return out
