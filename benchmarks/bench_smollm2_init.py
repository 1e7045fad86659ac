"""SmolLM2-135M right after data-aware tensorization: with and without slice compensation.

Token perplexity (sliding window 512 / stride 256, first 8,192 validation tokens of
``stdlib_text``) of the whitened low-rank init at an overall CR, then of the same student
after :mod:`tnexp.compensation` refits every ``down_proj`` from the compressed
``gate_proj``/``up_proj`` activations; per-layer errors before/after go to the JSON.

    OMP_NUM_THREADS=1 uv run python benchmarks/bench_smollm2_init.py --cr 0.3 \
        --batches 32 --out docs/results/smollm2_compensation.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tnexp.config import CONFIG_DIR
from tnexp.stages.build import build_datamodule, build_task, load_teacher
from tnexp.stages.evaluate import evaluate_language_model
from tnexp.stages.student import build_student, compensate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr", type=float, default=0.3)
    parser.add_argument("--batches", type=int, default=32, help="calibration batches (8x128)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
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
    started = time.perf_counter()
    result = compensate(cfg, teacher, student, datamodule, task)
    compensation_s = time.perf_counter() - started
    compensated = evaluate_language_model(cfg, datamodule, student.eval(), "final")["token_ppl"]
    rows = result.layers
    before = sum(r["before"] for r in rows.values()) / len(rows)
    after = sum(r["after"] for r in rows.values()) / len(rows)
    print(
        f"compensated: token ppl {compensated:.2f} ({compensation_s:.0f} s); down_proj error "
        f"from student inputs {before:.3f} -> {after:.3f} (mean of {len(rows)})",
        flush=True,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": "benchmarks/bench_smollm2_init.py " + " ".join(os.sys.argv[1:]),
            "load_average": os.getloadavg(),
            "model_cr": report.model_cr,
            "token_ppl": {"whitened": whitened, "compensated": compensated},
            "seconds": {"build": build_s, "compensation": compensation_s},
            "layers": rows,
        }
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
