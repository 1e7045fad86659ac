"""Cost of verifying feature-cache checksums on read, against a cached local epoch.

Setup as in ``bench_training.py`` (resnet): ``small_resnet(width=16, in_channels=1)`` on
``DigitsDataModule(image_size=16)`` (1,437 training images), Tucker-2 CR 0.5 on every block
convolution, 4 block slices, features cached in float16 (shards of ``--shard-size``).

Each round trains one cached local epoch with a real ``lightning.Trainer`` twice, on fresh
``FeatureCacheDataset`` objects so that every shard is verified (the worst case: a
one-epoch run; in longer runs a shard is verified only on its first read): once with
verification (the default) and once with ``FeatureCacheDataset._verify`` disabled, in
alternating order. It also times the verification alone (hashing every cached tensor of
the plan once). Reported: medians (and minima) over ``--rounds`` of the epoch wall time
with and without, and the verification time alone as a share of the epoch; on a busy
machine the A/B difference is mostly noise, the hashing time alone is the robust figure.

Usage::

    uv run python benchmarks/bench_checksums.py [--rounds 5] [--out docs/benchmarks/checksums.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tnexp.data import DigitsDataModule
from tnexp.data.phased import PhasedDataModule
from tnexp.factory import tensorize
from tnexp.features import (
    open_feature_cache,
    teacher_fingerprint,
    write_feature_cache,
)
from tnexp.integrity import tensor_checksum
from tnexp.models import small_resnet
from tnexp.modules import LocalConfig, LocalDistillation
from tnexp.modules.optim import OptimizerConfig
from tnexp.slicing import make_slice_plan
from tnexp.tasks import ClassificationTask

SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5, "init": "svd"}]}


def epoch_seconds(teacher, plan, dm, cache_dir: Path, verify: bool, batch_size: int) -> float:
    """Wall time of one cached local epoch (fresh student, fresh cache dataset)."""
    student, _ = tensorize(teacher, SPEC)
    local = LocalConfig(optimizer=OptimizerConfig(name="adam", lr=1e-3), batch_size=batch_size)
    module = LocalDistillation(
        student, ClassificationTask(10), teacher=teacher, plan=plan, local=local
    )
    cache = open_feature_cache(
        cache_dir, teacher_fingerprint=teacher_fingerprint(teacher), plan=plan, dtype="float16"
    )
    if not verify:
        cache._verify = lambda *args: None  # the instance only: this epoch skips it
    data = PhasedDataModule(dm, feature_cache=cache)
    data.set_phase("local", batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def verify_seconds(cache_dir: Path, plan) -> tuple[float, int]:
    """Time to hash every tensor of the plan once (what verification adds), and bytes."""
    cache = open_feature_cache(cache_dir, plan=plan)
    cache._verify = lambda *args: None  # load without verifying; hash below, timed alone
    shards = [cache._shard(i) for i in range(len(cache.manifest.shards))]
    start = time.perf_counter()
    for tensors in shards:
        for t in tensors.values():
            tensor_checksum(t)
    seconds = time.perf_counter() - start
    return seconds, sum(t.numel() * t.element_size() for s in shards for t in s.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.manual_seed(0)
    teacher = small_resnet(width=16, in_channels=1, num_classes=10).eval()
    student, _ = tensorize(teacher, SPEC)
    plan = make_slice_plan(student, "block")
    dm = DigitsDataModule(image_size=16, batch_size=args.batch_size)
    dm.setup("fit")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        write_feature_cache(
            cache_dir,
            teacher,
            plan,
            DataLoader(dm.train_set, batch_size=64, shuffle=False),
            dataset_identity=dm.identity(),
            dtype="float16",
            shard_size=args.shard_size,
            progress=False,
        )
        epoch_seconds(teacher, plan, dm, cache_dir, True, args.batch_size)  # warm-up
        on: list[float] = []
        off: list[float] = []
        hashing: list[float] = []
        for round_ in range(args.rounds):
            order = (True, False) if round_ % 2 == 0 else (False, True)
            for verify in order:
                seconds = epoch_seconds(teacher, plan, dm, cache_dir, verify, args.batch_size)
                (on if verify else off).append(seconds)
            hashing.append(verify_seconds(cache_dir, plan)[0])
        nbytes = verify_seconds(cache_dir, plan)[1]
    result: dict[str, Any] = {
        "setup": {
            "model": "small_resnet(width=16, in_channels=1), digits 16x16, 4 block slices",
            "samples": len(dm.train_set),
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "cache_dtype": "float16",
            "cached_bytes_hashed": nbytes,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M UTC", time.gmtime()),
        },
        "epoch_s_verify": on,
        "epoch_s_no_verify": off,
        "verify_only_s": hashing,
        "median_epoch_s_verify": statistics.median(on),
        "median_epoch_s_no_verify": statistics.median(off),
        "median_verify_only_s": statistics.median(hashing),
    }
    result["overhead_epoch_ratio"] = (
        result["median_epoch_s_verify"] / result["median_epoch_s_no_verify"] - 1
    )
    result["overhead_ratio_of_mins"] = min(on) / min(off) - 1
    result["load_average"] = os.getloadavg()
    result["verify_share_of_epoch"] = (
        result["median_verify_only_s"] / result["median_epoch_s_no_verify"]
    )
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
