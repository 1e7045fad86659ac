"""Data-free vs data-aware init of a pretrained model, before any recovery training.

For each init (svd, als, and for MPO rules whiten) and CR: the relative output error of
every tensorized layer on the calibration inputs and the task metric of the student right
after tensorization (top-1 for classification, token perplexity for LMs). One run, one
teacher, the same calibration statistics for every row.

    uv run python benchmarks/bench_data_aware_init.py --teacher outputs/teacher \
        --crs 0.5 0.7 --inits svd als --out docs/results/data_aware_init.json

``--teacher`` is a pretrain run of the quickstart model (``tnexp method=pretrain``); any
other overrides of the `train` config can follow ``--set`` (e.g. ``--set model=...``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tnexp.calibration import collect_input_stats
from tnexp.config import CONFIG_DIR
from tnexp.factory import plan_layers, tensorize
from tnexp.stages.build import build_datamodule, build_task, load_teacher
from tnexp.stages.student import tensorize_spec


@torch.no_grad()
def top1(model: torch.nn.Module, loader, task) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        logits = task.forward(model, batch)
        target = task.targets(batch)
        correct += int((logits.argmax(-1) == target).sum())
        total += int(target.numel())
    return 100.0 * correct / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--crs", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--inits", nargs="+", default=["svd", "als"])
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides of the train config")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["method=local", f"teacher.path={args.teacher}", *args.set],
        )
    torch.manual_seed(0)
    datamodule, task = build_datamodule(cfg), build_task(cfg)
    datamodule.setup("fit")
    teacher = load_teacher(cfg)
    spec = tensorize_spec(cfg)
    names = [p.name for p in plan_layers(teacher, spec)]
    started = time.perf_counter()
    stats = collect_input_stats(
        teacher,
        names,
        datamodule.train_dataloader(),
        model_inputs=task.model_inputs,
        num_batches=args.calibration_batches,
    )
    calibration_s = time.perf_counter() - started
    val = datamodule.val_dataloader()
    rows = [{"init": "dense", "cr": 0.0, "top1": top1(teacher, val, task)}]
    for cr in args.crs:
        for init in args.inits:
            rules = [{**r.__dict__, "cr": cr, "init": init} for r in spec.rules]
            started = time.perf_counter()
            student, report = tensorize(
                teacher, {"rules": rules, "exclude": spec.exclude}, stats=stats
            )
            seconds = time.perf_counter() - started
            errors = {layer.name: layer.output_error for layer in report.layers}
            rows.append(
                {
                    "init": init,
                    "cr": cr,
                    "model_cr": report.model_cr,
                    "top1": top1(student, val, task),
                    "mean_output_error": sum(errors.values()) / len(errors),
                    "max_output_error": max(errors.values()),
                    "output_errors": errors,
                    "tensorize_s": seconds,
                }
            )
            print(
                f"cr {cr} {init:>6}: top-1 {rows[-1]['top1']:.2f}  output error mean "
                f"{rows[-1]['mean_output_error']:.4f} max {rows[-1]['max_output_error']:.4f}  "
                f"({seconds:.1f} s)",
                flush=True,
            )
    for cr in args.crs:
        by_init = {r["init"]: r["output_errors"] for r in rows if r.get("cr") == cr}
        if "svd" in by_init and "als" in by_init:
            worse = [n for n in by_init["als"] if by_init["als"][n] > by_init["svd"][n] + 1e-9]
            print(
                f"cr {cr}: als output error <= svd on {len(by_init['als']) - len(worse)}"
                f"/{len(by_init['als'])} layers {worse or ''}"
            )
    result = {
        "command": "benchmarks/bench_data_aware_init.py " + " ".join(os.sys.argv[1:]),
        "load_average": os.getloadavg(),
        "calibration_batches": args.calibration_batches,
        "calibration_s": calibration_s,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
