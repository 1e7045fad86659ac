"""The one results.json schema every stage writes (versioned), its reader, and run names.

Every stage (pretrain/local/global/hybrid, the memory-bounded local run, slice-job
assemble, profiling, a skipped slice job, a failed run) describes its outcome with one
:class:`Results` and writes it with :meth:`Results.write` (atomically, through
:func:`tnexp.integrity.atomic_write_json`). :func:`read_results` reads any results.json,
including files written before the schema was versioned (``schema_version`` 1).

The field names are those of the results.json written before this module existed, so
readers that index the JSON directly (the aggregator, the quickstart table) keep working.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tnexp.errors import IntegrityError
from tnexp.integrity import atomic_write_json

log = logging.getLogger("tnexp")

__all__ = [
    "RESULTS_FILE",
    "SCHEMA_VERSION",
    "Results",
    "ResultsFileError",
    "plain_config",
    "read_results",
    "run_name",
    "write_failed_results",
]

RESULTS_FILE = "results.json"
# 1: the unversioned files of older tnexp versions; 2: this dataclass (adds run_name).
SCHEMA_VERSION = 2
# Fields written even when None (readers of older files relied on the key being there).
_ALWAYS = ("status", "method", "experiment", "config")
_KEEP_NONE = {"ok": ("tensorize", "epochs", "global_step"), "failed": ("phase", "epochs")}


class ResultsFileError(IntegrityError):
    """A results.json that cannot be read (truncated, not JSON, not an object)."""


@dataclass
class Results:
    """What one stage did: the superset of what any stage writes (unused fields stay None).

    ``metrics`` holds ``final`` / ``best`` (``val/...`` values) and, per stage, ``before``
    (the student as tensorized), ``final_eval`` / ``teacher`` (LM evaluations) or
    ``dense`` (profiling). ``time`` is :meth:`OptimizationTimer.summary` plus
    ``run_wall_s``. ``extra`` keeps keys of files this schema does not know (read only).
    """

    method: str
    experiment: str | None
    config: dict[str, Any] | None
    status: str = "ok"  # ok | failed | skipped
    run_name: str | None = None
    task: dict[str, Any] | None = None  # {"monitor": "val/top1", "mode": "max"}
    metrics: dict[str, Any] | None = None
    time: dict[str, Any] | None = None
    params: dict[str, Any] | None = None  # {"student": n, "teacher": n | None}
    tensorize: dict[str, Any] | None = None  # TensorizeReport.to_dict()
    weights: dict[str, Any] | None = None  # {"student"|"teacher": path, "best_checkpoint"}
    data: dict[str, Any] | None = None  # {"name", "train_samples"}
    epochs: int | None = None
    global_step: int | None = None
    runtime: dict[str, Any] | None = None  # tnexp.runtime.runtime_record()
    error: dict[str, Any] | None = None  # failed: {"type", "message"}
    phase: str | None = None  # failed: the phase that was running (local | global)
    memory_bounded: dict[str, Any] | None = None  # the block-by-block run's summary
    slice_jobs: dict[str, Any] | None = None  # assemble / skipped job: dir, slices, ...
    profile: list[dict[str, Any]] | None = None  # profiling: one entry per layer
    excluded: list[str] | None = None  # profiling: the layers to keep dense
    skipped: bool = False  # a slice job whose slices were all done already
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The JSON object: unset optional fields left out, ``extra`` keys kept."""
        keep = (*_ALWAYS, *_KEEP_NONE.get(self.status, ()))
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "skipped" and not value:
                continue
            if value is None and f.name not in keep:
                continue
            out[f.name] = value
        return {**self.extra, **out}

    def write(self, out_dir: str | Path) -> dict[str, Any]:
        """Write ``<out_dir>/results.json`` atomically; returns the written object."""
        data = self.to_dict()
        atomic_write_json(Path(out_dir) / RESULTS_FILE, data)
        return data

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        """A :class:`Results` from any results.json object, older layouts included.

        Older files have no ``schema_version`` (1) and, for some stages, no ``status``
        (``ok`` unless they say ``skipped``); unknown keys go to ``extra``.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known.setdefault("schema_version", 1)
        known.setdefault("status", "skipped" if data.get("skipped") else "ok")
        known.setdefault("method", str(data.get("method") or "?"))
        known.setdefault("experiment", None)
        known.setdefault("config", None)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


def read_results(path: str | Path) -> Results:
    """Read ``path`` (a results.json, or a run folder holding one), any schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsFileError(f"{path} is unreadable ({err}).") from None
    except json.JSONDecodeError as err:
        raise ResultsFileError(
            f"{path} is not valid JSON ({err}); the run was probably interrupted: rerun it."
        ) from None
    if not isinstance(data, dict):
        raise ResultsFileError(f"{path} does not hold a JSON object; it is not tnexp's.")
    return Results.from_dict(data)


def run_name(cfg: DictConfig, report: Any = None, *, method: str | None = None) -> str:
    """The name of a run: ``run_name`` if set, else ``<method>-cr<cr>`` (``pretrain`` alone).

    The CR is ``tensorize.cr`` as configured, or the report's achieved model CR.
    """
    if cfg.get("run_name"):
        return str(cfg.run_name)
    method = method or str(cfg.method.name)
    if method == "pretrain":
        return method
    cr = OmegaConf.select(cfg, "tensorize.cr", default=None)
    if cr is None and report is not None:
        cr = report.model_cr
    return f"{method}-cr{cr}" if cr is not None else method


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain values, as results.json stores it."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def write_failed_results(
    cfg: DictConfig,
    out: str | Path,
    err: BaseException,
    *,
    phase: str | None = None,
    epochs: int | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """results.json of a run that stopped with an error: ``status: failed``, no metrics.

    Aggregation and readers see a failed run, never a diverged model's numbers as a result.
    A failure to write it is logged, never raised: it must not mask the training error.
    """
    results = Results(
        status="failed",
        method=str(cfg.method.name),
        experiment=cfg.get("experiment_name"),
        run_name=run_name(cfg),
        error={"type": type(err).__name__, "message": str(err)},
        phase=phase,
        epochs=epochs,
        global_step=step,
        config=plain_config(cfg),
    )
    try:
        return results.write(out)
    except OSError as write_err:
        log.error("could not write %s: %s", Path(out) / RESULTS_FILE, write_err)
        return results.to_dict()
