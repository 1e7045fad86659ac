"""The ``method=quickstart`` stage: the demo behind a bare `uv run tnexp`.

Pretrains a small ResNet teacher on scikit-learn's digits, tensorizes it with Tucker-2
at each CR of ``method.crs``, recovers it with each of ``method.methods`` (local, global,
hybrid) and prints a comparison table; saves a plot of top-1 vs optimisation time. Every
stage is an ordinary `tnexp` stage (same code, same results.json) composed from the same
config tree, so the demo also shows how to run them one by one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.table import Table

from tnexp.console import console
from tnexp.integrity import atomic_write_bytes, atomic_write_json
from tnexp.plots import draw_recovery, hybrid_switch_epoch, share_y
from tnexp.restore import save_config
from tnexp.stages.build import TEACHER_FILE
from tnexp.stages.train import run_stage

log = logging.getLogger("tnexp")


def _user_overrides() -> list[str]:
    """Command-line overrides that also apply to every stage (trainer, logger, data...)."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under @hydra.main
        return []
    skip = ("method", "experiment", "hydra", "paths.output_dir", "tensorize.cr", "teacher.")
    return [o for o in overrides if not o.lstrip("+~").startswith(skip)]


def _stage(q: DictConfig, method: str, overrides: list[str]) -> DictConfig:
    # Order matters: demo defaults, then the user's command line, then what this stage is.
    defaults = [*q.stage_overrides, *q.method_overrides.get(method, [])]
    every = [f"method={method}", *defaults, *_user_overrides(), *overrides]
    cfg = compose(config_name="train", overrides=every)
    # Saved like a Hydra run's config: `tnexp hydra.run.dir=<stage> resume=auto` works.
    save_config(cfg, Path(cfg.paths.output_dir), every)
    return cfg


def run_quickstart(cfg: DictConfig) -> list[dict[str, Any]]:
    """Pretrain, then tensorize and recover at every CR with every method; print, plot."""
    q = cfg.method
    out = Path(cfg.paths.output_dir)
    total = 1 + len(q.crs) * len(q.methods)
    # One W&B group per quickstart run; each stage tagged with its method and CR.
    group = f"quickstart-{out.name}"
    tags = [str(t) for t in cfg.tags or []]

    def wandb(*extra: str) -> list[str]:
        listed = ",".join(f"'{t}'" for t in [*tags, "quickstart", *extra])
        return [f"logger.wandb.group={group}", f"logger.wandb.tags=[{listed}]"]

    log.info("stage 1/%d: pretraining the teacher (%d epochs)", total, q.teacher_epochs)
    teacher_dir = out / "teacher"
    teacher = run_stage(
        _stage(
            q,
            "pretrain",
            [
                f"trainer.max_epochs={q.teacher_epochs}",
                f"paths.output_dir={teacher_dir}",
                f"experiment_name={cfg.experiment_name}",
                *wandb("teacher"),
            ],
        )
    )
    runs: list[dict[str, Any]] = []
    for cr in q.crs:
        for method in q.methods:
            stage = len(runs) + 2
            log.info("stage %d/%d: %s CR %s (%d epochs)", stage, total, method, cr, q.epochs)
            overrides = [
                f"tensorize.cr={cr}",
                f"teacher.path={teacher_dir / TEACHER_FILE}",
                f"trainer.max_epochs={q.epochs}",
                f"paths.output_dir={out / f'cr{cr}' / method}",
                f"experiment_name={cfg.experiment_name}",
                *wandb(f"cr{cr}"),
            ]
            if method == "hybrid":
                overrides.append(f"method.local_epochs={q.hybrid_local_epochs}")
            runs.append(run_stage(_stage(q, method, overrides)))
    rows = summary_rows(teacher, runs)
    atomic_write_json(out / "summary.json", rows)
    atomic_write_bytes(out / "summary.md", markdown_table(rows).encode())
    plot_path = plot_accuracy_vs_time(runs, out / "accuracy_vs_time.png", teacher=teacher)
    print_table(rows)
    print(f"\nplot: {plot_path}\nresults: {out}")
    offline = sorted(out.glob("**/wandb/offline-run-*"))
    if offline:
        # Paths relative to the working directory when possible: copy-pasteable commands.
        shown = _shown(out)
        print(
            f"W&B: {len(offline)} offline runs (group {group}); upload them with\n"
            f"  uv run wandb sync {shown}/teacher/wandb/offline-run-* "
            f"{shown}/cr*/*/wandb/offline-run-*"
        )
    return runs


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary_rows(teacher: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    monitor = teacher["task"]["monitor"]
    rows = [
        {
            "method": "dense teacher",
            "cr_target": None,
            "cr": 0.0,
            "params": teacher["params"]["student"],
            "top1_best": teacher["metrics"]["best"][monitor],
            "top1_final": teacher["metrics"]["final"].get(monitor),
            "optimization_s": teacher["time"]["optimization_s"],
            "time_to_best_s": teacher["time"]["time_to_best_s"],
            "threads": teacher["runtime"]["threads"],  # the thread policy's choice
        }
    ]
    for r in runs:
        rows.append(
            {
                "method": r["method"],
                "cr_target": r["config"]["tensorize"].get("cr"),
                "cr": r["tensorize"]["totals"]["model_cr"],
                "params": r["params"]["student"],
                "top1_best": r["metrics"]["best"][monitor],
                "top1_final": r["metrics"]["final"].get(monitor),
                "optimization_s": r["time"]["optimization_s"],
                "time_to_best_s": r["time"]["time_to_best_s"],
                "threads": r["runtime"]["threads"],
            }
        )
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


COLUMNS = [
    ("method", "method", "s"),
    ("CR target", "cr_target", ".2f"),
    ("model CR", "cr", ".3f"),
    ("params", "params", ","),
    ("top-1 best", "top1_best", ".2f"),
    ("top-1 final", "top1_final", ".2f"),
    ("opt. time (s)", "optimization_s", ".1f"),
    ("time to best (s)", "time_to_best_s", ".1f"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k], f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="tnexp quickstart: ResNet on digits, Tucker-2")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "method" else "right")
    for row in rows:
        table.add_row(*(_fmt(row[k], f) for _, k, f in COLUMNS))
    console().print(table)


def plot_accuracy_vs_time(
    runs: list[dict[str, Any]], path: Path, teacher: dict[str, Any] | None = None
) -> Path:
    """Top-1 after each validation vs accumulated optimisation time, one panel per CR.

    Each curve starts at the student's accuracy right after tensorization; hybrid curves
    mark the switch from local to global; the dense teacher is a horizontal line; panels
    share one y range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crs = sorted({r["config"]["tensorize"].get("cr") for r in runs})
    fig, axes = plt.subplots(1, len(crs), figsize=(5.5 * len(crs), 4), squeeze=False)
    for ax, cr in zip(axes[0], crs, strict=True):
        markers: set[str] = set()
        for r in runs:
            if r["config"]["tensorize"].get("cr") != cr:
                continue
            monitor = r["task"]["monitor"]
            draw_recovery(
                ax,
                r["time"]["history"],
                before=(r["metrics"].get("before") or {}).get(monitor),
                switch_epoch=hybrid_switch_epoch(r),
                label=r["method"],
                labels_done=markers,
            )
        if teacher is not None:
            value = teacher["metrics"]["best"].get(teacher["task"]["monitor"])
            if value is not None:
                ax.axhline(value, color="k", ls=":", lw=1, label=f"dense teacher ({value:.2f})")
        ax.set_title(f"CR {cr}")
        ax.set_xlabel("optimisation time (s, forward+backward)")
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    share_y(axes[0])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
