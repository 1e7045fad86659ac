"""Slice-parallel local tensorization: per-slice Hydra jobs with 1 vs 2 joblib workers.

Model: ``small_resnet(blocks=(2, 2, 2, 2))`` on scikit-learn's digits, Tucker-2 CR 0.5 on
every block convolution, sliced at ``block`` granularity: 8 slices (BasicBlocks). Every
step goes through the ``tnexp`` command (``python -m tnexp.cli``) in a fresh process, so
the wall-clock figures include what a user pays: process start, imports, Hydra, the
launcher.

1. ``method=pretrain`` trains the dense teacher (not timed for the table);
2. ``method=capture`` writes the shared feature cache once (timed: a one-time cost);
3. ``tnexp -m method=local method.features=cached method.slice_jobs.job=range(0,8)
   hydra/launcher=tnexp_joblib hydra.launcher.n_jobs=N`` for N = 1 and N = 2, each into
   its own ``method.slice_jobs.dir`` (wall clock of the whole multirun);
4. ``method=assemble`` for both; the two assembled students must be equal (max abs
   difference reported; threads differ between N=1 and N=2, so the last bits may too);
5. one all-slices local run (one process, ``method.features=cached``) and one global run
   with the same epochs, for the paper's table 7 form: serial local, local with N workers,
   global.

Threads: ``--threads-per-job auto`` (``runtime.threads=auto``, the thread policy) gives each
of N jobs cores // N torch threads (fewer when other processes keep cores busy, one for
tiny steps), so N=1 and N=2 use the same cores; ``1`` gives every
worker one core (the paper's one GPU per worker). Validation runs once, after the last epoch.

Usage::

    uv run python benchmarks/bench_slice_parallel.py [--quick] [--workers 2] [--epochs 4]
        [--width 48] [--image-size 16] [--batch-size 32] [--out docs/benchmarks/...]

``--quick`` only checks the pipeline (tiny widths, 4 batches per epoch; a few minutes,
dominated by process start-up); its numbers mean nothing. The defaults aim at 1-2 minutes
of serial local optimisation on a 2-core CPU (an estimate from docs/benchmarks/training.json:
width 16, 4 slices, 0.75 s per epoch; width 48 and 8 slices cost about 18x that), so that
the per-job start-up (imports, teacher load, SVD init, trainer setup: several seconds per
job) does not dominate.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "slice_parallel.json"
NUM_SLICES = 8  # small_resnet(blocks=(2, 2, 2, 2)) at block granularity


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def tnexp(args: list[str], log: Path) -> float:
    """Run ``tnexp <args>`` in a fresh process; return its wall-clock seconds."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "tnexp.cli", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"tnexp {' '.join(args)} failed (log {log}):\n{tail}")
    return wall


def common(args: argparse.Namespace, work: Path) -> list[str]:
    device = "gpu" if args.device == "cuda" else "cpu"
    limits = (
        [f"trainer.limit_train_batches={args.limit_train_batches}"]
        if args.limit_train_batches
        else []
    )
    return [
        "model.blocks=[2,2,2,2]",
        f"model.width={args.width}",
        f"data.image_size={args.image_size}",
        "tensorize.cr=0.5",
        "tensorize.init=svd",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.check_val_every_n_epoch={args.epochs}",  # validate once, at the end
        f"trainer.accelerator={device}",
        "logger=csv",
        "callbacks.progress_bar=none",
        f"paths.cache_dir={work / 'cache'}",
        f"seed={args.seed}",
        *limits,
    ]


def local_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "method.slicing=block",
        f"method.local.batch_size={args.batch_size}",
        f"method.cache.dtype={args.cache_dtype}",
    ]


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """What the table needs from a results.json (not its whole config)."""
    return {
        k: results[k] for k in ("method", "metrics", "time", "params", "epochs") if k in results
    }


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = common(args, work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    out: dict[str, Any] = {"walls": {}}

    print("pretraining the teacher ...", flush=True)
    out["walls"]["pretrain"] = tnexp(
        [
            "method=pretrain",
            *[o for o in base if not o.startswith(("trainer.max_epochs", "trainer.check_val"))],
            f"trainer.max_epochs={args.teacher_epochs}",
            f"hydra.run.dir={teacher}",
        ],
        logs / "pretrain.log",
    )
    with_teacher = [*base, f"teacher.path={teacher}"]
    local = [*with_teacher, *local_overrides(args)]

    print("capturing the feature cache ...", flush=True)
    out["walls"]["capture"] = tnexp(
        ["method=capture", *local, f"hydra.run.dir={work / 'capture'}"],
        logs / "capture.log",
    )
    capture = json.loads((work / "capture" / "capture.json").read_text())
    if capture["jobs"] != NUM_SLICES:
        raise RuntimeError(f"expected {NUM_SLICES} slices, the plan has {capture['jobs']}")

    for n in sorted({1, args.workers}):
        print(f"per-slice multirun, joblib n_jobs={n} ...", flush=True)
        out["walls"][f"multirun_n{n}"] = tnexp(
            [
                "-m",
                "method=local",
                "method.features=cached",
                *local,
                f"method.slice_jobs.dir={work / f'jobs_n{n}'}",
                f"method.slice_jobs.job=range(0,{NUM_SLICES})",
                "hydra/launcher=tnexp_joblib",
                f"hydra.launcher.n_jobs={n}",
                f"runtime.threads={args.threads_per_job}",
                f"hydra.sweep.dir={work / f'sweep_n{n}'}",
            ],
            logs / f"multirun_n{n}.log",
        )
        print(f"  {out['walls'][f'multirun_n{n}']:.1f} s; assembling ...", flush=True)
        out["walls"][f"assemble_n{n}"] = tnexp(
            [
                "method=assemble",
                "method.features=cached",
                *local,
                f"method.slice_jobs.dir={work / f'jobs_n{n}'}",
                f"hydra.run.dir={work / f'assemble_n{n}'}",
            ],
            logs / f"assemble_n{n}.log",
        )
        out[f"assemble_n{n}"] = summary(
            json.loads((work / f"assemble_n{n}" / "results.json").read_text())
        )

    print("one all-slices local run ...", flush=True)
    out["walls"]["local_all"] = tnexp(
        ["method=local", "method.features=cached", *local, f"hydra.run.dir={work / 'local'}"],
        logs / "local.log",
    )
    out["local_all"] = summary(json.loads((work / "local" / "results.json").read_text()))
    print("one global run ...", flush=True)
    out["walls"]["global"] = tnexp(
        [
            "method=global",
            *with_teacher,
            f"method.global.batch_size={args.batch_size}",
            f"hydra.run.dir={work / 'global'}",
        ],
        logs / "global.log",
    )
    out["global"] = summary(json.loads((work / "global" / "results.json").read_text()))

    student = Path("student") / "model.safetensors"
    out["equal"] = {
        f"n1_vs_n{args.workers}": max_abs_diff(
            work / "assemble_n1" / student, work / f"assemble_n{args.workers}" / student
        ),
        "n1_vs_all_slices_run": max_abs_diff(
            work / "assemble_n1" / student, work / "local" / student
        ),
    }
    return out


def table(results: dict[str, Any], workers: int) -> list[str]:
    raw = results["runs"]
    walls = raw["walls"]
    n1 = raw["assemble_n1"]["time"]["slice_jobs"]
    nw = raw[f"assemble_n{workers}"]["time"]["slice_jobs"]
    top1 = {
        "local": raw["assemble_n1"]["metrics"]["final"].get("val/top1"),
        "local_w": raw[f"assemble_n{workers}"]["metrics"]["final"].get("val/top1"),
        "local_all": raw["local_all"]["metrics"]["final"].get("val/top1"),
        "global": raw["global"]["metrics"]["final"].get("val/top1"),
    }
    rows = [
        (
            "local, serial: sum of 8 slice jobs' optimisation",
            n1["sum_optimization_s"],
            None,
            top1["local"],
        ),
        (
            "local, serial: one all-slices run, optimisation",
            raw["local_all"]["time"]["optimization_s"],
            walls["local_all"],
            top1["local_all"],
        ),
        ("local, serial: multirun n_jobs=1, wall clock", None, walls["multirun_n1"], top1["local"]),
        (
            f"local, {workers} workers: multirun n_jobs={workers}, wall clock",
            None,
            walls[f"multirun_n{workers}"],
            top1["local_w"],
        ),
        (
            f"local, {workers} workers: slowest slice job (ideal)",
            nw["max_optimization_s"],
            None,
            top1["local_w"],
        ),
        (
            "global, same epochs",
            raw["global"]["time"]["optimization_s"],
            walls["global"],
            top1["global"],
        ),
    ]
    lines = [
        f"{'setting':58s} {'optim s':>9s} {'wall s':>9s} {'top-1':>7s}",
        "-" * 86,
    ]
    for name, optim, wall, acc in rows:
        fmt = lambda v, w: f"{v:{w}.1f}" if v is not None else " " * (w - 1) + "-"  # noqa: E731
        lines.append(f"{name:58s} {fmt(optim, 9)} {fmt(wall, 9)} {fmt(acc, 7)}")
    speedup = walls["multirun_n1"] / walls[f"multirun_n{workers}"]
    lines += [
        "",
        f"multirun speed-up n_jobs=1 -> {workers}: {speedup:.2f}x (wall clock incl. process start)",
        f"feature capture (one-time): {walls['capture']:.1f} s wall",
        "assembled students: max |diff| "
        + ", ".join(f"{k} {v:.2e}" for k, v in raw["equal"].items()),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline")
    parser.add_argument("--workers", type=int, default=2, help="joblib n_jobs of the parallel run")
    parser.add_argument(
        "--threads-per-job",
        default="auto",
        help="torch threads per slice job: auto (cores // n_jobs, so N=1 and N=2 use the same "
        "cores) or an int (1: one core per worker, as one GPU per worker in the paper)",
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="local and global")
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir)")
    parser.add_argument(
        "--out", default=None, help=f"JSON results (default: {DEFAULT_OUT}; --quick: none)"
    )
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be >= 2 (n_jobs=1 is always measured)")
    if args.quick:
        args.epochs, args.teacher_epochs = 1, 1
        args.width, args.image_size = 8, 8
        args.limit_train_batches = args.limit_train_batches or 4
    out_path = Path(args.out) if args.out else (None if args.quick else DEFAULT_OUT)

    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_slice_parallel_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = run(args, work)
    results = {
        "benchmark": "slice-parallel local tensorization (Hydra joblib launcher)",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "uv run python benchmarks/bench_slice_parallel.py "
        + " ".join(argv or sys.argv[1:]),
        "git": git_revision(),
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            # Other processes on the machine distort wall clocks: judge the numbers by this.
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": os.getloadavg(),
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "model": {"name": "small_resnet", "blocks": [2, 2, 2, 2], "slices": NUM_SLICES},
        "runs": runs,
        "total_s": time.perf_counter() - started,
    }
    print("\n".join(table(results, args.workers)))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
