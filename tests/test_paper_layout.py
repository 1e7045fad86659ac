"""The CIFAR paper experiments compose from one shared layout (configs/experiment/paper/cifar/)
to the same configs as the former per-data-set mirror files: every key value checked."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tnexp.cli import CONFIG_DIR
from tnexp.schema import MemoryBoundedSettings, OptimizerSettings, SliceJobsSettings

# row: method, CR, data.train_subset, run_name (None: teacher/profile keep the defaults)
ROWS: dict[str, tuple[str, float | None, int | None, str]] = {
    "teacher": ("pretrain", None, None, "teacher"),
    "profile": ("profile", 0.5, None, "profile"),
    "local_cr0.5": ("local", 0.5, None, "local-cr0.5-50k"),
    "local_cr0.5_10k": ("local", 0.5, 10000, "local-cr0.5-10k"),
    "local_cr0.5_30k": ("local", 0.5, 30000, "local-cr0.5-30k"),
    "local_cr0.7": ("local", 0.7, None, "local-cr0.7-50k"),
    "global_cr0.5": ("global", 0.5, None, "global-cr0.5-50k"),
    "global_cr0.7": ("global", 0.7, None, "global-cr0.7-50k"),
    "hybrid_cr0.7": ("hybrid", 0.7, None, "hybrid-cr0.7-50k"),
}
# What the paper chose per data set (local learning rate, global batch size).
CHOSEN = {"cifar10": (1.0e-3, 16), "cifar100": (5.0e-4, 64)}
EXCLUDE = "${tnexp.sensitive_layers:${paths.runs_dir}/${experiment_name}/profile,4}"
RUN_DIR = "${paths.runs_dir}/${experiment_name}/${run_name}"
# The optimizer keys a paper row leaves at their schema defaults (tnexp/schema.py).
OPTIMIZER = dataclasses.asdict(OptimizerSettings())


def expected(dataset: str, row: str) -> dict[str, Any]:
    method, cr, subset, run_name = ROWS[row]
    local_lr, global_bs = CHOSEN[dataset]
    out: dict[str, Any] = {
        "experiment_name": f"{dataset}_resnet34",
        "run_name": run_name,
        "data.info.name": dataset,
        "data.num_workers": 4,
        "data.train_subset": subset,
        "model._target_": "tnexp.models.cifar_resnet34",
        "method.name": method,
        "teacher.path": "${paths.runs_dir}/${experiment_name}/teacher",
        "hydra.run.dir": RUN_DIR,
        "hydra.sweep.dir": RUN_DIR,
        "hydra.sweep.subdir": "${hydra.job.num}",
    }
    if cr is not None:
        out["tensorize.cr"] = cr
    if method == "pretrain":
        out["method.global"] = {
            "batch_size": 128,
            "optimizer": {
                **OPTIMIZER,
                "name": "sgd",
                "lr": 0.1,
                "momentum": 0.9,
                "weight_decay": 5.0e-4,
                "scheduler": "cosine",
            },
        }
        out["trainer.max_epochs"] = 200
    elif method == "profile":
        out["method.k"] = 4
    else:
        out |= {"tensorize.init": "random", "tensorize.exclude": EXCLUDE}
        out["trainer.max_epochs"] = 20
    if method in ("local", "hybrid"):
        out["method.local.batch_size"] = 8
        out["method.local.optimizer"] = {**OPTIMIZER, "name": "adam", "lr": local_lr}
    if method in ("global", "hybrid"):
        out["method.global.batch_size"] = global_bs
        out["method.global.optimizer"] = {**OPTIMIZER, "name": "adam", "lr": 5.0e-4}
    if method == "hybrid":
        out["method.local_epochs"] = 5
    # slice jobs and the memory-bounded mode: method=local only (tnexp/schema.py defaults)
    if method == "local":
        out["method.slice_jobs"] = dataclasses.asdict(SliceJobsSettings())
        out["method.memory_bounded"] = dataclasses.asdict(MemoryBoundedSettings())
    return out


@pytest.mark.parametrize("dataset", sorted(CHOSEN))
def test_every_cifar_paper_experiment_composes_to_its_table_row(dataset):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for row in ROWS:
            cfg = compose(
                "train", overrides=[f"experiment=paper/{dataset}/{row}"], return_hydra_config=True
            )
            for key, value in expected(dataset, row).items():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                got = node._get_node(leaf)._value()  # unresolved: interpolations as written
                got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
                assert got == value, f"paper/{dataset}/{row}: {key} = {got!r}, want {value!r}"
            if ROWS[row][0] != "local":
                assert "slice_jobs" not in cfg.method and "memory_bounded" not in cfg.method
