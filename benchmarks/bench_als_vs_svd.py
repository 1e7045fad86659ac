"""Per-layer output error of init ``als`` against init ``svd``, layer by layer, whole models.

Issue 10's target "als <= svd on every layer": the factory report's ``output_error``
(``||X(W-W')|| / ||XW||`` on the calibration inputs) of both inits, on

* the quickstart ResNet (a pretrained ``teacher.safetensors`` of ``method=pretrain``,
  digits, Tucker-2 on every ``layer*.*.conv*`` at ``--crs``, 64 calibration batches);
* a SmolLM2-shaped made Llama (hidden 576, intermediate 1536, 2 decoder layers, random
  weights, random tokens: 16 batches of 8 x 128), every MLP projection a balanced 2-site
  MPO at per-layer CR 0.506 (SmolLM2's overall CR 0.3).

    OMP_NUM_THREADS=1 uv run python benchmarks/bench_als_vs_svd.py \
        --teacher <pretrain run>/teacher.safetensors --out docs/results/als_vs_svd.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tnexp.calibration import collect_input_stats
from tnexp.config import CONFIG_DIR
from tnexp.factory import TensorizeSpec, plan_layers, tensorize
from tnexp.stages.build import build_datamodule, build_task, load_teacher
from tnexp.stages.student import calibration_stats, tensorize_spec


def compare(svd, als) -> dict:
    rows = [
        {"layer": s.name, "svd": s.output_error, "als": a.output_error}
        for s, a in zip(svd.layers, als.layers, strict=True)
    ]
    worse = [r["layer"] for r in rows if r["als"] > r["svd"]]
    return {"layers": rows, "als_worse_on": worse, "all_als_le_svd": not worse}


def resnet(teacher: Path, cr: float, work: Path) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "method=local",
                f"teacher.path={teacher}",
                f"tensorize.cr={cr}",
                "tensorize.init=als",
                "callbacks.progress_bar=none",
                f"paths.output_dir={work}",
                f"paths.cache_dir={work}/cache",
            ],
        )
    datamodule, task = build_datamodule(cfg), build_task(cfg)
    model = load_teacher(cfg).eval()
    spec = tensorize_spec(cfg)
    stats = calibration_stats(cfg, model, spec, datamodule, task)
    _, als = tensorize(model, spec, stats=stats)
    rules = [{**vars(r), "init": "svd"} for r in spec.rules]
    _, svd = tensorize(model, {**spec.to_dict(), "rules": rules}, stats=stats)
    return compare(svd, als)


def smollm2_shaped(cr: float) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (8, 128), generator=g)} for _ in range(16)]
    rule = {"pattern": "model.layers.*.mlp.*_proj", "cr": cr, "layout": "balanced"}
    spec = {"rules": [{**rule, "init": "als"}]}
    names = [p.name for p in plan_layers(model, TensorizeSpec.from_config(spec))]
    stats = collect_input_stats(model, names, batches, model_inputs=lambda b: b, num_batches=16)
    _, als = tensorize(model, spec, stats=stats)
    _, svd = tensorize(model, {"rules": [{**rule, "init": "svd"}]}, stats=stats)
    return compare(svd, als)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--crs", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-als-"))
    record: dict = {
        "command": "benchmarks/bench_als_vs_svd.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
    }
    for cr in args.crs:
        record[f"quickstart_cr{cr}"] = result = resnet(args.teacher, cr, work / str(cr))
        print(f"quickstart CR {cr}: als <= svd on every layer: {result['all_als_le_svd']}")
        for r in result["layers"]:
            print(f"  {r['layer']:<22} svd {r['svd']:.4f}  als {r['als']:.4f}")
    record["smollm2_shaped_cr0.506"] = result = smollm2_shaped(0.506)
    print(f"SmolLM2-shaped MLPs CR 0.506: als <= svd on every layer: {result['all_als_le_svd']}")
    for r in result["layers"]:
        print(f"  {r['layer']:<28} svd {r['svd']:.4f}  als {r['als']:.4f}")
    record["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
