"""SmolLM2-135M right after data-aware tensorization: with and without slice compensation.

Token perplexity (sliding window 512 / stride 256, first 8,192 validation tokens of
``stdlib_text``) of the whitened low-rank init at an overall CR, then of the same student
after :mod:`tnexp.compensation`: ``slice`` refits every ``down_proj`` from the compressed
``gate_proj``/``up_proj`` activations of the same MLP; ``chain`` refits every projection
of every decoder layer from the compressed model's own activations (chained slices, each
from the same whitened init); per-layer errors before/after go to the JSON.
``--weighting fisher`` weights each layer's output channels by the teacher's output Fisher
(``--fisher-batches`` forward + backward passes), ``--allocation adaptive`` spends the
budget by the (weighted) whitened spectra.

    OMP_NUM_THREADS=1 uv run python benchmarks/bench_smollm2_init.py --cr 0.3 \
        --batches 32 --modes slice chain --out docs/results/smollm2_compensation.json
    OMP_NUM_THREADS=1 uv run python benchmarks/bench_smollm2_init.py --cr 0.3 \
        --batches 32 --weighting fisher --allocation adaptive --modes slice \
        --out docs/results/smollm2_fisher_adaptive.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tnexp.config import CONFIG_DIR
from tnexp.factory import plan_layers, save_tensorized, solve_overall_cr
from tnexp.stages.build import build_datamodule, build_task, load_teacher
from tnexp.stages.evaluate import evaluate_language_model
from tnexp.stages.student import build_student, compensate, tensorize_spec
from tnexp.tn.ranks import mpo_bond_dim_for_cr


def uniform_rank(teacher: torch.nn.Module, cfg) -> int:
    """The rank uniform allocation gives the spec's first layer at its overall CR (every
    SmolLM2 projection has the same size, so the same rank)."""
    spec = tensorize_spec(cfg)
    planned = plan_layers(teacher, spec)
    cr = solve_overall_cr(teacher, planned, spec.overall_cr)
    return mpo_bond_dim_for_cr(planned[0].in_factors, planned[0].out_factors, cr)


def plot_ranks(record: dict, path: Path) -> Path:
    """Per-layer ranks across depth (one line per projection) beside the uniform rank."""
    import re

    from tnexp.analysis.report import new_figure

    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot()
    by_kind: dict[str, list[tuple[int, int]]] = {}
    for name, rank in record["ranks"].items():
        match = re.search(r"layers\.(\d+)\..*\.(\w+_proj)$", name)
        if match:
            by_kind.setdefault(match.group(2), []).append((int(match.group(1)), rank))
    for kind, points in sorted(by_kind.items()):
        points.sort()
        ax.plot([d for d, _ in points], [r for _, r in points], marker="o", ms=3, label=kind)
    if record.get("uniform_rank"):
        ax.axhline(record["uniform_rank"], color="grey", ls="--", label="uniform")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("rank (bond dimension)")
    ax.set_title(
        f"SmolLM2-135M ranks at CR {record['model_cr']:.2f}: allocation {record['allocation']}, "
        f"weighting {record['weighting']}"
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr", type=float, default=0.3)
    parser.add_argument("--batches", type=int, default=32, help="calibration batches (8x128)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="*", choices=["slice", "chain"], default=["slice"])
    parser.add_argument("--weighting", choices=["none", "fisher"], default="none")
    parser.add_argument("--fisher-batches", type=int, default=8)
    parser.add_argument("--allocation", choices=["uniform", "adaptive"], default="uniform")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        help="save each compensated student under SAVE/<mode> (start runs from it with "
        "student.path=SAVE/<mode>)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [
        "method=local",
        "model=smollm2_135m",
        "data=stdlib_text",
        "tensorize=mpo_llama_mlp",
        f"tensorize.overall_cr={args.cr}",
        "tensorize.init=whiten",
        "tensorize.layout=lowrank",
        "tensorize.calibration.compensate=false",  # applied by hand below, to measure both
        f"tensorize.calibration.num_batches={args.batches}",
        f"tensorize.weighting={args.weighting}",
        f"tensorize.calibration.fisher_batches={args.fisher_batches}",
        f"tensorize.allocation={args.allocation}",
        "data.seq_len=128",
        "data.batch_size=8",
        "eval.perplexity.max_length=512",
        "eval.perplexity.stride=256",
        "eval.perplexity.max_tokens=8192",
        "callbacks.progress_bar=none",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    datamodule, task = build_datamodule(cfg), build_task(cfg)
    teacher = load_teacher(cfg).eval()
    started = time.perf_counter()
    student, report = build_student(cfg, teacher, datamodule, task, progress=False)
    build_s = time.perf_counter() - started
    whitened = evaluate_language_model(cfg, datamodule, student.eval(), "final")["token_ppl"]
    print(f"whitened init: token ppl {whitened:.2f} ({build_s:.0f} s)", flush=True)
    record: dict = {
        "command": "benchmarks/bench_smollm2_init.py " + " ".join(os.sys.argv[1:]),
        "model_cr": report.model_cr,
        "weighting": args.weighting,
        "allocation": args.allocation,
        "ranks": {layer.name: layer.bond_dim for layer in report.layers},
        "token_ppl": {"whitened": whitened},
        "seconds": {"build": build_s},
        "layers": {},
    }
    for mode in args.modes:
        chain = mode == "chain"
        mode_cfg = copy.deepcopy(cfg)
        mode_cfg.tensorize.calibration.compensate_chain = chain
        mode_cfg.tensorize.calibration.compensate_slicing = "decoder" if chain else "block"
        compensated_student = copy.deepcopy(student)
        started = time.perf_counter()
        result = compensate(mode_cfg, teacher, compensated_student, datamodule, task)
        seconds = time.perf_counter() - started
        ppl = evaluate_language_model(cfg, datamodule, compensated_student.eval(), "final")
        rows = result.layers
        before = sum(r["before"] for r in rows.values()) / len(rows)
        after = sum(r["after"] for r in rows.values()) / len(rows)
        print(
            f"compensated ({mode}): token ppl {ppl['token_ppl']:.2f} ({seconds:.0f} s); layer "
            f"error from student inputs {before:.3f} -> {after:.3f} (mean of {len(rows)})",
            flush=True,
        )
        key = "compensated" if mode == "slice" else "compensated_chain"
        record["token_ppl"][key] = ppl["token_ppl"]
        record["seconds"][key] = seconds
        record["layers"][mode] = rows
        if args.save:
            save_tensorized(compensated_student, report, args.save / mode)
        del compensated_student
    record["load_average"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        if args.allocation == "adaptive":
            record["uniform_rank"] = uniform_rank(teacher, cfg)
            plot_ranks(record, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
