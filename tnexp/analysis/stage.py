"""The ``method=analyze`` stage: bond spectra and entanglement entropy of one model.

Analyses the teacher (``tnexp.stages.build.load_teacher``) at the sizes ``cfg.tensorize`` would
give it, or a saved tensorized student (``method.student_path``, a ``student/`` folder
written by a local/global/hybrid run). Writes ``spectra.json``, ``spectra.csv``,
``spectra.png``, ``entropy_depth.png``, ``entropy_heatmap.png`` and ``results.json``
into ``paths.output_dir``; with ``method.propagation.enabled`` (a student only) also
``propagation.json`` / ``.csv`` / ``.png`` (:mod:`tnexp.analysis.propagation`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from tnexp.analysis.propagation import (
    progressive_replacement,
    propagation_errors,
    propagation_record,
    replacement_order,
    write_propagation,
)
from tnexp.analysis.report import summarize, write_csv, write_json, write_plots
from tnexp.analysis.spectra import LayerSpectrum, analyze_spectra
from tnexp.config import plain
from tnexp.console import console as make_console
from tnexp.errors import ConfigError
from tnexp.eval import sliding_window_perplexity
from tnexp.factory import SPEC_FILE
from tnexp.results import Results, plain_config
from tnexp.slicing import make_slice_plan
from tnexp.stages.build import (
    build_datamodule,
    build_model,
    build_task,
    is_language_model,
    load_teacher,
)
from tnexp.stages.student import (
    calibration_stats,
    load_student,
    student_dir,
    tensorize_spec,
)

log = logging.getLogger("tnexp")

__all__ = ["run_analyze"]


def _load_student(cfg: DictConfig, path: str) -> torch.nn.Module:
    directory = student_dir(path)
    # A student saved without base_config needs the dense architecture from this config.
    base = None
    if not json.loads((directory / SPEC_FILE).read_text()).get("base_config"):
        base = build_model(cfg)
    return load_student(directory, base=base)[0].eval()


def _stats(cfg: DictConfig, teacher: torch.nn.Module, spec: Any) -> Any:
    """The teacher's input statistics (loaded or collected once, as tensorizing stages do)."""
    return calibration_stats(cfg, teacher, spec, build_datamodule(cfg), build_task(cfg), force=True)


def _log_wandb(cfg: DictConfig, out: Path, plots: dict[str, Path], summary: dict) -> None:
    """PNGs as W&B media (offline by default); never fails the analysis."""
    wb = cfg.logger.wandb
    if not wb.enabled or wb.mode == "disabled":
        return
    try:
        import wandb

        run = wandb.init(
            project=wb.project,
            entity=wb.entity,
            group=wb.group,
            job_type=wb.job_type,
            name=wb.name or f"analyze-{cfg.experiment_name}",
            tags=[str(t) for t in (wb.tags or [])] + ["analyze"],
            dir=str(out),
            mode=wb.mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        run.log({f"analysis/{name}": wandb.Image(str(path)) for name, path in plots.items()})
        run.summary["analysis/layers"] = summary["layers"]
        run.finish()
    except Exception as err:  # W&B is optional here: the files on disk are the result
        log.warning("W&B logging of the analysis failed (%s); the files are written.", err)


def run_analyze(cfg: DictConfig) -> dict[str, Any]:
    """Analyse the teacher or ``method.student_path`` and write the results (see module)."""
    m = cfg.method
    propagation = m.get("propagation") or {}
    if propagation.get("enabled") and not m.get("student_path"):
        raise ConfigError(
            "method.propagation.enabled=true compares a tensorized student with its teacher; "
            "set method.student_path to a local/global/hybrid run folder (or its student/)."
        )
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg.seed))
    stats = None
    if m.get("student_path"):
        model = _load_student(cfg, str(m.student_path))
        spec = None  # a tensorized model is cut with its own factors and bonds
        source = f"tensorized student {m.student_path}"
        what = "tensorized student"
        if m.get("data_aware"):
            # The student's layers get the *teacher's* input statistics (paper: teacher inputs).
            stats = _stats(cfg, load_teacher(cfg), tensorize_spec(cfg))
    else:
        model = load_teacher(cfg)
        spec = tensorize_spec(cfg) if m.get("use_spec", True) else None
        source = "dense teacher" + (" at the sizes of cfg.tensorize" if spec else "")
        what = "dense teacher"
        if m.get("data_aware"):
            if spec is None:
                raise ValueError(
                    "method.data_aware=true collects statistics for the spec's layers; set "
                    "method.use_spec=true (the default) or data_aware=false."
                )
            stats = _stats(cfg, model, spec)
    layers: list[LayerSpectrum] = analyze_spectra(
        model, spec, stats=stats, num_sites=int(m.get("num_sites", 2))
    )
    write_json(layers, out / "spectra.json")
    write_csv(layers, out / "spectra.csv")
    model_name = str(cfg.model.get("name") or cfg.model._target_).rsplit(".", 1)[-1]
    plots = write_plots(layers, out, title=f"{model_name} ({what})")
    summary = summarize(layers)
    extra: dict[str, Any] = {}
    if propagation.get("enabled"):
        record, files = _propagation(cfg, model, out, title=f"{model_name} ({what})")
        plots["propagation"] = out / files["propagation_png"]
        extra = {"propagation": record["summary"]}
    results = Results(
        method="analyze",
        experiment=cfg.experiment_name,
        # A few headline numbers; tnexp-aggregate lists the run (no table row).
        metrics={"analysis": _headline(layers), **extra},
        config=plain_config(cfg),
        extra={
            "source": source,
            "data_aware": stats is not None,
            "summary": summary,
            "files": {
                "json": "spectra.json",
                "csv": "spectra.csv",
                **{k: p.name for k, p in plots.items()},
                **({"propagation": "propagation.json"} if extra else {}),
            },
        },
    ).write(out)
    _log_wandb(cfg, out, plots, summary)
    _print_summary(summary, source, out)
    return results


def _propagation(
    cfg: DictConfig, student: torch.nn.Module, out: Path, *, title: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Per-slice error propagation and the progressive replacement ablation (see module)."""
    p = cfg.method.propagation
    teacher = load_teacher(cfg).eval()
    plan = make_slice_plan(student, plain(p.slicing))
    datamodule, task = build_datamodule(cfg), build_task(cfg)
    datamodule.setup("validate")
    progress = cfg.callbacks.get("progress_bar", "none") != "none"
    errors = propagation_errors(
        teacher,
        student,
        plan,
        datamodule.val_dataloader(),
        model_inputs=task.model_inputs,
        num_batches=int(p.num_batches),
        progress=progress,
    )
    steps = []
    metric = "token_ppl" if is_language_model(cfg) else "top1"
    if str(p.order) != "none":
        evaluate = (
            _perplexity_metric(cfg, datamodule)
            if is_language_model(cfg)
            else _top1_metric(datamodule, task, int(p.eval_batches))
        )
        order = replacement_order(plan, str(p.order), errors)
        steps = progressive_replacement(
            teacher, student, plan, evaluate, order=order, progress=progress
        )
    files = write_propagation(errors, steps, out, metric=metric, title=title)
    record = propagation_record(errors, steps, metric)
    _print_propagation(errors, steps, metric)
    return record, {k: v.name for k, v in files.items()}


def _top1_metric(datamodule: Any, task: Any, batches: int):
    loader = datamodule.val_dataloader()

    @torch.no_grad()
    def top1(model: torch.nn.Module) -> float:
        correct = total = 0
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            predicted = task.forward(model, batch).argmax(-1)
            target = task.targets(batch)
            correct += int((predicted == target).sum())
            total += int(target.numel())
        return 100.0 * correct / max(total, 1)

    return top1


def _perplexity_metric(cfg: DictConfig, datamodule: Any):
    ev = cfg.eval.perplexity
    tokens = datamodule.val_tokens
    if ev.max_tokens:
        tokens = tokens[: int(ev.max_tokens)]
    max_length = int(ev.max_length or cfg.data.seq_len)
    stride = int(ev.stride or max(1, max_length // 2))

    def perplexity(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        result = sliding_window_perplexity(
            model, tokens, max_length=max_length, stride=stride, device=device
        )
        return float(result["ppl"])

    return perplexity


def _print_propagation(errors: list, steps: list, metric: str) -> None:
    table = Table(title="error propagation (relative output error per slice)")
    for col in ("slice", "teacher in", "student in", "amplification", "cos (student in)"):
        table.add_column(col, justify="left" if col == "slice" else "right")
    for e in errors:
        table.add_row(
            e.slice,
            f"{e.teacher_input_error:.4f}",
            f"{e.student_input_error:.4f}",
            f"{e.amplification:.2f}",
            f"{e.student_input_cosine:.4f}",
        )
    console = make_console()
    console.print(table)
    if steps:
        line = ", ".join(f"{s.replaced}: {s.metric:.2f}" for s in steps)
        console.print(f"{metric} after replacing k slices: {line}")


def _headline(layers: list[LayerSpectrum]) -> dict[str, float | int]:
    cuts = [cut for layer in layers for cut in layer.cuts]
    errors = [c.truncation_error for c in cuts if c.truncation_error is not None]
    return {
        "layers": len(layers),
        "entropy_mean": sum(c.entropy for c in cuts) / len(cuts),
        "relative_entropy_mean": sum(c.entropy / c.max_entropy for c in cuts if c.max_entropy)
        / max(1, sum(1 for c in cuts if c.max_entropy)),
        **({"truncation_error_mean": sum(errors) / len(errors)} if errors else {}),
    }


def _print_summary(summary: dict[str, Any], source: str, out: Path) -> None:
    table = Table(title=f"bond spectra of the {source} ({summary['layers']} layers)")
    for col in ("role", "cut", "layers", "S mean", "S max possible", "r90", "r99", "rank", "err"):
        table.add_column(col, justify="left" if col in ("role", "cut") else "right")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in summary["groups"]:
        table.add_row(
            row["group"],
            row["cut"],
            str(row["layers"]),
            fmt(row["entropy_mean"], ".3f"),
            fmt(row["max_entropy"], ".3f"),
            fmt(row["rank_90_mean"], ".1f"),
            fmt(row["rank_99_mean"], ".1f"),
            fmt(row["rank_mean"], ".1f"),
            fmt(row["truncation_error_mean"], ".3f"),
        )
    console = make_console()
    console.print(table)
    console.print(f"wrote spectra.json, spectra.csv and PNGs to {out}")
