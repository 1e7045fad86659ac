"""Layer benchmark for the foundation issue: MPOLinear vs nn.Linear, TuckerConv2d vs nn.Conv2d.

Every comparison is a ratio of two timings taken in the same run, interleaved repeat by
repeat (the variants of one case take turns, in a rotating order), so slow drifts of the
machine hit both sides of a ratio alike. Each figure is the median over ``--repeats``
samples; a sample times ``inner`` back-to-back calls (``inner`` calibrated after warm-up so
that one sample lasts at least ``--min-sample-time`` seconds) and is reported per call.

Usage::

    uv run python benchmarks/bench_layers.py [--device cpu|cuda] [--repeats N] [--quick]
        [--out docs/benchmarks/layers.json]

Cases:

* MPOLinear (2 sites, per-layer CR 0.48, bond dimension from paper eq. 11) vs nn.Linear at
  the GPT-2 XL MLP shapes 1600->6400 and 6400->1600, for 1, 64 and 8192 tokens:
  forward+backward with the automatic order (by FLOPs, and timed once per token count:
  ``calibrate=True``) and with each forced order, and inference
  (forward only, ``torch.no_grad()``, eval) with the merged weight.
* TuckerConv2d vs nn.Conv2d (3x3, padding 1, no bias as in ResNet-34) at the ResNet-34
  stage shapes, CR 0.5 and 0.7, forward+backward: ``order="auto"`` (timed once per shape,
  the choice reported) and each forced path (``factored``: three convs, ``merged``: one conv
  with the rebuilt kernel).

A forced MPO order is skipped (and the skip is reported) when its FLOP estimate from
``contraction_costs`` exceeds ``--max-flop-ratio`` times the cheapest order, or when its
largest intermediate would not fit in the device memory available.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import opt_einsum
import torch
from torch import nn

from tnexp.tn.mpo import MPOLinear
from tnexp.tn.ranks import mpo2_bond_dim_eq11, tucker2_ranks_for_cr
from tnexp.tn.tucker import TuckerConv2d

FORCED_ORDERS = ("dense", "left_to_right", "right_to_left", "optimal")
MPO_SHAPES = ((1600, 6400), (6400, 1600))
RESNET34_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels, pixels)

TARGET_AUTO_VS_BEST = 1.10
TARGET_FWDBWD_8192 = 1.15
TARGET_MERGED_1TOK = 1.00
TARGET_TUCKER_CR05 = 0.65  # at 256/512 channels
TARGET_TUCKER_CR05_NARROW = 1.00  # at 64/128 channels: never slower than dense


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall, machine-wide busy CPU seconds, this process's CPU seconds), Linux only."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / _CLK_TCK
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system


def foreign_load(before, after) -> float | None:
    """Share of the machine's CPUs used by other processes (or stolen) between two snapshots.

    Other jobs on the same cores inflate timings; this is recorded next to every figure so
    a reader can tell a quiet measurement from a contended one.
    """
    if before is None or after is None:
        return None
    wall = after[0] - before[0]
    foreign = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, foreign / (wall * (os.cpu_count() or 1))) if wall > 0 else None


class QuietGate:
    """Waits, before each sample, until other processes leave the CPUs (mostly) alone.

    On a shared machine other jobs come and go; a sample taken while they run measures the
    contention, not the layer. Before every sample the foreign CPU load is probed over
    ``window`` seconds; while it is above ``threshold`` the gate sleeps, at most
    ``max_wait`` seconds per sample and ``budget`` seconds in the whole run (after that it
    stops waiting). The foreign load during each sample is recorded either way.
    """

    def __init__(
        self,
        threshold: float | None,
        window: float,
        max_wait: float,
        budget: float,
        confirm: int = 2,
    ):
        self.threshold, self.window, self.confirm = threshold, window, confirm
        self.max_wait, self.budget = max_wait, budget
        self.waited = 0.0
        self.gave_up = 0

    def wait(self) -> None:
        if self.threshold is None or self.budget - self.waited <= 0:
            return
        start = time.perf_counter()
        quiet_windows = 0
        while True:
            before = _cpu_snapshot()
            time.sleep(self.window)
            load = foreign_load(before, _cpu_snapshot())
            spent = time.perf_counter() - start
            quiet_windows = quiet_windows + 1 if load is None or load <= self.threshold else 0
            if quiet_windows >= self.confirm:
                break
            if spent >= self.max_wait or self.waited + spent >= self.budget:
                self.gave_up += 1
                break
        self.waited += time.perf_counter() - start


GATE = QuietGate(None, 0.5, 0.0, 0.0)
PRECALL_BELOW_S = 0.5  # calls shorter than this get one untimed call before each sample


def bench_interleaved(
    variants: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    min_sample_s: float,
    label: str = "",
) -> dict[str, dict]:
    """Time each variant ``repeats`` times, taking turns; seconds per call for every sample."""
    inner: dict[str, int] = {}
    precall: dict[str, bool] = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        calls = []
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            calls.append(time.perf_counter() - t0)
            if calls[-1] >= PRECALL_BELOW_S:
                break
        once = statistics.median(calls)
        inner[name] = max(1, math.ceil(min_sample_s / max(once, 1e-9)))
        precall[name] = once < PRECALL_BELOW_S
    names = list(variants)
    rng = random.Random(1234)
    samples: dict[str, list[float]] = {n: [] for n in names}
    loads: dict[str, list[float | None]] = {n: [] for n in names}
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)  # no variant always follows the same (cache-evicting) neighbour
        for name in order:
            fn, k = variants[name], inner[name]
            if device.type == "cpu":
                GATE.wait()
            if precall[name]:  # short calls: time the steady state, not the cold first call
                fn()
            _sync(device)
            snap = _cpu_snapshot()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / k)
            loads[name].append(foreign_load(snap, _cpu_snapshot()))
    out = {}
    for name in names:
        s = samples[name]
        out[name] = {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "samples_s": s,
            "inner": inner[name],
            "untimed_call_before_sample": precall[name],
            "foreign_cpu_load": loads[name],
        }
    if label:
        summary = ", ".join(f"{n}={out[n]['median_s'] * 1e3:.2f}ms" for n in names)
        load = mean_load(out)
        load_txt = f" (foreign CPU load {load:.0%})" if load is not None else ""
        print(f"  [{label}] {summary}{load_txt}", flush=True)
    return out


def mean_load(timings: dict) -> float | None:
    vals = [v for t in timings.values() for v in t.get("foreign_cpu_load", []) if v is not None]
    return statistics.fmean(vals) if vals else None


def paired_ratio(num: dict, den: dict) -> dict:
    """Ratio of medians plus the spread of the per-repeat (paired) ratios."""
    pairs = sorted(a / b for a, b in zip(num["samples_s"], den["samples_s"], strict=True))
    threshold = GATE.threshold if GATE.threshold is not None else 0.1
    quiet = sorted(
        a / b
        for a, b, la, lb in zip(
            num["samples_s"],
            den["samples_s"],
            num.get("foreign_cpu_load", []),
            den.get("foreign_cpu_load", []),
            strict=False,
        )
        if la is not None and lb is not None and la <= threshold and lb <= threshold
    )
    q = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) >= 2 else [pairs[0]] * 3
    return {
        "ratio": num["median_s"] / den["median_s"],
        "ratio_of_mins": num["min_s"] / den["min_s"],
        "paired_min": pairs[0],
        "paired_q1": q[0],
        "paired_median": statistics.median(pairs),
        "paired_q3": q[2],
        "paired_max": pairs[-1],
        "quiet_pairs": len(quiet),
        "quiet_paired_median": statistics.median(quiet) if quiet else None,
        "quiet_threshold": threshold,
    }


def fmt_ratio(r: dict) -> str:
    return f"{r['ratio']:.2f} [{r['paired_min']:.2f}-{r['paired_max']:.2f}]"


def fmt_load(timings: dict) -> str:
    load = mean_load(timings)
    return "n/a" if load is None else f"{load:.0%}"


def fmt_time(t: float) -> str:
    if t >= 1.0:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} us"


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    env = {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "opt_einsum": opt_einsum.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "git": git_revision(),
        "loadavg_at_start": loadavg(),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        env["device_name"] = env["cpu_model"]
    return env


# --------------------------------------------------------------------------- MPO
def largest_intermediate(mpo: MPOLinear, tokens: int, order: str) -> int:
    """Elements of the biggest tensor an order creates (the weight itself for ``dense``)."""
    if order == "dense":
        return mpo.in_features * mpo.out_features
    planner = mpo._planner  # benchmark-only peek at the planner's equation and paths
    shapes = [(tokens, *planner.in_factors), *planner._core_shapes]
    if order in ("left_to_right", "right_to_left"):
        optimize = planner._explicit_path(order)
    else:
        optimize = "optimal" if planner.num_sites <= 4 else "dp"
    info = opt_einsum.contract_path(
        planner._input_equation(), *shapes, shapes=True, optimize=optimize
    )[1]
    return int(info.largest_intermediate)


def fwd_bwd_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, **kw) -> Callable:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        layer(x, **kw).backward(grad)

    return step


def fwd_only(layer: nn.Module, x: torch.Tensor) -> Callable:
    def step():
        with torch.no_grad():
            layer(x)

    return step


def bench_mpo(args, device: torch.device, results: dict) -> None:
    dtype = torch.float32
    elem = torch.finfo(dtype).bits // 8
    mem = available_memory_bytes(device)
    for in_dim, out_dim in MPO_SHAPES:
        key = f"{in_dim}x{out_dim}"
        if args.mpo_shapes and key not in args.mpo_shapes:
            continue
        torch.manual_seed(0)
        dense = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        mpo = MPOLinear.from_linear(dense, cr=args.mpo_cr, num_sites=2, init="random")
        timed = copy.deepcopy(mpo)
        timed.calibrate = True
        eq11 = mpo2_bond_dim_eq11(mpo.in_factors, mpo.out_factors, args.mpo_cr)
        mpo_params = sum(c.numel() for c in mpo.cores)
        entry = {
            "in": in_dim,
            "out": out_dim,
            "in_factors": mpo.in_factors,
            "out_factors": mpo.out_factors,
            "bonds": mpo.bonds,
            "bond_dim_eq11": eq11,
            "cr_target": args.mpo_cr,
            "cr_achieved": 1 - mpo_params / (in_dim * out_dim),
            "train": {},
            "inference": {},
        }
        print(
            f"\nMPOLinear {key}: factors in={mpo.in_factors} out={mpo.out_factors} "
            f"bonds={mpo.bonds} (eq. 11: {eq11:.1f}), CR {entry['cr_achieved']:.4f}",
            flush=True,
        )
        for tokens in args.tokens:
            torch.manual_seed(1)
            x = torch.randn(tokens, in_dim, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(tokens, out_dim, device=device, dtype=dtype)
            costs = {k: int(v) for k, v in mpo.contraction_costs(tokens).items()}
            best_flops = min(costs.values())
            variants = {
                "nn.Linear": fwd_bwd_step(dense, x, g),
                "auto": fwd_bwd_step(mpo, x, g),
                "auto_timed": fwd_bwd_step(timed, x, g),  # first (warm-up) call times
            }
            skipped = {}
            for order in FORCED_ORDERS:
                flop_ratio = costs[order] / best_flops
                inter_bytes = largest_intermediate(mpo, tokens, order) * elem
                if flop_ratio > args.max_flop_ratio:
                    skipped[order] = (
                        f"FLOP estimate {flop_ratio:.1f}x the cheapest order "
                        f"(> {args.max_flop_ratio:g}x)"
                    )
                elif mem is not None and 3 * inter_bytes > mem:
                    skipped[order] = (
                        f"largest intermediate {inter_bytes / 2**30:.1f} GiB (x3 for autograd) "
                        f"exceeds the {mem / 2**30:.1f} GiB available "
                        f"(FLOP estimate {flop_ratio:.1f}x the cheapest order)"
                    )
                else:
                    variants[order] = fwd_bwd_step(mpo, x, g, order=order)
            for order, why in skipped.items():
                print(f"  skip {key} tokens={tokens} order={order}: {why}", flush=True)
            timings = bench_interleaved(
                variants,
                device=device,
                repeats=args.repeats,
                warmup=args.warmup,
                min_sample_s=args.min_sample_time,
                label=f"{key} fwd+bwd tokens={tokens}",
            )
            mpo(x)  # the planner's choice for this token count (cached)
            chosen = mpo.last_order
            timed(x)  # the timed choice (cached since the warm-up)
            timed_choice = timed.last_order
            forced = {o: timings[o] for o in FORCED_ORDERS if o in timings}
            best_forced = min(forced, key=lambda o: forced[o]["median_s"])
            entry["train"][str(tokens)] = {
                "flops": costs,
                "auto_choice": chosen,
                "auto_timed_choice": timed_choice,
                "auto_timed_vs_best_forced": paired_ratio(
                    timings["auto_timed"], timings[best_forced]
                ),
                "auto_timed_vs_dense": paired_ratio(timings["auto_timed"], timings["nn.Linear"]),
                "best_forced": best_forced,
                "skipped": skipped,
                "timings": timings,
                "auto_vs_best_forced": paired_ratio(timings["auto"], timings[best_forced]),
                "auto_vs_dense": paired_ratio(timings["auto"], timings["nn.Linear"]),
                "forced_vs_dense": {
                    o: paired_ratio(t, timings["nn.Linear"]) for o, t in forced.items()
                },
            }
            del x, g
        # ------------------------------------------------------------ inference
        dense.eval()
        unmerged = copy.deepcopy(mpo).eval()
        merged = copy.deepcopy(mpo).eval()
        merged.merge_for_inference()
        for tokens in args.tokens:
            torch.manual_seed(1)
            x = torch.randn(tokens, in_dim, device=device, dtype=dtype)
            with torch.no_grad():
                ref = dense(x)
                err = (merged(x) - unmerged(x)).abs().max().item() / ref.abs().max().item()
            timings = bench_interleaved(
                {
                    "nn.Linear": fwd_only(dense, x),
                    "merged": fwd_only(merged, x),
                    "unmerged_auto": fwd_only(unmerged, x),
                },
                device=device,
                repeats=args.repeats,
                warmup=args.warmup,
                min_sample_s=args.min_sample_time,
                label=f"{key} inference tokens={tokens}",
            )
            unmerged(x)
            entry["inference"][str(tokens)] = {
                "timings": timings,
                "unmerged_auto_choice": unmerged.last_order,
                "merged_vs_unmerged_max_rel_diff": err,
                "merged_vs_dense": paired_ratio(timings["merged"], timings["nn.Linear"]),
                "unmerged_vs_dense": paired_ratio(timings["unmerged_auto"], timings["nn.Linear"]),
            }
        results["mpo"][key] = entry
        del dense, mpo, timed, unmerged, merged


# --------------------------------------------------------------------------- Tucker
def bench_tucker(args, device: torch.device, results: dict) -> None:
    dtype = torch.float32
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    for channels, pixels in conv_shapes(args.conv_shapes):
        key = f"{channels}ch_{pixels}px"
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=device, dtype=dtype)
        conv = conv.to(memory_format=layout)
        x = torch.randn(args.batch, channels, pixels, pixels, device=device, dtype=dtype)
        x = x.contiguous(memory_format=layout).requires_grad_()
        g = torch.randn_like(x)
        variants = {"nn.Conv2d": fwd_bwd_step(conv, x, g)}
        ranks, autos, flop_choice = {}, {}, {}
        for cr in args.tucker_crs:
            tucker = TuckerConv2d.from_conv(conv, cr=cr, init="random").to(memory_format=layout)
            costs = tucker.costs(tuple(x.shape))
            flop_choice[str(cr)] = min(costs, key=costs.__getitem__)
            ranks[str(cr)] = list(tucker2_ranks_for_cr(channels, channels, (3, 3), cr))
            autos[str(cr)] = tucker
            variants[f"tucker_cr{cr}"] = fwd_bwd_step(tucker, x, g)  # auto: warm-up times
            for path in ("factored", "merged"):
                forced = copy.deepcopy(tucker)
                forced.order = path
                variants[f"tucker_cr{cr}_{path}"] = fwd_bwd_step(forced, x, g)
        timings = bench_interleaved(
            variants,
            device=device,
            repeats=args.repeats,
            warmup=args.warmup,
            min_sample_s=args.min_sample_time,
            label=f"conv {key} batch={args.batch} fwd+bwd",
        )
        results["tucker"][key] = {
            "channels": channels,
            "pixels": pixels,
            "batch": args.batch,
            "ranks_out_in": ranks,
            "channels_last": args.channels_last,
            "auto_choice": {cr: layer.last_order for cr, layer in autos.items()},
            "flop_choice": flop_choice,
            "timings": timings,
            "vs_dense": {
                str(cr): paired_ratio(timings[f"tucker_cr{cr}"], timings["nn.Conv2d"])
                for cr in args.tucker_crs
            },
            "paths_vs_dense": {
                str(cr): {
                    path: paired_ratio(timings[f"tucker_cr{cr}_{path}"], timings["nn.Conv2d"])
                    for path in ("factored", "merged")
                }
                for cr in args.tucker_crs
            },
        }
        del x, g


def conv_shapes(keys: list[str] | None) -> list[tuple[int, int]]:
    """(channels, pixels) per ``--conv-shapes`` key like ``64ch_32px``; ResNet-34's by default."""
    if not keys:
        return list(RESNET34_SHAPES)
    shapes = []
    for key in keys:
        channels, _, pixels = key.partition("ch_")
        if not (channels.isdigit() and pixels.endswith("px") and pixels[:-2].isdigit()):
            raise SystemExit(f"--conv-shapes: {key!r} is not like 64ch_32px")
        shapes.append((int(channels), int(pixels[:-2])))
    return shapes


def best_path_ratio(entry: dict, cr: str, choice: str) -> dict:
    """A Tucker path's time over the quicker forced path's (1.0 when it is the quicker one)."""
    tm = entry["timings"]
    best = min(("factored", "merged"), key=lambda p: tm[f"tucker_cr{cr}_{p}"]["median_s"])
    return paired_ratio(tm[f"tucker_cr{cr}_{choice}"], tm[f"tucker_cr{cr}_{best}"]) | {"best": best}


# --------------------------------------------------------------------------- report
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def evaluate_targets(args, results: dict) -> list[dict]:
    targets = []
    for key, entry in results.get("mpo", {}).items():
        for tokens, t in sorted(entry["train"].items(), key=lambda kv: int(kv[0])):
            r = t["auto_vs_best_forced"]
            targets.append(
                {
                    "target": f"MPO {key} tokens={tokens}: auto (chose {t['auto_choice']}) within "
                    f"10% of best forced ({t['best_forced']})",
                    "value": r["ratio"],
                    "spread": [r["paired_min"], r["paired_max"]],
                    "ratio_of_mins": r["ratio_of_mins"],
                    "quiet": (r["quiet_paired_median"], r["quiet_pairs"]),
                    "limit": TARGET_AUTO_VS_BEST,
                    "status": verdict(r["ratio"] <= TARGET_AUTO_VS_BEST),
                }
            )
            if "auto_timed_vs_best_forced" in t:
                r = t["auto_timed_vs_best_forced"]
                targets.append(
                    {
                        "target": f"MPO {key} tokens={tokens}: timed auto (chose "
                        f"{t['auto_timed_choice']}) within 10% of best forced ({t['best_forced']})",
                        "value": r["ratio"],
                        "spread": [r["paired_min"], r["paired_max"]],
                        "ratio_of_mins": r["ratio_of_mins"],
                        "quiet": (r["quiet_paired_median"], r["quiet_pairs"]),
                        "limit": TARGET_AUTO_VS_BEST,
                        "status": verdict(r["ratio"] <= TARGET_AUTO_VS_BEST),
                    }
                )
        if "8192" in entry["train"]:
            r = entry["train"]["8192"]["auto_vs_dense"]
            targets.append(
                {
                    "target": f"MPO {key} tokens=8192: fwd+bwd (auto) / nn.Linear <= 1.15",
                    "value": r["ratio"],
                    "spread": [r["paired_min"], r["paired_max"]],
                    "ratio_of_mins": r["ratio_of_mins"],
                    "quiet": (r["quiet_paired_median"], r["quiet_pairs"]),
                    "limit": TARGET_FWDBWD_8192,
                    "status": verdict(r["ratio"] <= TARGET_FWDBWD_8192),
                }
            )
        if "1" in entry["inference"]:
            r = entry["inference"]["1"]["merged_vs_dense"]
            if r["ratio"] <= TARGET_MERGED_1TOK:
                status = "PASS"
            elif r["paired_q1"] <= TARGET_MERGED_1TOK:
                status = "PASS (within noise)"
            else:
                status = "FAIL"
            targets.append(
                {
                    "target": f"MPO {key} tokens=1: merged inference / nn.Linear <= 1.0",
                    "value": r["ratio"],
                    "spread": [r["paired_min"], r["paired_max"]],
                    "ratio_of_mins": r["ratio_of_mins"],
                    "quiet": (r["quiet_paired_median"], r["quiet_pairs"]),
                    "limit": TARGET_MERGED_1TOK,
                    "status": status,
                }
            )
    tucker = results.get("tucker", {})
    if tucker and 0.5 in args.tucker_crs:
        for key, entry in tucker.items():
            r = entry["vs_dense"]["0.5"]
            limit = TARGET_TUCKER_CR05_NARROW if entry["channels"] <= 128 else TARGET_TUCKER_CR05
            choice = entry.get("auto_choice", {}).get("0.5", "?")
            targets.append(
                {
                    "target": f"Tucker CR 0.5 {key}: fwd+bwd auto (chose {choice}) / nn.Conv2d "
                    f"<= {limit:.2f}",
                    "value": r["ratio"],
                    "spread": [r["paired_min"], r["paired_max"]],
                    "ratio_of_mins": r["ratio_of_mins"],
                    "quiet": (r["quiet_paired_median"], r["quiet_pairs"]),
                    "limit": limit,
                    "status": verdict(r["ratio"] <= limit),
                }
            )
        for key, entry in tucker.items():
            for cr in map(str, args.tucker_crs):
                for how, choice in (
                    ("timed", entry["auto_choice"][cr]),
                    ("FLOP", entry.get("flop_choice", {}).get(cr)),
                ):
                    if choice is None:
                        continue
                    r = best_path_ratio(entry, cr, choice)
                    targets.append(
                        {
                            "target": f"Tucker CR {cr} {key}: {how} choice ({choice}) within "
                            f"10% of the quicker path ({r['best']})",
                            "value": r["ratio"],
                            "spread": [r["paired_min"], r["paired_max"]],
                            "ratio_of_mins": r["ratio_of_mins"],
                            "quiet": (r["quiet_paired_median"], r["quiet_pairs"]),
                            "limit": TARGET_AUTO_VS_BEST,
                            "status": verdict(r["ratio"] <= TARGET_AUTO_VS_BEST),
                        }
                    )
        total_t = sum(e["timings"]["tucker_cr0.5"]["median_s"] for e in tucker.values())
        total_d = sum(e["timings"]["nn.Conv2d"]["median_s"] for e in tucker.values())
        targets.append(
            {
                "target": "Tucker CR 0.5, sum over the four stage shapes: <= 0.65",
                "value": total_t / total_d,
                "spread": None,
                "limit": TARGET_TUCKER_CR05,
                "status": verdict(total_t / total_d <= TARGET_TUCKER_CR05),
            }
        )
    return targets


def timed_cell(t: dict) -> str:
    if "auto_timed" not in t["timings"]:
        return "-"  # a JSON from before timed auto existed
    return f"{fmt_time(t['timings']['auto_timed']['median_s'])} ({t['auto_timed_choice']})"


def markdown(args, results: dict, targets: list[dict]) -> str:
    env = results["environment"]
    lines = [
        f"Device: {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"threads {env['torch_num_threads']}, repeats {args.repeats}, warm-up {args.warmup}, "
        f"date {env['date_utc']}."
        + (
            f" Merged from {len(results['runs'])} runs ("
            + ", ".join(r["date_utc"] for r in results["runs"] if r)
            + "); every case records its own run in the JSON."
            if len(results.get("runs", [])) > 1
            else ""
        ),
        "",
        "Ratios are median(variant) / median(reference) from interleaved runs; brackets give "
        "the min-max of the per-repeat ratios.",
        "",
    ]
    if results.get("mpo"):
        lines += [
            "**MPOLinear vs nn.Linear, forward+backward** (times per call; ratio to nn.Linear)",
            "",
            "| shape | tokens | nn.Linear | auto (choice) | auto/dense | timed auto (choice) "
            "| dense | left_to_right | right_to_left | optimal | auto/best forced "
            "| timed/best forced | foreign load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, entry in results["mpo"].items():
            for tokens, t in sorted(entry["train"].items(), key=lambda kv: int(kv[0])):
                tm = t["timings"]
                cells = []
                for o in FORCED_ORDERS:
                    if o in tm:
                        ratio = t["forced_vs_dense"][o]["ratio"]
                        cells.append(f"{fmt_time(tm[o]['median_s'])} ({ratio:.2f}x)")
                    else:
                        cells.append("skipped")
                lines.append(
                    f"| {key} | {tokens} | {fmt_time(tm['nn.Linear']['median_s'])} "
                    f"| {fmt_time(tm['auto']['median_s'])} ({t['auto_choice']}) "
                    f"| {fmt_ratio(t['auto_vs_dense'])} "
                    f"| {timed_cell(t)} | " + " | ".join(cells) + " | "
                    f"{fmt_ratio(t['auto_vs_best_forced'])} vs {t['best_forced']} "
                    f"| {fmt_ratio(t['auto_timed_vs_best_forced']) if 'auto_timed' in tm else '-'} "
                    f"| {fmt_load(tm)} |"
                )
        lines += [
            "",
            "**MPOLinear inference (forward only, no_grad, eval) vs nn.Linear**",
            "",
            "| shape | tokens | nn.Linear | merged | merged/dense | unmerged auto (choice) "
            "| unmerged/dense | foreign load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, entry in results["mpo"].items():
            for tokens, t in sorted(entry["inference"].items(), key=lambda kv: int(kv[0])):
                tm = t["timings"]
                lines.append(
                    f"| {key} | {tokens} | {fmt_time(tm['nn.Linear']['median_s'])} "
                    f"| {fmt_time(tm['merged']['median_s'])} | {fmt_ratio(t['merged_vs_dense'])} "
                    f"| {fmt_time(tm['unmerged_auto']['median_s'])} "
                    f"({t['unmerged_auto_choice']}) | {fmt_ratio(t['unmerged_vs_dense'])} "
                    f"| {fmt_load(tm)} |"
                )
        lines += ["", "**FLOP estimates (contraction_costs, forward, GFLOP)**", ""]
        lines += [
            "| shape | tokens | dense | left_to_right | right_to_left | optimal | skipped |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, entry in results["mpo"].items():
            for tokens, t in sorted(entry["train"].items(), key=lambda kv: int(kv[0])):
                f = t["flops"]
                skipped = "; ".join(f"{o}: {why}" for o, why in t["skipped"].items()) or "-"
                lines.append(
                    f"| {key} | {tokens} | "
                    + " | ".join(f"{f[o] / 1e9:.2f}" for o in FORCED_ORDERS)
                    + f" | {skipped} |"
                )
    if results.get("tucker"):
        crs = [str(c) for c in args.tucker_crs]
        lines += [
            "",
            "**TuckerConv2d vs nn.Conv2d (3x3, pad 1), forward+backward, batch "
            f"{'/'.join(sorted({str(e['batch']) for e in results['tucker'].values()}))}**",
            "",
            "| shape | nn.Conv2d | "
            + " | ".join(
                f"CR {c} ranks (out,in) | CR {c} auto time (choice) | CR {c} auto ratio "
                f"| CR {c} factored ratio | CR {c} merged ratio"
                for c in crs
            )
            + " | foreign load |",
            "|---|---|" + "---|---|---|---|---|" * len(crs) + "---|",
        ]
        for key, entry in results["tucker"].items():
            tm = entry["timings"]
            cells = []
            for c in crs:
                paths = entry.get("paths_vs_dense", {}).get(c, {})
                cells += [
                    str(tuple(entry["ranks_out_in"][c])),
                    f"{fmt_time(tm[f'tucker_cr{c}']['median_s'])} "
                    f"({entry.get('auto_choice', {}).get(c, '?')})",
                    fmt_ratio(entry["vs_dense"][c]),
                    fmt_ratio(paths["factored"]) if "factored" in paths else "-",
                    fmt_ratio(paths["merged"]) if "merged" in paths else "-",
                ]
            lines.append(
                f"| {key} | {fmt_time(tm['nn.Conv2d']['median_s'])} | "
                + " | ".join(cells)
                + f" | {fmt_load(tm)} |"
            )
    lines += [
        "",
        "**Targets** (median ratio [min-max of per-repeat ratios]; ratio of the fastest samples "
        "for reference)",
        "",
        "| target | measured | ratio of mins | quiet pairs: median (n) | limit | result |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        spread = f" [{t['spread'][0]:.2f}-{t['spread'][1]:.2f}]" if t["spread"] else ""
        mins = f"{t['ratio_of_mins']:.2f}" if t.get("ratio_of_mins") is not None else "-"
        quiet = "-"
        if t.get("quiet"):
            med, n = t["quiet"]
            quiet = f"{med:.2f} ({n})" if med is not None else f"- ({n})"
        lines.append(
            f"| {t['target']} | {t['value']:.2f}{spread} | {mins} | {quiet} | {t['limit']:.2f} "
            f"| {t['status']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--repeats", type=int, default=None, help="samples per variant (5; 3 with --quick)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="warm-up calls (+1 calibration call)",
    )
    p.add_argument(
        "--min-sample-time",
        type=float,
        default=0.2,
        help="seconds one sample lasts at least (fast calls are looped)",
    )
    p.add_argument("--quick", action="store_true", help="tokens 1,64,1024; conv batch 16")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="MPO token counts")
    p.add_argument("--batch", type=int, default=None, help="conv batch (128; 16 with --quick)")
    p.add_argument("--mpo-cr", type=float, default=0.48)
    p.add_argument("--tucker-crs", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--max-flop-ratio", type=float, default=50.0)
    p.add_argument("--only", choices=["mpo", "tucker"], default=None)
    p.add_argument("--mpo-shapes", nargs="+", default=None, help="subset, e.g. 1600x6400")
    p.add_argument(
        "--conv-shapes", nargs="+", default=None, help="e.g. 64ch_32px (default: ResNet-34's)"
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="Tucker part: input, dense conv and Tucker layers in channels_last memory format",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="update the cases measured now in an existing --out file instead of replacing it "
        "(to re-measure one section, e.g. after a contended run); each case keeps its own "
        "run stamp",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="CPU only: before each sample wait until other processes use at most this share "
        "of the CPUs (negative: never wait)",
    )
    p.add_argument("--max-wait", type=float, default=30.0, help="seconds of waiting per sample")
    p.add_argument("--wait-budget", type=float, default=600.0, help="seconds of waiting per run")
    p.add_argument("--out", default="docs/benchmarks/layers.json")
    p.add_argument("--md-out", default=None, help="also write the Markdown tables here")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.tokens is None:
        args.tokens = [1, 64, 1024] if args.quick else [1, 64, 8192]
    if args.batch is None:
        args.batch = 16 if args.quick else 128
    if args.quick:
        args.min_sample_time = min(args.min_sample_time, 0.05)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quiet_threshold >= 0:
        GATE.threshold, GATE.max_wait, GATE.budget = (
            args.quiet_threshold,
            args.max_wait,
            args.wait_budget,
        )
    results: dict = {
        "environment": environment(device),
        "args": vars(args),
        "mpo": {},
        "tucker": {},
    }
    env = results["environment"]
    print(
        f"torch {env['torch']} on {env['device_name']}; torch threads {env['torch_num_threads']} "
        f"({'--threads' if args.threads else 'default, not changed'}), "
        f"interop {env['torch_num_interop_threads']}; "
        f"repeats {args.repeats}, warm-up {args.warmup}",
        flush=True,
    )
    t0 = time.perf_counter()
    if args.only in (None, "mpo"):
        bench_mpo(args, device, results)
    if args.only in (None, "tucker"):
        print(flush=True)
        bench_tucker(args, device, results)
    results["wall_time_s"] = time.perf_counter() - t0
    results["environment"]["loadavg_at_end"] = loadavg()
    results["quiet_gate"] = {
        "threshold": GATE.threshold,
        "waited_s": GATE.waited,
        "samples_taken_without_quiet": GATE.gave_up,
    }
    stamp = {
        "date_utc": env["date_utc"],
        "repeats": args.repeats,
        "git": env["git"],
        "quiet_gate": results["quiet_gate"],
    }
    for entry in results["mpo"].values():
        for part in ("train", "inference"):
            for case in entry[part].values():
                case["run"] = stamp
    for entry in results["tucker"].values():
        entry["run"] = stamp
    if args.merge and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        runs = previous.get("runs", [previous.get("environment")])
        mpo = previous.get("mpo", {})
        for key, entry in results["mpo"].items():
            if key in mpo:  # keep token counts not measured now
                for part in ("train", "inference"):
                    entry[part] = {**mpo[key].get(part, {}), **entry[part]}
            mpo[key] = entry
        results["mpo"] = mpo
        results["tucker"] = {**previous.get("tucker", {}), **results["tucker"]}
        results["runs"] = [*runs, env]
    else:
        results["runs"] = [env]
    targets = evaluate_targets(args, results)
    results["targets"] = targets
    md = markdown(args, results, targets)
    print("\n" + md)
    print(
        f"\nwall time {results['wall_time_s']:.0f} s (of which {GATE.waited:.0f} s waiting for "
        f"other processes to leave the CPUs; {GATE.gave_up} samples taken without quiet)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    if args.md_out:
        Path(args.md_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md_out).write_text(md + "\n")
        print(f"wrote {args.md_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
