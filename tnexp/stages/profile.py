"""The ``method=profile`` stage (paper appendix B.1) and ``python -m tnexp.profiling``.

Profiles the teacher's layers with :func:`tnexp.profiling.profile_layers` and writes
``profile.csv``, ``profile.json`` (read by the ``tnexp.sensitive_layers`` config
resolver), ``profile.png``, a ``tensorize_<name>.yaml`` snippet and ``results.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.table import Table

from tnexp.config import CONFIG_DIR
from tnexp.console import console as make_console
from tnexp.profiling import (
    LayerSensitivity,
    exclusion_spec,
    most_sensitive,
    plot_profile,
    profile_layers,
    write_exclusion_yaml,
    write_profile_csv,
    write_profile_json,
)
from tnexp.results import Results, plain_config, run_name
from tnexp.runtime import runtime_record
from tnexp.stages.build import build, data_summary
from tnexp.stages.prepare import prepare_stage

__all__ = ["main", "run_profile"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tnexp.profiling",
        description="Per-layer tensorization sensitivity (paper appendix B.1).",
    )
    p.add_argument("--teacher", required=True, help="teacher.safetensors (or its run dir)")
    p.add_argument("--model", default="small_resnet", help="configs/model option")
    p.add_argument("--data", default="digits", help="configs/data option")
    p.add_argument("--cr", type=float, default=0.5, help="per-layer CR (fraction removed)")
    p.add_argument("--k", type=int, default=4, help="number of layers to keep dense")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--pattern", default="layer*.*.conv*", help="candidate-layer glob")
    p.add_argument("--init", default="svd", choices=("svd", "random"))
    p.add_argument("--method", default="tucker", choices=("tucker", "mpo", "auto"))
    p.add_argument("--max-batches", type=int, default=None, help="limit validation batches")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--name", default="profiled", help="name of the tensorize config snippet")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.batch_size=256")
    return p


def run_profile(cfg: DictConfig) -> dict[str, Any]:
    """The ``method=profile`` stage: profile the teacher's layers, write the results.

    Writes ``profile.csv``, ``profile.json`` (read by the ``tnexp.sensitive_layers``
    config resolver), ``profile.png``, a ``tensorize_<name>.yaml`` snippet and
    ``results.json`` into ``paths.output_dir``, and prints the ranking.
    """
    cfg = prepare_stage(cfg)  # thread policy and data workers, as for every stage
    m = cfg.method
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = build(cfg, student=False)  # seed, data, teacher
    datamodule, teacher = parts.datamodule, parts.teacher
    device = m.get("device") or ("cuda" if torch.cuda.is_available() else None)
    results = profile_layers(
        teacher,
        datamodule,
        pattern=str(m.pattern),
        cr=float(m.cr),
        init=str(m.init),
        method=str(m.decomposition),
        max_batches=m.max_batches,
        device=device,
        progress=bool(m.get("progress", True)),
    )
    k = min(int(m.k), len(results))
    write_profile_csv(results, out / "profile.csv")
    write_profile_json(results, out / "profile.json")
    model_name = str(cfg.model._target_).rsplit(".", 1)[-1]
    data_name = cfg.data.info.get("name", "data")
    plot_profile(
        results,
        out / "profile.png",
        k=k,
        title=f"{model_name} on {data_name}, one layer at CR {m.cr}",
    )
    snippet = write_exclusion_yaml(results, k, out / f"tensorize_{m.snippet_name}.yaml")
    summary = Results(
        method="profile",
        experiment=cfg.experiment_name,
        run_name=run_name(cfg, method="profile"),
        metrics={"dense": {"val/top1": results[0].dense_accuracy if results else None}},
        excluded=most_sensitive(results, k),
        profile=[r.to_dict() for r in results],
        data=data_summary(cfg, datamodule),
        runtime=runtime_record(),
        config=plain_config(cfg),
    ).write(out)

    console = make_console()
    table = Table(title=f"dense score {results[0].dense_accuracy:.2f}" if results else None)
    for col in ("rank", "layer", "score", "drop", "CR"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    by_name = {r.name: r for r in results}
    for i, name in enumerate(most_sensitive(results, len(results)), 1):
        r = by_name[name]
        style = "bold red" if i <= k else None
        table.add_row(
            str(i), name, f"{r.accuracy:.2f}", f"{r.drop:.2f}", f"{r.cr:.3f}", style=style
        )
    console.print(table)
    console.print(
        f"exclusion spec: {exclusion_spec(results, k)}\n"
        f"wrote {out / 'profile.csv'}, {out / 'profile.png'}, {snippet}; later stages read "
        f"it with tensorize.exclude='${{tnexp.sensitive_layers:{out},{k}}}'"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> list[LayerSensitivity]:
    """Entry point of ``python -m tnexp.profiling``; returns the profile."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    overrides = [
        "method=profile",
        f"model={args.model}",
        f"data={args.data}",
        f"teacher.path={Path(args.teacher).resolve()}",
        f"paths.output_dir={out.resolve()}",
        f"method.pattern={args.pattern}",
        f"method.cr={args.cr}",
        f"method.init={args.init}",
        f"method.decomposition={args.method}",
        f"method.k={args.k}",
        f"method.max_batches={'null' if args.max_batches is None else args.max_batches}",
        f"method.device={args.device or 'null'}",
        f"method.snippet_name={args.name}",
        f"method.progress={not args.no_progress}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = run_profile(cfg)
    return [LayerSensitivity(**entry) for entry in summary["profile"]]
