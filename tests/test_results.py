"""The results schema (tnexp/results.py) and the trainer/logger/callbacks config groups."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import OmegaConf, open_dict
from stages import make_cfg

from tnexp.callbacks import OptimizationTimer
from tnexp.results import (
    SCHEMA_VERSION,
    Results,
    ResultsFileError,
    read_results,
    run_name,
    write_failed_results,
)
from tnexp.runtime import ThreadPolicyCallback
from tnexp.stages.build import build_task
from tnexp.stages.loggers import build_loggers
from tnexp.stages.trainer import build_trainer


def test_results_round_trip_and_versioned(tmp_path):
    written = Results(
        method="local",
        experiment="e",
        config={"seed": 0},
        metrics={"final": {"val/top1": 50.0}, "best": {"val/top1": 51.0}},
        tensorize=None,
        epochs=3,
        global_step=12,
    ).write(tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == written and on_disk["schema_version"] == SCHEMA_VERSION
    # kept as null (readers of older files rely on the keys), unset optional ones left out
    assert on_disk["tensorize"] is None and "memory_bounded" not in on_disk
    assert "skipped" not in on_disk and on_disk["status"] == "ok"
    back = read_results(tmp_path)  # the folder or the file
    assert back.metrics["best"]["val/top1"] == 51.0 and back.global_step == 12
    assert back.to_dict() == written


def test_older_results_files_are_read(tmp_path):
    old = {"method": "assemble", "metrics": {"final": {}}, "slice_jobs": {"dir": "x"}, "new": 1}
    (tmp_path / "results.json").write_text(json.dumps(old))
    r = read_results(tmp_path / "results.json")
    assert r.schema_version == 1 and r.status == "ok" and r.slice_jobs == {"dir": "x"}
    assert r.extra == {"new": 1} and r.to_dict()["new"] == 1
    (tmp_path / "results.json").write_text(json.dumps({"method": "local", "skipped": True}))
    assert read_results(tmp_path).status == "skipped"
    (tmp_path / "results.json").write_text('{"method": ')
    with pytest.raises(ResultsFileError, match="interrupted"):
        read_results(tmp_path)


def test_failed_results_and_run_names(tmp_path):
    cfg = make_cfg(tmp_path, "method=local", "tensorize.cr=0.5")
    assert run_name(cfg) == "local-cr0.5"
    assert run_name(cfg, method="assemble") == "assemble-cr0.5"
    assert run_name(make_cfg(tmp_path, "method=pretrain")) == "pretrain"
    assert run_name(make_cfg(tmp_path, "method=local", "run_name=mine")) == "mine"
    failed = write_failed_results(cfg, tmp_path, ValueError("boom"), phase="local", epochs=1)
    assert read_results(tmp_path).to_dict() == failed
    assert failed["status"] == "failed" and failed["error"]["message"] == "boom"
    assert failed["phase"] == "local" and "metrics" not in failed


def _trainer(cfg, tmp_path):
    task = build_task(cfg)
    loggers = build_loggers(cfg, tmp_path, "r")
    timer = OptimizationTimer(monitor=task.monitor, mode=task.mode)
    return build_trainer(cfg, tmp_path, loggers, timer, task, reload=False), loggers


def test_trainer_loggers_and_callbacks_come_from_the_config_groups(tmp_path):
    cfg = make_cfg(tmp_path, "method=global", "logger=default", "logger.wandb.mode=offline")
    with open_dict(cfg):  # a callback added in the config, one dropped
        cfg.callbacks.early = {
            "_target_": "lightning.pytorch.callbacks.EarlyStopping",
            "patience": 3,
        }
        cfg.callbacks.thread_policy = None
    trainer, loggers = _trainer(cfg, tmp_path)
    assert [type(x) for x in loggers][:1] == [CSVLogger] and isinstance(loggers[1], WandbLogger)
    assert isinstance(trainer.callbacks[0], OptimizationTimer)  # first: it times everything
    assert not any(isinstance(c, ThreadPolicyCallback) for c in trainer.callbacks)
    early = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    ckpt = trainer.checkpoint_callback
    assert early.monitor == "val/top1" and early.patience == 3  # the task's metric filled in
    assert isinstance(ckpt, ModelCheckpoint) and ckpt.monitor == "val/top1"
    assert ckpt.dirpath == str(tmp_path / "checkpoints") and trainer.max_epochs == 1


def test_configs_saved_before_the_groups_had_targets_still_build(tmp_path):
    cfg = make_cfg(tmp_path, "method=global")
    legacy = OmegaConf.to_container(cfg)
    legacy["trainer"].pop("_target_")
    legacy["logger"] = {"csv": True, "wandb": {"enabled": False, "mode": "offline"}}
    legacy["callbacks"] = {
        "checkpoint": {"save_last": True, "save_top_k": 1},
        "progress_bar": "none",
    }
    trainer, loggers = _trainer(OmegaConf.create(legacy), tmp_path)
    assert [type(x) for x in loggers] == [CSVLogger]
    assert any(isinstance(c, ThreadPolicyCallback) for c in trainer.callbacks)
    assert trainer.checkpoint_callback.monitor == "val/top1"
