"""Where does the FLOP-based contraction planner pick a slow order? (investigation)

For MPOLinear at the GPT-2 XL MLP shapes (CR 0.48, 2 sites) and token counts around the
FLOP crossover of ``dense`` and the core-by-core orders, this times every order
(forward+backward and forward-only), reports the achieved GFLOP/s per order (FLOPs from
``contraction_costs``), and what ``auto`` chose. It also compares the merged-inference GEMM
layouts at 1 and 64 tokens. Uses the timing harness of ``bench_layers.py``.

    uv run python benchmarks/mpo_order_sweep.py [--tokens 1 4 8 16 24 32 64]
        [--out docs/benchmarks/mpo_order_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layers as bl

from tnexp.tn.mpo import MPOLinear

ORDERS = ("dense", "left_to_right", "right_to_left", "optimal")


def sweep_shape(i: int, o: int, args, kw: dict, res: dict) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(i, o)
    mpo = MPOLinear.from_linear(dense, cr=0.48, num_sites=2, init="random")
    for tokens in args.tokens:
        x = torch.randn(tokens, i, requires_grad=True)
        g = torch.randn(tokens, o)
        costs = {k: int(v) for k, v in mpo.contraction_costs(tokens).items()}
        variants = {"auto": bl.fwd_bwd_step(mpo, x, g)}
        variants.update({od: bl.fwd_bwd_step(mpo, x, g, order=od) for od in ORDERS})
        t = bl.bench_interleaved(variants, label=f"{i}x{o} T={tokens} fwd+bwd", **kw)
        mpo(x)
        choice = mpo.last_order
        xf = x.detach()

        def fwd(order, xf=xf):
            def f():
                with torch.no_grad():
                    mpo(xf, order=order)

            return f

        tf = bl.bench_interleaved(
            {od: fwd(od) for od in ORDERS}, label=f"{i}x{o} T={tokens} fwd", **kw
        )
        best = min(ORDERS, key=lambda k: t[k]["median_s"])
        res["sweep"][f"{i}x{o}/{tokens}"] = r = {
            "flops": costs,
            "auto_choice": choice,
            "best_forced": best,
            "fwdbwd": t,
            "fwd": tf,
            "fwd_gflops_per_s": {k: costs[k] / tf[k]["median_s"] / 1e9 for k in ORDERS},
            "auto_vs_best": bl.paired_ratio(t["auto"], t[best]),
            "auto_choice_vs_best": t[choice]["median_s"] / t[best]["median_s"],
        }
        print(
            f"{i}x{o} T={tokens}: auto={choice} best={best} "
            f"auto/best={r['auto_vs_best']['ratio']:.2f} "
            f"(choice/best by forced timings {r['auto_choice_vs_best']:.2f}); fwd GFLOP/s "
            + " ".join(f"{k}={v:.0f}" for k, v in r["fwd_gflops_per_s"].items()),
            flush=True,
        )
    with torch.no_grad():
        w_io = mpo.weight_in_out().detach().contiguous()
        w_oi = w_io.t().contiguous()
        b = mpo.bias.detach()
    for tokens in (1, 64):
        x = torch.randn(tokens, i)

        def nograd(fn):
            def f():
                with torch.no_grad():
                    fn()

            return f

        t = bl.bench_interleaved(
            {
                "nn.Linear": nograd(lambda x=x: dense(x)),
                "addmm_in_out (current merged)": nograd(lambda x=x: torch.addmm(b, x, w_io)),
                "F.linear_out_in": nograd(lambda x=x: F.linear(x, w_oi, b)),
            },
            label=f"{i}x{o} merged layout T={tokens}",
            **{**kw, "repeats": max(args.repeats, 9)},
        )
        res["merged_layout"][f"{i}x{o}/{tokens}"] = {
            "timings": t,
            "addmm_in_out_vs_dense": bl.paired_ratio(
                t["addmm_in_out (current merged)"], t["nn.Linear"]
            ),
            "linear_out_in_vs_dense": bl.paired_ratio(t["F.linear_out_in"], t["nn.Linear"]),
        }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-sample-time", type=float, default=0.2)
    p.add_argument("--quiet-threshold", type=float, default=0.15)
    p.add_argument("--max-wait", type=float, default=600.0)
    p.add_argument("--wait-budget", type=float, default=3600.0)
    p.add_argument("--out", default="docs/benchmarks/mpo_order_sweep.json")
    args = p.parse_args()
    if args.quiet_threshold >= 0:
        bl.GATE.threshold, bl.GATE.max_wait, bl.GATE.budget = (
            args.quiet_threshold,
            args.max_wait,
            args.wait_budget,
        )
    dev = torch.device("cpu")
    kw = dict(device=dev, repeats=args.repeats, warmup=1, min_sample_s=args.min_sample_time)
    res = {"environment": bl.environment(dev), "sweep": {}, "merged_layout": {}}
    for i, o in bl.MPO_SHAPES:
        sweep_shape(i, o, args, kw, res)
    res["quiet_gate"] = {"waited_s": bl.GATE.waited, "gave_up": bl.GATE.gave_up}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
