"""Peak memory of the memory-bounded (block-by-block) local mode vs the normal local mode.

Model SmolLM2-135M (``model=smollm2_135m``, MLPs as 2-site MPOs: ``tensorize=mpo_llama_mlp``,
slices = the 30 MLP blocks), data ``data=stdlib_text``. Each mode runs in a fresh
subprocess that measures its own memory:

* host: the resident-set high-water mark (``VmHWM`` in ``/proc/self/status``). Imports,
  the tokenizer and the tokenised data are the same in every mode, so after them the
  worker resets the mark (``/proc/self/clear_refs``, Linux >= 4.0) and reports
  ``base`` (resident memory then), ``peak`` (the mark after training) and
  ``net = peak - base`` (what the method itself added). ``ru_maxrss`` of the whole
  process is reported too;
* device: ``torch.cuda.max_memory_allocated`` when CUDA is available.

Modes: ``normal`` (LocalDistillation + Lightning, online teacher features: teacher, student
and every slice's activations resident), ``bounded_disk`` (offload=disk: the teacher is
read block by block from safetensors, activations spill to disk) and ``bounded_cpu``
(offload=cpu: teacher and student in host memory, one block on the device). For
``bounded_disk`` the mark is also read after the trained student is assembled
(``peak_with_student``): the assembled student is a whole model again.

The teacher is exported once, in its own process before the measurements (``--prepare``,
skipped when the files exist): loading the GGUF dequantizes the whole model, so every
measured process starts from that export (``save_pretrained``: config.json +
model.safetensors), the normal mode through ``from_pretrained`` as ``tnexp`` loads it.

    uv run python benchmarks/bench_memory_bounded.py                       # full
    uv run python benchmarks/bench_memory_bounded.py --quick --no-write    # smoke check

Writes docs/benchmarks/memory_bounded.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "memory_bounded.json"
MODES = ("normal", "bounded_disk", "bounded_cpu")
MIB = 1024 * 1024


# ------------------------------------------------------------------ memory probes
def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


# ------------------------------------------------------------------ config
def _compose(args: argparse.Namespace):
    from hydra import compose, initialize_config_dir

    from tnexp.config import CONFIG_DIR

    overrides = [
        "method=local",
        "model=smollm2_135m",
        f"model.name={args.teacher_dir}",  # the export: config.json + model.safetensors
        "model.tokenizer=smollm2-135m",  # the tokenizer still comes from the GGUF package
        "data=stdlib_text",
        "tensorize=mpo_llama_mlp",
        # Memory of the training modes, not of the init: the data-free balanced MPO (the
        # config's data- and loss-aware defaults need calibration, refused in disk mode).
        "tensorize.init=svd",
        "tensorize.layout=balanced",
        "tensorize.allocation=uniform",
        "tensorize.weighting=none",
        "tensorize.calibration.compensate=false",
        f"method.slicing={args.slicing}",
        f"method.local.batch_size={args.batch_size}",
        f"data.batch_size={args.batch_size}",
        f"data.seq_len={args.seq_len}",
        f"data.num_sequences={args.num_sequences}",
        "data.num_val_sequences=2",
        f"trainer.max_epochs={args.epochs}",
        "logger=csv",
        "callbacks.progress_bar=none",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


# ------------------------------------------------------------------ worker (one mode)
def worker(args: argparse.Namespace) -> dict:
    import gc

    import lightning as L
    import torch

    from tnexp.config import plain as _plain
    from tnexp.factory import tensorize
    from tnexp.memory_bounded import BlockwiseConfig, build_skeleton, distill_blockwise
    from tnexp.modules import LocalConfig
    from tnexp.stages.build import build_datamodule, build_task, load_teacher
    from tnexp.stages.student import tensorize_spec
    from tnexp.stages.train import build_module

    torch.set_num_threads(args.threads)
    cfg = _compose(args)
    L.seed_everything(int(cfg.seed), verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    task = build_task(cfg)
    spec = tensorize_spec(cfg)
    local = LocalConfig(**_plain(cfg.method.local))
    cuda = torch.cuda.is_available()
    gc.collect()
    reset = _reset_peak()
    base = _status()["VmRSS"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out: dict = {"mode": args.worker, "peak_reset": reset}
    if args.worker == "normal":
        teacher = load_teacher(cfg)  # from_pretrained(export dir), as run_stage does
        student, _ = tensorize(teacher, spec)
        module = build_module(cfg, teacher, student, task)
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="auto",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
        out["steps"] = int(trainer.global_step)
    else:
        offload = args.worker.removeprefix("bounded_")
        work = Path(tempfile.mkdtemp(prefix="bench-mb-"))
        config = BlockwiseConfig(
            offload=offload,
            work_dir=work,
            epochs=args.epochs,
            progress=False,
            assemble=False,
        )
        if offload == "disk":
            teacher = build_skeleton(cfg.model)  # config only: no weights are read here
            student = None
            weights = Path(args.teacher_dir) / "model.safetensors"
        else:
            teacher = load_teacher(cfg)
            student = tensorize(teacher, spec)
            weights = None
        result = distill_blockwise(
            teacher,
            spec,
            datamodule.train_dataloader(),
            task,
            granularity=_plain(cfg.method.slicing),
            local=local,
            config=config,
            teacher_weights=weights,
            student=student,
        )
        out["steps"] = result.steps_per_stage
        out["stages"] = len(result.stages)
        out["peak_before_student"] = _status()["VmHWM"]
        result.assemble()
        shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = time.perf_counter() - started
    status = _status()
    out["base"] = base
    if "peak_before_student" in out:
        out["peak"] = out.pop("peak_before_student")
        out["peak_with_student"] = status["VmHWM"]
        out["net_with_student"] = status["VmHWM"] - base
    else:
        out["peak"] = status["VmHWM"]
    out["net"] = out["peak"] - base
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["cuda_peak"] = int(torch.cuda.max_memory_allocated()) if cuda else None
    return out


# ------------------------------------------------------------------ parent
def prepare(teacher_dir: Path) -> None:
    """Export SmolLM2-135M once (its own process: loading the GGUF dequantizes it all)."""
    if (teacher_dir / "model.safetensors").is_file() and (teacher_dir / "config.json").is_file():
        return
    # save_pretrained refuses GGUF-loaded models: write the config and the weights apart.
    code = (
        "import sys; from tnexp.models.hf import build_causal_lm;"
        "from tnexp.memory_bounded import export_teacher_weights;"
        "m = build_causal_lm('smollm2-135m');"
        "m.config.__dict__.pop('quantization_config', None);"  # the export is plain float
        "m.config.save_pretrained(sys.argv[1]);"
        "export_teacher_weights(m, sys.argv[1] + '/model.safetensors')"
    )
    subprocess.run([sys.executable, "-c", code, str(teacher_dir)], check=True, cwd=ROOT)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--teacher-dir",
        str(args.teacher_dir),
        *_shared_flags(args),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"mode {mode} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--num-sequences",
        str(args.num_sequences),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--slicing",
        args.slicing,
        "--threads",
        str(args.threads),
    ]


def table(results: dict[str, dict]) -> str:
    head = (
        f"{'mode':<13} {'base MiB':>9} {'peak MiB':>9} {'net MiB':>8} "
        f"{'+student':>9} {'maxrss MiB':>11} {'CUDA MiB':>9} {'steps':>6} {'s':>7}"
    )
    rows = [head, "-" * len(head)]
    for mode, r in results.items():
        cuda = "-" if r.get("cuda_peak") is None else f"{_mib(r['cuda_peak']):.1f}"
        with_student = "-" if "peak_with_student" not in r else f"{_mib(r['peak_with_student'])}"
        rows.append(
            f"{mode:<13} {_mib(r['base']):>9} {_mib(r['peak']):>9} {_mib(r['net']):>8} "
            f"{with_student:>9} {_mib(r['ru_maxrss']):>11} {cuda:>9} {r['steps']:>6} "
            f"{r['seconds']:>7.1f}"
        )
    return "\n".join(rows)


def ratios(results: dict[str, dict]) -> dict[str, float]:
    normal = results.get("normal")
    out: dict[str, float] = {}
    if not normal:
        return out
    for mode, r in results.items():
        if mode == "normal":
            continue
        out[f"{mode}/normal peak"] = round(r["peak"] / normal["peak"], 3)
        out[f"{mode}/normal net"] = round(r["net"] / normal["net"], 3)
        if "peak_with_student" in r:
            out[f"{mode}/normal peak incl. assembled student"] = round(
                r["peak_with_student"] / normal["peak"], 3
            )
        if r.get("cuda_peak") and normal.get("cuda_peak"):
            out[f"{mode}/normal CUDA"] = round(r["cuda_peak"] / normal["cuda_peak"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--teacher-dir", type=Path, default=None)
    parser.add_argument("--num-sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--slicing", default="block")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.num_sequences, args.seq_len, args.batch_size = 4, 32, 2
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.teacher_dir = args.teacher_dir or Path(tempfile.gettempdir()) / "tnexp-smollm2-export"
    load_before = os.getloadavg()
    t0 = time.time()
    prepare(args.teacher_dir)
    print(f"teacher export: {args.teacher_dir} ({time.time() - t0:.0f} s)")
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(mode, args)
        print(f"{mode}: {results[mode]['seconds']:.1f} s")
    print(table(results))
    for key, value in ratios(results).items():
        print(f"{key}: {value}")
    import torch

    record = {
        "benchmark": "memory-bounded vs normal local mode, SmolLM2-135M, MPO MLPs",
        "command": " ".join(["uv run python benchmarks/bench_memory_bounded.py", *sys.argv[1:]]),
        "settings": {
            "num_sequences": args.num_sequences,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "slicing": args.slicing,
            "threads": args.threads,
            "tensorize": "mpo_llama_mlp (overall_cr 0.3)",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # Memory does not depend on other processes; the seconds do.
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "units": "bytes (MiB in the table)",
        "results": results,
        "ratios": ratios(results),
    }
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
