"""The figures of an aggregation: accuracy, LM metrics and feature-matching error vs time,
sweeps."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tnexp.aggregate.aggregation import Aggregation
from tnexp.aggregate.common import COLORS, is_accuracy, number, same
from tnexp.aggregate.record import Run
from tnexp.aggregate.table import Table
from tnexp.plots import draw_recovery, hybrid_switch_epoch, share_y


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


def _draw_runs(
    ax: Any, runs: list[Run], label: str, scale: float, markers: set[str], **line: Any
) -> None:
    """One table row's runs (its seeds): each validation history as a curve from the
    before-recovery point, assembled slice jobs as points (serial sum, ideal parallel)."""
    color = line.get("color")
    for i, run in enumerate(runs):
        history = [
            h
            for h in run.history
            if number(h.get("value")) is not None and number(h.get("optimization_s")) is not None
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
                **line,
            )
        if run.slice_jobs and run.best_value is not None and run.optimization_s is not None:
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
            if row["dataset"] != dataset or not same(row["cr"], cr):
                continue
            ref = row["_ref"] or ref
            color = COLORS.get(row["method"])
            label = row["method"] + ("" if row["_samples_key"] == "full" else f" {row['samples']}")
            style = "-" if row["_samples_key"] == "full" else ":"
            _draw_runs(ax, row["_runs"], label, scale, markers, ls=style, color=color)
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


def figure_features_vs_time(agg: Aggregation, path: Path) -> Path | None:
    """Feature-matching runs: validation relative error vs optimisation time per method,
    one panel per (data set, model, compared output, CR); the teacher is 0 by definition."""
    rows = [r for r in agg.feature_rows(agg.feature_runs()) if r["_runs"]]
    panels = sorted(
        {(r["dataset"], r["model"], r["output"], r["cr"]) for r in rows},
        key=lambda k: (*k[:3], k[3] is None, k[3] or 0.0),
    )
    if not panels:
        return None
    all_runs = [run for r in rows for run in r["_runs"]]
    scale, unit = _time_axis(
        [h.get("optimization_s") for run in all_runs for h in run.history]
        + [run.optimization_s for run in all_runs]
    )
    fig, axes = _new_figure(len(panels))
    for ax, (dataset, model, output, cr) in zip(axes, panels, strict=True):
        markers: set[str] = set()
        for row in rows:
            if (row["dataset"], row["model"], row["output"]) != (dataset, model, output):
                continue
            if not same(row["cr"], cr):
                continue
            label = row["method"] + ("" if row["_runs"][0].full_data else f" {row['samples']}")
            style = "-" if row["_runs"][0].full_data else ":"
            color = COLORS.get(row["method"])
            _draw_runs(ax, row["_runs"], label, scale, markers, ls=style, color=color)
        ax.axhline(0.0, color="k", ls=":", lw=1, label="dense teacher (0)")
        where = f"{model} on {dataset}, {output}"
        ax.set_title(f"{where}, CR {cr:g}" if cr is not None else where, fontsize=9)
        ax.set_xlabel(f"optimisation time ({unit})")
        ax.set_ylabel("validation rel. error ‖S − T‖ / ‖T‖")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    share_y(axes)
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
        mult = 100.0 if is_accuracy(name) else 1.0
        for r in sorted(runs, key=lambda r: (r.family, r.label)):
            color = COLORS.get(r.family)
            label = r.family + (" (1 process)" if r.method != "assemble" else " (slice jobs)")
            if name == "val/ppl":
                pts = [
                    (h["optimization_s"] / scale, h["value"])
                    for h in r.history
                    if number(h.get("value")) is not None
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
            if number(r[f"{phase}.{param}"]) is not None and r["best"] is not None
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
                if number(r[f"{phase}.{param}"]) is not None
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
