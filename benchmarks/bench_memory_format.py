"""channels_last vs contiguous (NCHW) training steps of the ResNets, interleaved in one process.

For each model (the quickstart ``small_resnet`` width 16 on 16x16 digits-sized inputs and
the Fashion-MNIST ``cifar_resnet18`` width 16 on 28x28, both Tucker-2 CR 0.5 on every block
convolution as in ``bench_training.py``), and each memory format, three step kinds are
timed on the same random batch:

* ``global``: the student in train mode, forward + cross-entropy + backward;
* ``local``: the student in eval mode, every block slice run on its teacher input taken
  from float16 NCHW features (as a feature cache stores them), the local objective's
  summed MSE (:class:`tnexp.modules.LocalObjective`) + backward;
* ``teacher``: the dense teacher's forward under ``no_grad`` (what local online adds).

``channels_last`` converts the student and the teacher the way ``runtime.memory_format``
does (:class:`tnexp.callbacks.MemoryFormat`); batches and cached features stay NCHW, as in
a real run. Median of ``--repeats`` samples of ``--steps`` steps each, step kinds and formats
interleaved; ratios are within one run.

Usage::

    OMP_NUM_THREADS=1 uv run python benchmarks/bench_memory_format.py --threads 1 \\
        --out docs/benchmarks/memory_format.json
    uv run python benchmarks/bench_memory_format.py --device cuda   # where a GPU is lent
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tnexp.factory import tensorize
from tnexp.features import FeatureCapture
from tnexp.models import cifar_resnet18, small_resnet
from tnexp.modules import LocalObjective
from tnexp.modules.objective import FeaturePair, feature_pairs
from tnexp.slicing import make_slice_plan

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5, "init": "random"}]}


def build(model: str, device: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if model == "resnet18":
        teacher = cifar_resnet18(width=16, in_channels=1, num_classes=10).eval()
        x = torch.randn(64, 1, 28, 28)
    else:
        teacher = small_resnet(width=16, in_channels=1, num_classes=10).eval()
        x = torch.randn(32, 1, 16, 16)
    student, _ = tensorize(teacher, SPEC)
    y = torch.randint(0, 10, (x.shape[0],))
    return teacher.to(device), student.to(device), x.to(device), y.to(device)


def cached_pairs(teacher: nn.Module, plan: Any, x: torch.Tensor) -> dict[str, FeaturePair]:
    """Each slice's teacher input and output in float16 NCHW, as a feature-cache batch."""
    with FeatureCapture(teacher, plan, stop_after_last=True) as capture, torch.no_grad():
        features = capture(x)
    return {
        name: FeaturePair(pair.input.half(), pair.target.half())
        for name, pair in feature_pairs(features).items()
    }


def steps(model: str, fmt: str, device: str) -> dict[str, Callable[[], None]]:
    teacher, student, x, y = build(model, device)
    plan = make_slice_plan(student, "block")
    pairs = cached_pairs(teacher, plan, x)
    student = copy.deepcopy(student).to(memory_format=FORMATS[fmt])
    teacher = copy.deepcopy(teacher).to(memory_format=FORMATS[fmt])
    objective = LocalObjective(plan, "mse")
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-5)

    def global_step() -> None:
        student.train()
        nn.functional.cross_entropy(student(x), y).backward()
        optimizer.zero_grad(set_to_none=True)

    def local_step() -> None:
        student.eval()
        objective(student, pairs, step=0, epoch=0).total.backward()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(x)

    return {"global": global_step, "local": local_step, "teacher": teacher_forward}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously; time what they did


def measure(model: str, repeats: int, n_steps: int, device: str) -> dict[str, Any]:
    fns = {(fmt, kind): fn for fmt in FORMATS for kind, fn in steps(model, fmt, device).items()}
    for fn in fns.values():
        for _ in range(2):
            fn()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(n_steps):
                fn()
            _sync(device)
            samples[key].append((time.perf_counter() - start) / n_steps * 1e3)
    med = {f"{fmt}/{kind}": statistics.median(v) for (fmt, kind), v in samples.items()}
    ratios = {}
    for fmt in FORMATS:
        g = med[f"{fmt}/global"]
        ratios[f"{fmt}: local / global"] = med[f"{fmt}/local"] / g
        ratios[f"{fmt}: (local + teacher) / global"] = (
            med[f"{fmt}/local"] + med[f"{fmt}/teacher"]
        ) / g
    for kind in ("global", "local", "teacher"):
        ratios[f"channels_last / contiguous: {kind}"] = (
            med[f"channels_last/{kind}"] / med[f"contiguous/{kind}"]
        )
    return {
        "median_ms": med,
        "ratios": ratios,
        "samples_ms": {f"{f}/{k}": v for (f, k), v in samples.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "resnet18"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per sample")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "environment": {
            "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "loadavg_at_start": os.getloadavg(),
            "argv": sys.argv,
        },
        "models": {},
    }
    for model in args.models:
        res = measure(model, args.repeats, args.steps, args.device)
        results["models"][model] = res
        print(f"## {model} (median ms per step)")
        for key, value in res["median_ms"].items():
            print(f"  {key:28s} {value:8.1f}")
        for key, value in res["ratios"].items():
            print(f"  {key:40s} {value:5.2f}")
    results["environment"]["loadavg_at_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
