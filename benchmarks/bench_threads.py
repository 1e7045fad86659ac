"""Step time under torch's default threads vs the thread policy, quiet and with a busy core.

Measures, in one run:

1. **Steps.** The quickstart model (``small_resnet`` width 16 on 16x16 digits, batch 32)
   and the Fashion-MNIST analog's ResNet-18 (width 16, 28x28, batch 64): one training
   step = forward, cross-entropy, backward, Adam step, on synthetic tensors of the real
   shapes. Each thread setting -- torch's default, every fixed count from 1 to the usable
   cores, and the policy (``tnexp.runtime.apply_thread_policy`` as a stage calls it, then
   the tiny-step refinement with the step's counted FLOPs) -- runs ``--steps`` timed steps
   after ``--warmup`` untimed ones, *quiet* and with *one busy background process* (a
   pure-Python ``while True`` loop in a subprocess, started before the policy is applied
   and killed after). Quiet and busy blocks alternate ``--repeats`` times so that other
   processes on a shared machine weigh on both alike; figures are medians of all steps.
   Before each block the script waits (``--quiet-wait``) for other processes to use under
   0.3 cores; ``os.getloadavg()`` and the cores others used are recorded beside each block.
2. **Crossover** (``tiny_step_gflop``): quiet step time with 1 vs every-core threads for
   ``small_resnet`` at several widths and a GPT-2-sized MLP layer, against the step's
   GFLOP (forward+backward, torch's FlopCounterMode).
3. **Quickstart.** Wall time of the real ``tnexp`` quickstart command (``python -m
   tnexp.cli``, a fresh process, policy ``auto``) quiet and with one busy background
   process; ``--quickstart-default-limit S`` also runs it with torch's default threads
   under load (``runtime.threads=<cores>``), stopped after S seconds.

Targets (issue #16): with one busy process the policy's step time <= 1.3x its quiet step
time; quiet, the policy within 1.05x of the best fixed thread count; the quickstart with
one busy process within 2x of its quiet wall time.

Usage::

    uv run python benchmarks/bench_threads.py [--repeats 3] [--steps 12] [--warmup 3]
        [--quiet-wait 60] [--no-crossover] [--no-steps] [--no-quickstart]
        [--quickstart-default-limit 0] [--out docs/benchmarks/threads.json]

Run it without ``OMP_NUM_THREADS`` in the environment (it is removed for the policy and
the quickstart, but torch's "default" is read when torch starts).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "threads.json"
OMP_AT_START = os.environ.pop("OMP_NUM_THREADS", None)  # before torch reads it
# A busy core: pure-Python loop that checks now and then whether its parent still lives.
BUSY_LOOP = (
    "import os, sys\n"
    "parent = int(sys.argv[1])\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100000):\n"
    "        pass\n"
)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tnexp.models import cifar_resnet18, small_resnet  # noqa: E402
from tnexp.runtime import (  # noqa: E402
    DEFAULT_TINY_STEP_GFLOP,
    apply_thread_policy,
    others_busy_cores,
    refine_for_work,
    reset_state,
    usable_cores,
)

TORCH_DEFAULT_THREADS = torch.get_num_threads()


def _gpt2_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))


# name -> (model builder, input shape); 4-d inputs are images with class labels
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "quickstart small_resnet w16 16x16 b32": (
        lambda: small_resnet(num_classes=10, in_channels=1, width=16),
        (32, 1, 16, 16),
    ),
    "fmnist resnet18 w16 28x28 b64": (
        lambda: cifar_resnet18(num_classes=10, in_channels=1, width=16),
        (64, 1, 28, 28),
    ),
}
CROSSOVER: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    **{
        f"small_resnet w{w} 16x16 b32": (
            lambda w=w: small_resnet(num_classes=10, in_channels=1, width=w),
            (32, 1, 16, 16),
        )
        for w in (4, 8, 16, 32)
    },
    "small_resnet w8 8x8 b16 (tests)": (
        lambda: small_resnet(num_classes=10, in_channels=1, width=8),
        (16, 1, 8, 8),
    ),
    "gpt2 MLP 768-3072 8x128 tokens": (_gpt2_mlp, (8, 128, 768)),
    "gpt2 MLP 768-3072 2x64 tokens": (_gpt2_mlp, (2, 64, 768)),
}


def make_step(build: Callable[[], nn.Module], shape: tuple[int, ...]) -> tuple[Callable, float]:
    """A training step on synthetic data, and its GFLOP (forward + backward)."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    if len(shape) == 4:  # images -> class labels
        target = torch.randint(0, 10, (shape[0],))
        loss_fn: Callable = nn.functional.cross_entropy
    else:  # a layer: reproduce a target feature map (local distillation's MSE)
        target = torch.randn(shape)
        loss_fn = nn.functional.mse_loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    return step, counter.get_total_flops() / 1e9


def time_steps(step: Callable, threads: int, steps: int, warmup: int) -> list[float]:
    torch.set_num_threads(threads)
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def busy_process(active: bool) -> Iterator[None]:
    """One pure-Python busy loop in a subprocess while active (killed afterwards)."""
    if not active:
        yield
        return
    # The loop ends by itself once this process is gone (killed benchmarks left it running).
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(os.getpid())])
    try:
        time.sleep(1.0)  # let it reach the CPU before the policy samples the load
        yield
    finally:
        proc.kill()
        proc.wait()


def policy_threads(gflop: float) -> dict[str, Any]:
    """What a stage would choose now: the stage-start policy, then the tiny-step rule."""
    reset_state()
    cfg = OmegaConf.create(
        {"runtime": {"threads": "auto", "tiny_step_gflop": DEFAULT_TINY_STEP_GFLOP}}
    )
    apply_thread_policy(cfg)
    choice = refine_for_work(gflop, DEFAULT_TINY_STEP_GFLOP)
    return choice.to_dict()


def load() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_others(condition: str, limit_s: float) -> float:
    """Wait (at most ``limit_s``) until other processes use under 0.3 cores beyond our own
    busy loop; return what they used at the end (recorded beside each figure)."""
    allowed = 0.3 + (1.0 if condition == "busy" else 0.0)
    deadline = time.monotonic() + limit_s
    while True:
        busy = others_busy_cores(0.5)
        if busy < allowed or time.monotonic() >= deadline:
            return round(busy, 2)


def run_steps(args: argparse.Namespace, cores: int) -> dict[str, Any]:
    fixed = list(range(1, cores + 1))
    steps = {name: make_step(*spec) for name, spec in MODELS.items()}
    samples: dict[str, list[float]] = {}
    blocks: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for condition in ("quiet", "busy"):
            with busy_process(condition == "busy"):
                for name, (step, gflop) in steps.items():
                    choice = policy_threads(gflop)
                    settings = [("default", TORCH_DEFAULT_THREADS)]
                    settings += [(f"fixed {n}", n) for n in fixed]
                    settings.append(("policy", choice["threads"]))
                    for label, threads in settings:
                        others = wait_for_others(condition, args.quiet_wait)
                        before = load()
                        times = time_steps(step, threads, args.steps, args.warmup)
                        key = f"{name}|{condition}|{label}"
                        samples.setdefault(key, []).extend(times)
                        blocks.append(
                            {
                                "repeat": rep,
                                "model": name,
                                "condition": condition,
                                "setting": label,
                                "threads": threads,
                                "median_ms": round(1000 * statistics.median(times), 2),
                                "loadavg_before": before,
                                "loadavg_after": load(),
                                "others_busy_before": others,
                                **({"policy": choice} if label == "policy" else {}),
                            }
                        )
                        print(
                            f"  [{rep}] {condition:5} {name:38} {label:8} ({threads} thr): "
                            f"{blocks[-1]['median_ms']:8.1f} ms  load {before:.2f}, "
                            f"others {others:.2f}",
                            flush=True,
                        )
    table: dict[str, Any] = {}
    for name, (_, gflop) in steps.items():
        row: dict[str, Any] = {"step_gflop": round(gflop, 3)}
        for condition in ("quiet", "busy"):
            row[condition] = {
                key.split("|")[2]: round(1000 * statistics.median(vals), 2)
                for key, vals in samples.items()
                if key.startswith(f"{name}|{condition}|")
            }
        q, b = row["quiet"], row["busy"]
        best_fixed = min(v for k, v in q.items() if k.startswith("fixed"))
        row["ratios"] = {
            "default busy/quiet": round(b["default"] / q["default"], 2),
            "policy busy/quiet": round(b["policy"] / q["policy"], 2),
            "policy quiet / best fixed quiet": round(q["policy"] / best_fixed, 2),
            "default busy / policy busy": round(b["default"] / b["policy"], 2),
        }
        row["targets"] = {
            "policy busy <= 1.3x policy quiet": row["ratios"]["policy busy/quiet"] <= 1.3,
            "policy quiet <= 1.05x best fixed": row["ratios"]["policy quiet / best fixed quiet"]
            <= 1.05,
        }
        row["policy_threads"] = {
            c: sorted(
                {
                    blk["threads"]
                    for blk in blocks
                    if blk["model"] == name and blk["condition"] == c and blk["setting"] == "policy"
                }
            )
            for c in ("quiet", "busy")
        }
        table[name] = row
    return {"table": table, "blocks": blocks}


def run_crossover(args: argparse.Namespace, cores: int) -> list[dict[str, Any]]:
    rows = []
    for name, spec in CROSSOVER.items():
        step, gflop = make_step(*spec)
        one, many, others = [], [], []
        for _ in range(args.repeats):  # alternate so drifting load hits both alike
            others.append(wait_for_others("quiet", args.quiet_wait))
            one += time_steps(step, 1, args.steps, args.warmup)
            others.append(wait_for_others("quiet", args.quiet_wait))
            many += time_steps(step, cores, args.steps, args.warmup)
        row = {
            "model": name,
            "step_gflop": round(gflop, 4),
            "ms_1_thread": round(1000 * statistics.median(one), 2),
            f"ms_{cores}_threads": round(1000 * statistics.median(many), 2),
            "speedup": round(statistics.median(one) / statistics.median(many), 2),
            "loadavg": load(),
            "others_busy_before": others,
        }
        rows.append(row)
        print(f"  crossover {name:36} {row}", flush=True)
    return rows


def run_quickstart(args: argparse.Namespace, cores: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("WANDB_MODE", "offline")
    runs: dict[str, Any] = {}
    plan = [("quiet", "auto", None), ("busy", "auto", None)]
    if args.quickstart_default_limit > 0:
        plan.append(("busy", str(cores), args.quickstart_default_limit))
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        for condition, threads, limit in plan:
            label = f"{condition} runtime.threads={threads}"
            out = Path(tmp) / label.replace(" ", "_").replace("=", "")
            cmd = [sys.executable, "-m", "tnexp.cli", f"runtime.threads={threads}"]
            cmd.append(f"hydra.run.dir={out}")
            with busy_process(condition == "busy"):
                others = wait_for_others(condition, args.quiet_wait)
                before = load()
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(
                        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
                    )
                    wall, rc = time.perf_counter() - t0, proc.returncode
                except subprocess.TimeoutExpired:
                    wall, rc = time.perf_counter() - t0, "timeout"
            # The quickstart's own summary has no runtime record; its stages' results do.
            records = [json.loads(p.read_text()) for p in out.rglob("results.json")]
            chosen = sorted({r["runtime"]["threads"] for r in records if "runtime" in r})
            runs[label] = {
                "wall_s": round(wall, 1),
                "returncode": rc,
                "loadavg_before": before,
                "loadavg_after": load(),
                "others_busy_before": others,
                "stage_threads": chosen,
                "command": " ".join(["tnexp", *cmd[3:]]),
            }
            print(f"  quickstart {label}: {runs[label]}", flush=True)
    quiet, busy = runs["quiet runtime.threads=auto"], runs["busy runtime.threads=auto"]
    runs["busy/quiet (policy)"] = round(busy["wall_s"] / quiet["wall_s"], 2)
    runs["target busy <= 2x quiet"] = runs["busy/quiet (policy)"] <= 2.0
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-quickstart", action="store_true")
    parser.add_argument("--no-crossover", action="store_true")
    parser.add_argument("--no-steps", action="store_true")
    parser.add_argument("--quickstart-default-limit", type=float, default=0.0)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait before each block for other processes to go quiet (< 0.3 "
        "cores besides the benchmark's own busy loop); then it measures anyway",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    cores = usable_cores()
    started = _dt.datetime.now(_dt.UTC)
    result: dict[str, Any] = {
        "command": "uv run python benchmarks/bench_threads.py " + " ".join(sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "usable_cores": cores,
            "cpu_count": os.cpu_count(),
            "torch_default_threads": TORCH_DEFAULT_THREADS,
            "omp_num_threads_at_start": OMP_AT_START,
            "loadavg_at_start": os.getloadavg(),
        },
    }
    print(f"{cores} usable cores, torch default {TORCH_DEFAULT_THREADS} threads", flush=True)
    if not args.no_crossover:
        result["crossover"] = run_crossover(args, cores)
    if not args.no_steps:
        result["steps"] = run_steps(args, cores)
    if not args.no_quickstart:
        result["quickstart"] = run_quickstart(args, cores)
    result["environment"]["loadavg_at_end"] = os.getloadavg()
    result["minutes"] = round((_dt.datetime.now(_dt.UTC) - started).total_seconds() / 60, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "steps" in result:
        print(json.dumps(result["steps"]["table"], indent=2))
    if "quickstart" in result:
        print(json.dumps(result["quickstart"], indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
