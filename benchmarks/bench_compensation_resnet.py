"""Tucker-2 ResNets right after data-aware tensorization: with and without compensation.

For the quickstart model (``small_resnet`` width 16 on 16x16 digits, pretrained as the
quickstart does: 10 epochs, batch 64) and a made ResNet-18-shaped one (width 32, blocks
[2, 2, 2, 2], 3 epochs), at each CR and init, the student is built without compensation,
measured, then compensated (every ``conv2`` refitted from the student's ``conv1`` output)
and measured again: validation top-1, the relative error of the logits against the
teacher's (``||z' - z|| / ||z||`` over the validation set) and the mean relative output
error of the refitted ``conv2`` layers from the student's inputs (before -> after).

It also times, for the quickstart model at CR 0.5 with ALS init, a build with
``compensate=true`` from an empty cache (calibration pass + init + compensation pass)
against a rerun that loads both files (median of ``--repeats``, interleaved).

    OMP_NUM_THREADS=1 uv run python benchmarks/bench_compensation_resnet.py \
        --out docs/results/resnet_compensation.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tnexp.config import CONFIG_DIR
from tnexp.features import to_device
from tnexp.memory_bounded import validate
from tnexp.run import run_stage
from tnexp.stages.build import build_datamodule, build_task, load_teacher
from tnexp.stages.student import build_student, calibration_stats, compensate, tensorize_spec

COMMON = ["logger=csv", "callbacks.progress_bar=none", "trainer.accelerator=cpu"]
# name -> (model overrides, pretraining overrides)
MODELS = {
    "quickstart": ([], ["trainer.max_epochs=10", "method.global.batch_size=64"]),
    "resnet18_w32": (
        ["model.width=32", "model.blocks=[2,2,2,2]"],
        ["trainer.max_epochs=3", "method.global.batch_size=64"],
    ),
}


def cfg_for(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[*COMMON, f"paths.output_dir={out}", f"paths.cache_dir={out}/cache",
                       *overrides],
        )  # fmt: skip


@torch.no_grad()
def logit_error(student, teacher, datamodule, task) -> float:
    datamodule.setup("validate")
    num = den = 0.0
    for batch in datamodule.val_dataloader():
        x = to_device(task.model_inputs(batch), "cpu")
        z = teacher(x)
        num += float((student(x) - z).double().square().sum())
        den += float(z.double().square().sum())
    return (num / den) ** 0.5


def measure(teacher_dir: Path, model: list[str], work: Path, cr: float, init: str) -> dict:
    cfg = cfg_for(
        work,
        "method=local",
        f"teacher.path={teacher_dir}",
        *model,
        f"tensorize.cr={cr}",
        f"tensorize.init={init}",
        "tensorize.calibration.compensate=false",
    )
    datamodule, task = build_datamodule(cfg), build_task(cfg)
    teacher = load_teacher(cfg).eval()
    torch.manual_seed(0)
    student, _ = build_student(cfg, teacher, datamodule, task, progress=False)
    student.eval()
    row = {"cr": cr, "init": init, "teacher_top1": validate(teacher, datamodule, task, "cpu")}
    row["before"] = {
        "top1": validate(student, datamodule, task, "cpu"),
        "logit_rel_err": logit_error(student, teacher, datamodule, task),
    }
    spec = tensorize_spec(cfg)
    stats = calibration_stats(cfg, teacher, spec, datamodule, task, force=True)
    started = time.perf_counter()
    result = compensate(cfg, teacher, student, datamodule, task)  # no stats: not cached
    row["compensation_s"] = time.perf_counter() - started
    student.eval()
    layers = result.layers
    row["after"] = {
        "top1": validate(student, datamodule, task, "cpu"),
        "logit_rel_err": logit_error(student, teacher, datamodule, task),
    }
    row["conv2_error_from_student_inputs"] = {
        "before_mean": statistics.mean(v["before"] for v in layers.values()),
        "after_mean": statistics.mean(v["after"] for v in layers.values()),
        "layers": layers,
    }
    row["calibration_batches"] = stats.meta["batches"]
    return row


def cache_timing(teacher_dir: Path, work: Path, repeats: int) -> dict:
    """Cold build (both passes) vs warm rerun (both loaded), interleaved, medians."""
    cold, warm = [], []
    for i in range(repeats):
        cache = work / f"timing{i}"
        cfg = cfg_for(
            cache,
            "method=local",
            f"teacher.path={teacher_dir}",
            "tensorize.cr=0.5",
            "tensorize.init=als",
            "tensorize.calibration.compensate=true",
        )
        datamodule, task = build_datamodule(cfg), build_task(cfg)
        teacher = load_teacher(cfg).eval()
        for times in (cold, warm):
            torch.manual_seed(0)
            started = time.perf_counter()
            build_student(cfg, teacher, datamodule, task, progress=False)
            times.append(time.perf_counter() - started)
        shutil.rmtree(cache)
    return {
        "cold_s": cold,
        "warm_s": warm,
        "cold_median_s": statistics.median(cold),
        "warm_median_s": statistics.median(warm),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crs", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-comp-"))
    record: dict = {
        "command": "benchmarks/bench_compensation_resnet.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": args.threads,
        "load_average_start": os.getloadavg(),
        "models": {},
    }
    for name, (model, pretrain) in MODELS.items():
        teacher_dir = work / name / "teacher"
        if not (teacher_dir / "teacher.safetensors").is_file():
            run_stage(cfg_for(teacher_dir, "method=pretrain", *model, *pretrain))
        rows = []
        for cr in args.crs:
            for init in ("als", "svd"):
                row = measure(teacher_dir, model, work / name / f"{cr}-{init}", cr, init)
                rows.append(row)
                b, a = row["before"], row["after"]
                c = row["conv2_error_from_student_inputs"]
                print(
                    f"{name} CR {cr} {init}: top1 {b['top1']['val/top1']:.4f} -> "
                    f"{a['top1']['val/top1']:.4f}, logit err {b['logit_rel_err']:.4f} -> "
                    f"{a['logit_rel_err']:.4f}, conv2 err {c['before_mean']:.4f} -> "
                    f"{c['after_mean']:.4f} (teacher {row['teacher_top1']['val/top1']:.4f})",
                    flush=True,
                )
        record["models"][name] = rows
    record["cache_timing"] = cache_timing(work / "quickstart" / "teacher", work, args.repeats)
    print("cache timing:", json.dumps(record["cache_timing"]), flush=True)
    record["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
